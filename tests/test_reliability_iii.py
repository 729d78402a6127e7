"""Reliability III (issue 32): nothing deleted that a command did not create, no code from a model folder, nothing
fetched, no traceback on a bad file. Each test replays rows of the issue's table; the docstring says which."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from siclip import cli, storage
from siclip.models import create_model, save_checkpoint
from siclip.schema import FileRefused
from siclip.storage import CheckpointError, OutputRefused, atomic_write, check_output, recover_directory, replace_directory, save_atomic
from test_reliability import _RunsCode

ROOT = Path(__file__).resolve().parents[1]


def _command(monkeypatch, capsys, command: str, argv: list[str], stdin: str | None = None) -> tuple[int, str]:
    """``siclip COMMAND argv`` in this process, as the console command runs it: (status, stderr)."""
    import importlib
    import io

    from siclip.commands import COMMANDS

    monkeypatch.setattr(sys, "argv", [f"siclip {command}", *argv])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    status = cli.run(importlib.import_module(f"siclip.commands.{COMMANDS[command][0]}").main, argv)
    return status, capsys.readouterr().err


def _one_line(err: str, command: str) -> str:
    """The closing ``siclip COMMAND: …`` line of ``err`` (argparse's usage may precede it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"siclip {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    return save_checkpoint(create_model("mobileclip_tiny", image={"layers": [1, 1, 1, 1]}), path)


# ── rows 1, 3, 5, 12: where a command writes ─────────────────────────────────────────────────────────────────────


def test_check_output_refuses_every_destination_the_command_did_not_make(tmp_path, monkeypatch):
    """Rows 1, 3, 5, 12: cache_teacher emptied any folder, export deleted the notes beside an earlier export, convert
    wrote over a run's model.pt, its own input and /dev/full, --out . failed after the work."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("mine")
    with pytest.raises(OutputRefused, match=rf"--out {notes} holds files it did not write \(thesis.txt\): .*--overwrite"):
        check_output(notes)
    assert check_output(notes, overwrite=True) == notes and (notes / "thesis.txt").read_text() == "mine"  # only checked
    assert check_output(notes, ours=lambda p: (p / "thesis.txt").exists()) == notes  # an earlier result of the command
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    check_output(tmp_path / "new" / "deeper")
    with pytest.raises(OutputRefused, match="is one of this command's inputs"):
        check_output(notes, inputs=[notes], overwrite=True)
    with pytest.raises(OutputRefused, match=f"holds {notes / 'thesis.txt'}, one of this command's inputs"):
        check_output(notes, inputs=[None, notes / "thesis.txt"], overwrite=True)
    with pytest.raises(OutputRefused, match="is one of this command's inputs"):
        check_output(notes / "thesis.txt", kind="file", inputs=[notes / "thesis.txt"], overwrite=True)
    check_output(notes / "converted.pt", kind="file", inputs=[notes])  # a new file beside the input folder is fine
    with pytest.raises(OutputRefused, match="is a file it did not write: .*--overwrite to replace the file"):
        check_output(notes / "thesis.txt", kind="file")
    with pytest.raises(OutputRefused, match="is a folder: name the file"):
        check_output(notes, kind="file", overwrite=True)
    with pytest.raises(OutputRefused, match="is a file, not a folder"):
        check_output(notes / "thesis.txt", overwrite=True)
    monkeypatch.chdir(notes)
    for here in (".", str(notes), ".."):
        with pytest.raises(OutputRefused, match="the folder you are in|a folder holding the one you are in"):
            check_output(here, overwrite=True)
    (tmp_path / "link").symlink_to(notes)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    try:
        for special, kind in ((Path("/dev/null"), "a character device"), (tmp_path / "sock", "a socket"), (tmp_path / "link", "a symbolic link")):
            for shape in ("folder", "file"):
                with pytest.raises(OutputRefused, match=f"{special} is {kind}, not a plain {shape}"):
                    check_output(special, kind=shape, overwrite=True)
        with pytest.raises(OutputRefused, match="/dev/null is a character device"):
            save_atomic({"w": torch.zeros(1)}, "/dev/null")  # the writer itself never renames over a device
    finally:
        server.close()


class _Killed(BaseException):
    """What a SIGKILL leaves: no handler runs."""


def test_a_replaced_folder_is_always_one_complete_result(tmp_path, monkeypatch):
    """Rows 1, 3, 7: the old result was deleted before the new one was renamed in (cache), or both were only under
    hidden names after a kill between the two renames (export)."""

    def result(name: str, text: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "data").write_text(text)
        return path

    out = result("out", "old")
    swaps = []
    real = storage._exchange
    monkeypatch.setattr(storage, "_exchange", lambda a, b: swaps.append(b) or real(a, b))
    replace_directory(result(f".out.tmp-{os.getpid()}-a", "new"), out)
    assert (out / "data").read_text() == "new" and swaps == [out]  # one atomic exchange: no instant without a result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one deleted afterwards

    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)  # a file system without the exchange
    renames = []

    def killed_after_the_first(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise _Killed
        os.replace(src, dst)

    monkeypatch.setattr(storage.os, "rename", killed_after_the_first)
    with pytest.raises(_Killed):
        replace_directory(result(f".out.tmp-{os.getpid()}-b", "newer"), out)
    monkeypatch.undo()
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the old result, complete, aside
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    result(f".out.tmp-{dead}-c", "from a killed writer")
    recover_directory(out)  # what the next command writing there (check_output) does first
    assert (out / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-b", "out"]  # a writer still running (this PID)


def test_cache_teacher_never_deletes_what_it_did_not_write(tmp_path, monkeypatch, capsys, tiny):
    """Row 1: `cache_teacher.py --out DIR` deleted DIR whatever it held (exit 0), and its own --data."""
    notes = tmp_path / "p"
    notes.mkdir()
    (notes / "thesis.txt").write_text("x")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train.csv").write_text("filepath,title\n")
    base = ["--teacher", str(tiny), "--num-train", "2", "--batch-size", "2"]
    for argv, named in ((["--data", "embedded", "--out", str(notes)], f"--out {notes} holds files it did not write (thesis.txt)"),
                        (["--data", str(shards / "train.csv"), "--out", str(shards), "--overwrite"], "one of this command's inputs"),
                        (["--data", "embedded", "--out", str(tiny), "--overwrite"], "one of this command's inputs"),
                        (["--data", "embedded", "--out", str(tiny.parent), "--overwrite"], "one of this command's inputs")):  # fmt: skip
        status, err = _command(monkeypatch, capsys, "cache-teacher", [*base, *argv])
        assert status == 2 and named in _one_line(err, "cache-teacher"), err
    assert (notes / "thesis.txt").read_text() == "x" and (shards / "train.csv").exists() and tiny.exists()
    cache = tmp_path / "cache"
    for _ in range(2):  # an earlier cache is replaced without --overwrite
        status, err = _command(monkeypatch, capsys, "cache-teacher", [*base, "--data", "embedded", "--out", str(cache)])
        assert status == 0, err
    assert sorted(p.name for p in cache.iterdir()) == ["image.npy", "keys.json", "meta.json", "text.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "p", "shards"]  # no temporary or old folder left


def test_export_and_convert_refuse_their_destinations_before_any_model_loads(tmp_path, monkeypatch, capsys, tiny):
    """Rows 3, 5, 11, 12: export over a folder of notes, convert over a run's model.pt, over the weights it converts
    and over /dev/full; --out . after the whole export; --opset -1/0/17/99/1e20; and the other writers (caption's
    --out, import-mobileclip's OUT) the same way."""
    import siclip.commands.divergence as divergence_command
    import siclip.commands.export as export_command

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the destination was checked")

    monkeypatch.setattr(export_command, "load_clip", no_load)
    monkeypatch.setattr(divergence_command, "report_of", no_load)  # what convert loads its model through
    notes = tmp_path / "d"
    notes.mkdir()
    (notes / "NOTES.md").write_text("n")
    weights = tmp_path / "oc.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    monkeypatch.chdir(tmp_path)
    cases = [
        ("export", ["--model", str(tiny), "--out", str(notes)], f"--out {notes} holds files it did not write (NOTES.md)"),
        ("export", ["--model", str(tiny), "--out", "."], "--out . is the folder you are in"),
        ("export", ["--model", str(tiny), "--out", str(tiny.parent), "--overwrite"], "one of this command's inputs"),
        ("export", ["--model", str(tiny), "--out", "/dev/null"], "/dev/null is a character device"),
        *[("export", ["--model", str(tiny), "--out", "x", "--opset", opset], "--opset") for opset in ("-1", "0", "17", "99", "1e20")],
        ("convert", ["--model", f"open_clip:ViT-B-32:{weights}", "--out", str(tiny)], f"--out {tiny} is a file it did not write"),
        ("convert", ["--model", f"open_clip:ViT-B-32:{weights}", "--out", str(weights), "--overwrite"], "one of this command's inputs"),
        ("convert", ["--model", f"hf:{tmp_path}", "--out", str(notes / "NOTES.md"), "--overwrite"], f"is in {tmp_path}, one of this command's inputs"),
        ("convert", ["--model", f"open_clip:ViT-B-32:{weights}", "--out", "/dev/full"], "/dev/full is a character device"),
        ("convert", ["--model", f"open_clip:ViT-B-32:{weights}", "--out", "c.pt", "--calibration-count", "4097"], "--calibration-count"),
        ("convert", [f"open_clip:ViT-B-32:{weights}", "--out", "c.pt", "--count", "1000000000"], "--count"),  # the old spellings too
        ("convert", ["--model", f"open_clip:ViT-B-32:{weights}", "--out", "c.pt", "--beta-ff", "1e308"], "--beta-ff"),
    ]  # fmt: skip
    from siclip.data import EmbeddedConfig, EmbeddedSource, write_shards

    shards = tmp_path / "shards"
    write_shards(EmbeddedSource(EmbeddedConfig(num_train=4, image_size=16), "train"), shards, samples_per_shard=4)
    shard = next(shards.glob("*.tar"))
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    (captioned / shard.name).write_bytes(b"someone else's shard")
    cases += [
        ("caption", ["--data", str(shards), "--out", str(captioned)], f"--out {captioned} already holds {shard.name}"),  # the same names
        ("import-mobileclip", ["--model", str(tiny), "--out", str(tiny)], "--out"),  # over its own source
        ("import-mobileclip", ["--model", str(tiny), "--out", str(weights)], f"--out {weights} is a file it did not write"),
        ("cache-teacher", ["--teacher", str(tiny), "--data", "embedded", "--num-train", "1000000000000", "--out", str(tmp_path / "cache")], "--num-train: must be at most 10,000,000"),
    ]
    for command, argv, named in cases:
        status, err = _command(monkeypatch, capsys, command, argv)
        assert status == 2 and named in _one_line(err, command), (argv, err)
    assert (notes / "NOTES.md").read_text() == "n" and tiny.exists() and torch.load(weights)["w"].shape == (1,)
    assert (captioned / shard.name).read_bytes() == b"someone else's shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captioned", "d", "oc.pt", "shards"]


def test_train_overwrite_deletes_only_the_runs_own_files(tmp_path):
    """Train's --overwrite is consistent with the rest: it deletes the run it names, never a file beside it."""
    from siclip.train.resume import RUN_FILES, clear_run_directory

    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    for name in (*RUN_FILES, "notes.txt", "tensorboard/events.out.tfevents.1.host", "tensorboard/mine.txt"):
        (out / name).write_text("x")
    with pytest.raises(FileExistsError, match="already holds a run"):
        clear_run_directory(out, resume=False, overwrite=False)
    clear_run_directory(out, resume=False, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.txt", "tensorboard", "tensorboard/mine.txt"]


# ── row 8: a second Ctrl-C during a checkpoint write ─────────────────────────────────────────────────────────────


class _InterruptedWrites:
    """A file whose third write is hit by a Ctrl-C (as a second SIGINT lands inside torch.save)."""

    def __init__(self, f) -> None:
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_a_ctrl_c_inside_torch_save_ends_as_the_interrupt_with_the_checkpoint_intact(tmp_path, capsys):
    """Row 8: a second Ctrl-C during a checkpoint write ended in `RuntimeError: [enforce fail at inline_container.cc]`,
    exit 1: the zip writer's own error, raised while it closed the half-written archive, replaced the interrupt."""
    path = save_atomic({"step": 3, "w": torch.zeros(4)}, tmp_path / "checkpoint.pt")

    def main(argv):
        cli.on_interrupt(f"the checkpoint {path} is kept: continue with --resume")
        with atomic_write(path) as f:
            torch.save({"step": 4, "w": torch.randn(50_000), "b": torch.randn(100)}, _InterruptedWrites(f))

    with pytest.raises(KeyboardInterrupt):
        main(None)
    capsys.readouterr()
    assert cli.run(main, []) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"{cli.script_name()}: interrupted by SIGINT: the checkpoint {path} is kept: continue with --resume"]
    assert torch.load(path, weights_only=True)["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ── rows 2, 4: no code from a model folder, nothing fetched ──────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from foreign_models import save_hf_clip

    return save_hf_clip(tmp_path_factory.mktemp("hf") / "clip", "clip")


def _variant(hf_dir: Path, tmp_path: Path, name: str, change) -> Path:
    import shutil

    folder = tmp_path / name
    shutil.copytree(hf_dir, folder)
    change(folder)
    return folder


def _edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _with_own_code(folder: Path, marker: Path) -> None:
    """An `auto_map` to the folder's own Python, which creates ``marker`` when imported (an unknown model_type makes
    transformers ask on stdin)."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")  # fmt: skip
    _edit_json(folder / "config.json", lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))


def _own_code_folders(hf_dir: Path, tmp_path: Path, marker: Path) -> tuple[Path, Path]:
    folder = _variant(hf_dir, tmp_path, "own_code", lambda f: _with_own_code(f, marker))
    tokens = _variant(hf_dir, tmp_path, "own_tokenizer", lambda f: (
        (f / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"),
        _edit_json(f / "tokenizer_config.json", lambda t: t.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))))  # fmt: skip
    return folder, tokens


@pytest.mark.slow  # the command in its own process, `y` on its stdin, as the issue ran it (about 10 s of imports on 2 cores)
def test_a_model_folders_own_python_never_runs_even_after_y(hf_dir, tmp_path):
    """Row 2: answering `y` ran the folder's file from evaluate.py (and the other commands, below)."""
    marker = tmp_path / "ran"
    folder, _ = _own_code_folders(hf_dir, tmp_path, marker)
    (tmp_path / "zs" / "red").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "siclip", "evaluate", "--model", f"hf:{folder}", "--zeroshot", str(tmp_path / "zs")],
                          input="y\n", capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "auto_map names Python code of its own" in _one_line(done.stderr, "evaluate"), done.stderr
    assert not marker.exists()


def test_no_command_runs_a_model_folders_own_python(hf_dir, tmp_path, monkeypatch, capsys):
    """Row 2: answering `y` ran the folder's file from train.py --teacher, convert_model.py, divergence_report.py;
    here each command with `y` waiting on its stdin, for an auto_map in config.json and in tokenizer_config.json."""
    from PIL import Image

    marker = tmp_path / "ran"
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "photos" / "0.png")
    (tmp_path / "captions.txt").write_text("a photo of a cat\na red circle\n")
    calibration = ["--calibration-captions", str(tmp_path / "captions.txt"), "--calibration-images", str(tmp_path / "photos")]
    for spec in (f"hf:{folder}" for folder in _own_code_folders(hf_dir, tmp_path, marker)):
        for command, argv in (("train", ["--model", "siclip_tiny", "--teacher", spec, "--no-inherit", "--out", str(tmp_path / "run")]),
                              ("convert", ["--model", spec, *calibration, "--out", str(tmp_path / "c.pt")]),
                              ("divergence", ["--model", spec, *calibration, "--out", str(tmp_path / "r")]),
                              ("cache-teacher", ["--teacher", spec, "--data", "embedded", "--out", str(tmp_path / "cache")]),
                              ("evaluate", ["--model", spec, "--zeroshot", str(tmp_path)])):  # fmt: skip
            status, err = _command(monkeypatch, capsys, command, argv, stdin="y\n" * 4)
            assert status == 2 and "auto_map names Python code of its own" in _one_line(err, command), (command, err)
    assert not marker.exists()


_DAMAGE = {
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")],
                     FileNotFoundError, "no tokenizer files in {f}"),
    "truncated safetensors": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:50_000]),
                              CheckpointError, "{f}/model.safetensors .* is not a readable safetensors file"),
    "junk safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{not json at all"),
                         CheckpointError, "{f}/model.safetensors .*its header is not JSON"),
    "pickled bin": (lambda f: ((f / "model.safetensors").unlink(), torch.save({"x": _RunsCode(str(f / "ran"))}, f / "pytorch_model.bin")),
                    CheckpointError, "{f}/pytorch_model.bin holds objects other than tensors .*io.open"),
    "size mismatch": (lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(hidden_size=48)),
                      ValueError, "the saved weights do not fit the configuration: .* is \\[16, 32\\] in the weights file but \\[16, 48\\]"),
    "width 10⁶": (lambda f: _edit_json(f / "config.json", lambda c: c["vision_config"].update(hidden_size=10**6, intermediate_size=10**6)),
                  ValueError, "holds 12,000,.* parameters and buffers .* refused before allocating it"),
    "context 10⁹": (lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(max_position_embeddings=10**9)),
                    ValueError, "text_config.max_position_embeddings = 1000000000 is beyond any model siclip builds"),
    "hub kernel": (lambda f: _edit_json(f / "config.json", lambda c: c.update(_attn_implementation="kernels-community/flash-attn")),
                   ValueError, "'kernels-community/flash-attn' \\(a kernel from the Hugging Face hub"),
    "unknown model type": (lambda f: _edit_json(f / "config.json", lambda c: c.update(model_type="evil")),
                           ValueError, "model_type 'evil', which transformers does not ship"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(hf_dir, tmp_path, damage):
    """Rows 9–12: corrupt or truncated safetensors, a pickled pytorch_model.bin (whose message suggested
    weights_only=False), size mismatches, absurd sizes, a hub kernel, a folder without tokenizer (which evaluate
    blamed on the templates and train accepted)."""
    from siclip.interop import load_clip

    change, kind, message = _DAMAGE[damage]
    folder = _variant(hf_dir, tmp_path, "f", change)
    with pytest.raises(kind, match=message.format(f=folder)) as caught:
        load_clip(f"hf:{folder}")
    text = str(caught.value)
    assert "\n" not in text and "weights_only=False" not in text and "add_safe_globals" not in text and not (folder / "ran").exists()


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt recorded and refused; HF_HUB_OFFLINE unset, so only siclip's own switches can keep
    the libraries off the network."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("the network is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(self, address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(self, address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: refuse(None, *args))
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: refuse(None, *args))
    return attempts


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An open_clip CLIP (tiny, random) converted to SAS-P and saved: ``(path, payload)``."""
    pytest.importorskip("open_clip")
    from foreign_models import save_open_clip

    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, original_preprocess, save_converted

    root = tmp_path_factory.mktemp("converted")
    config, weights = save_open_clip(root)
    spec = f"open_clip:{config}:{weights}"
    model = load_original(spec)
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, model), blocks=["transformer.resblocks.0"],
                             preprocess=original_preprocess(spec, model).to_dict())  # fmt: skip
    convert(model, recipe)
    path = save_converted(model, recipe, root / "converted.pt")
    return path, torch.load(path, weights_only=True)


def test_nothing_is_fetched_for_a_hub_name_in_any_file_handed_over(tmp_path, no_network, converted, hf_dir):
    """Row 4: a converted file with hf_model_name=openai/…, a timm hf-hub: name and attn_implementation
    kernels-community/… each made a request to the model hub."""
    pytest.importorskip("timm")
    from siclip.interop import load_clip
    from siclip.interop.converted import load_original

    path, payload = converted
    hub_tower = copy.deepcopy(payload)
    hub_tower["architecture"]["config"]["text_cfg"]["hf_model_name"] = "openai/clip-vit-base-patch32"
    save_atomic(hub_tower, tmp_path / "oc_hf_download.pt")
    oc_config = tmp_path / "hub-text.json"
    oc_config.write_text(json.dumps({**payload["architecture"]["config"], "text_cfg": {"hf_model_name": "roberta-base", "width": 32}}))
    timm_weights = tmp_path / "vit.pt"
    torch.save({}, timm_weights)
    kernel = _variant(hf_dir, tmp_path, "kernel", lambda f: _edit_json(f / "config.json", lambda c: c.update(attn_implementation="kernels-community/flash-attn")))
    cases = [(lambda: load_clip(tmp_path / "oc_hf_download.pt"), "text_cfg.hf_model_name = 'openai/clip-vit-base-patch32'"),
             (lambda: load_clip(f"open_clip:{oc_config}:{payload['origin'].rsplit(':', 1)[1]}"), "text_cfg.hf_model_name = 'roberta-base'"),
             (lambda: load_clip(f"open_clip:hf-hub:timm/ViT-B-16-SigLIP:{timm_weights}"), "names a model on the Hugging Face hub"),
             (lambda: load_original(f"timm:hf-hub:timm/vit_tiny_patch16_224:{timm_weights}"), "is not a timm architecture name"),
             (lambda: load_clip(f"hf:{kernel}"), "kernels-community/flash-attn"),
             (lambda: load_clip("hf:openai/clip-vit-base-patch32"), "siclip reads local folders only and downloads nothing")]  # fmt: skip
    for load, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            load()
    assert no_network == []


# ── rows 9–12: every file a user hands over is checked before use ───────────────────────────────────────────────


def _architecture_width(payload):
    payload["architecture"]["config"]["vision_cfg"]["width"] = 10**6


_CONVERTED_DAMAGE = {
    "origin": (lambda p: p.update(origin="file:/etc/passwd"), "field 'origin' must be hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE"),
    "blocks": (lambda p: p.update(blocks="transformer.resblocks.0"), "field 'blocks' must be a list"),
    "option": (lambda p: p["options"].update(run="os.system"), "field 'options' has 'run', not a conversion option"),
    "beta_ff 1e308": (lambda p: p["options"].update(beta_ff=1e308), "field 'options' beta_ff must be in \\[0, 100\\]"),
    "backend": (lambda p: p["options"].update(backend="cuda-kernel-from-hub"), "backend must be"),
    "scope": (lambda p: p.update(sharing={"transformer.resblocks": {"groups": [[0, 1]], "scope": "everything"}}), "plan of 'transformer.resblocks'"),
    "preprocess 10⁹ px": (lambda p: p["preprocess"].update(size=10**9), "field 'preprocess' asks for 1000000000 pixels a side"),
    "NaN weights": (lambda p: p["state_dict"]["logit_scale"].fill_(float("nan")), "field 'state_dict' holds NaN or Inf in logit_scale"),
    "width 10⁶": (_architecture_width, "architecture: the architecture it describes holds .* refused before allocating it"),
    "context 10⁹": (lambda p: p["architecture"]["config"]["text_cfg"].update(context_length=10**9), "text_cfg.context_length = 1000000000"),
    "not a plan": (lambda p: p.update(blocks=["no.such.block"]), "its blocks or sharing plans do not fit its architecture"),
    "swapped weights": (lambda p: p["state_dict"].update(positional_embedding=p["state_dict"]["text_projection"]),
                        "the saved weights do not fit the rebuilt model: positional_embedding"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(_CONVERTED_DAMAGE))
def test_a_converted_file_is_checked_field_by_field_before_anything_is_built(converted, tmp_path, damage):
    """Rows 9–11: unchecked fields of converted files ended in tracebacks or absurd allocations."""
    from siclip.interop import load_clip

    path, payload = converted
    change, message = _CONVERTED_DAMAGE[damage]
    bad = copy.deepcopy(payload)
    change(bad)
    save_atomic(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message) as caught:
        load_clip(tmp_path / "bad.pt")
    assert str(caught.value).startswith(str(tmp_path / "bad.pt")) and "\n" not in str(caught.value)


def test_train_says_why_a_converted_file_or_hf_teacher_was_refused(hf_dir, tmp_path, monkeypatch, capsys):
    """Rows 11–12: `train.py --model conv_evil.pt` said `unknown model`; an hf teacher folder without tokenizer files
    trained with exit 0."""
    evil = tmp_path / "conv_evil.pt"
    torch.save({"format": "siclip-converted-1", "x": _RunsCode(str(tmp_path / "ran"))}, evil)
    status, err = _command(monkeypatch, capsys, "train", ["--model", str(evil), "--out", str(tmp_path / "run"), "--no-eval"])
    line = _one_line(err, "train")
    assert status == 2 and f"{evil} holds objects other than tensors" in line and "unknown model" not in line, err
    notok = _variant(hf_dir, tmp_path, "notok", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")])
    status, err = _command(monkeypatch, capsys, "train", ["--model", "siclip_tiny", "--teacher", f"hf:{notok}", "--no-inherit",
                                                          "--out", str(tmp_path / "run2"), "--no-eval"])  # fmt: skip
    assert status == 2 and f"no tokenizer files in {notok}" in _one_line(err, "train"), err
    assert not (tmp_path / "run2" / "checkpoint.pt").exists() and not (tmp_path / "ran").exists()


@pytest.mark.slow  # the whole convert command (divergences, FLOPs before and after) on a tiny open_clip: about 8 s on 2 cores
def test_the_converted_models_save_check_refuses_nan_outputs(converted, tmp_path, monkeypatch, capsys):
    """Row 11: the converted model's save check accepted NaN outputs (`--beta-ff 1e38`): nothing is written now."""
    from PIL import Image

    path, payload = converted
    weights = Path(payload["origin"].rsplit(":", 1)[1])
    state = torch.load(weights, weights_only=True)
    state["ln_final.weight"] = torch.full_like(state["ln_final.weight"], float("inf"))  # after the blocks: divergences stay finite
    torch.save(state, tmp_path / "inf.pt")
    (tmp_path / "photos").mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "captions.txt").write_text("a photo of a cat\na red circle\n")
    out = tmp_path / "converted.pt"
    status, err = _command(monkeypatch, capsys, "convert", ["--model", f"open_clip:{payload['origin'].split(':')[1]}:{tmp_path / 'inf.pt'}",
                           "--calibration-captions", str(tmp_path / "captions.txt"), "--calibration-images", str(tmp_path / "photos"),
                           "--out", str(out)])  # fmt: skip
    assert status == 2 and "the converted model gives NaN or Inf on your inputs" in _one_line(err, "convert") and not out.exists(), err


# ── siclip_onnx.json ─────────────────────────────────────────────────────────────────────────────────────────────


def _onnx_encoder(path: Path, encoder: str, size: int = 16, context: int = 8, dim: int = 4) -> None:
    """A tiny real ONNX graph with an encoder's signature: pixels (N, 3, S, S) float or ids (N, L) int64 → (N, dim)."""
    import onnx
    from onnx import TensorProto, helper

    if encoder == "image":
        x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, size, size])
        nodes = [helper.make_node("ReduceMean", ["pixel_values", "axes"], ["pooled"], keepdims=0),
                 helper.make_node("MatMul", ["pooled", "w"], ["image_embeds"])]  # fmt: skip
        inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]), helper.make_tensor("w", TensorProto.FLOAT, [3, dim], [0.1] * 3 * dim)]
        out = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", dim])
    else:
        x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", context])
        nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["f", "w"], ["text_embeds"])]  # fmt: skip
        inits = [helper.make_tensor("w", TensorProto.FLOAT, [context, dim], [0.1] * context * dim)]
        out = helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch", dim])
    model = helper.make_model(helper.make_graph(nodes, encoder, [x], [out], inits), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.fixture
def exported_dir(tmp_path) -> Path:
    """An exported directory of two tiny real ONNX encoders and the manifest export writes (words tokenizer)."""
    pytest.importorskip("onnxruntime")
    from siclip.deploy.export import _file_entry
    from siclip.deploy.runtime import FORMAT, MANIFEST

    folder = tmp_path / "onnx"
    folder.mkdir()
    for encoder in ("image", "text"):
        _onnx_encoder(folder / f"{encoder}.onnx", encoder)
    manifest = {"format": FORMAT, "name": "tiny", "embed_dim": 4, "logit_scale": 2.6, "precision": "float32",
                "preprocess": {"size": 16, "mean": [0, 0, 0], "std": [1, 1, 1]},
                "tokenizer": {"name": "words", "context_length": 8, "words": ["a", "photo", "red", "circle"]},
                "image": _file_entry(folder, "image", [None, 3, 16, 16]), "text": _file_entry(folder, "text", [None, 8]),
                "attention": "sdpa", "opset": 18, "source": "tiny.pt"}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def _swap_files(folder: Path, m: dict) -> None:
    m["image"], m["text"] = {**m["image"], "file": "text.onnx"}, {**m["text"], "file": "image.onnx"}


_MANIFEST_DAMAGE = {
    "swapped encoders": (_swap_files, "field 'image.file' must be 'image.onnx'"),
    "logit_scale 1e308": (lambda f, m: m.update(logit_scale=1e308), "field 'logit_scale' must be in \\[-15, 15\\]"),
    "embed_dim -7": (lambda f, m: m.update(embed_dim=-7), "field 'embed_dim' must be in \\[1, 65536\\], got -7"),
    "context 10⁹": (lambda f, m: m["tokenizer"].update(context_length=10**9), "field 'tokenizer.context_length' must be in"),
    "vocab outside": (lambda f, m: m["tokenizer"].update(name="clip", vocab_path="/etc/passwd"), "'tokenizer.vocab_path' must be a plain file name"),
    "opset 99": (lambda f, m: m.update(opset=99), "field 'opset' must be in \\[18, 23\\]"),
    "input shape": (lambda f, m: m["image"].update(input_shape=[None, 3, 10**9, 10**9]), "field 'image.input_shape'"),
    "size 10⁹": (lambda f, m: m["preprocess"].update(size=10**9), "field 'preprocess' asks for 1000000000 pixels a side"),
    "symlinked encoder": (lambda f, m: ((f / "image.onnx").rename(f.parent / "elsewhere.onnx"), (f / "image.onnx").symlink_to(f.parent / "elsewhere.onnx")),
                          "image.onnx is a symbolic link"),
    "symlinked vocab": (lambda f, m: ((f / "vocab.txt").symlink_to("/etc/hostname"), m["tokenizer"].update(name="clip", vocab_path="vocab.txt")),
                        "vocab.txt is a symbolic link"),
    "words not strings": (lambda f, m: m["tokenizer"].update(words=[1, 2]), "field 'tokenizer.words' item 0 must be a string"),
    "not an object": (lambda f, m: m.update(image=["image.onnx"]), "field 'image' must be an object"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(_MANIFEST_DAMAGE))
def test_the_manifest_is_checked_field_by_field(exported_dir, damage):
    """Rows 9–11: swapped encoders, logit_scale 1e308, embed_dim −7 ended in tracebacks; context_length 10⁹ was
    allocated; vocab_path /etc/passwd and a symlinked encoder pointed outside the folder."""
    from siclip.deploy.runtime import MANIFEST
    from siclip.interop import load_clip

    manifest = json.loads((exported_dir / MANIFEST).read_text())
    change, message = _MANIFEST_DAMAGE[damage]
    change(exported_dir, manifest)
    (exported_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as caught:
        load_clip(exported_dir)
    assert "\n" not in str(caught.value) and str(exported_dir) in str(caught.value)


def test_an_encoder_file_that_takes_the_wrong_input_is_refused(exported_dir):
    """Row 9: encoders swapped inside the files (their SHA-256 updated) failed in ONNX Runtime with a traceback."""
    from siclip.deploy.export import _file_entry
    from siclip.deploy.runtime import MANIFEST
    from siclip.interop import load_clip

    loaded = load_clip(exported_dir)  # the good one runs
    assert loaded.model.encode_text(loaded.tokenizer(["a red circle"])).shape == (1, 4)
    (exported_dir / "image.onnx").rename(exported_dir / "tmp.onnx")
    (exported_dir / "text.onnx").rename(exported_dir / "image.onnx")
    (exported_dir / "tmp.onnx").rename(exported_dir / "text.onnx")
    manifest = json.loads((exported_dir / MANIFEST).read_text())
    manifest["image"] = {**_file_entry(exported_dir, "image", [None, 3, 16, 16]), "input": "pixel_values"}
    manifest["text"] = _file_entry(exported_dir, "text", [None, 8])
    (exported_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FileRefused, match=r"image.onnx: the image encoder takes \[\('input_ids', 'tensor\(int64\)'"):
        load_clip(exported_dir)


def test_the_opset_recorded_is_the_files(tmp_path):
    """Row 11: `export.py --opset 17` exited 0 with a file of opset 18 while the manifest recorded 17; 99 and 1e20
    ended in tracebacks. The range is checked before any work, and the manifest takes the file's own opset."""
    pytest.importorskip("onnx")
    from siclip.deploy.export import check_opset, export_clip, file_opset

    for opset in (17, 24, 10**20, True, "18"):
        with pytest.raises(ValueError, match="outside the range exported and run here"):
            check_opset(opset)
    with pytest.raises(ValueError, match="opset 99"):
        export_clip(create_model("siclip_tiny"), None, tmp_path / "never", opset=99)  # before any work
    assert not (tmp_path / "never").exists()
    _onnx_encoder(tmp_path / "image.onnx", "image")  # declares opset 18 (test_deploy checks an export's manifest against its file)
    assert file_opset(tmp_path / "image.onnx") == 18


@pytest.mark.slow  # a real export in its own process (about 15 s on 2 cores): the command's ending is the point
def test_export_ends_through_the_common_runner(tmp_path, tiny):
    """Row 7: SIGTERM killed export without a message and left `.onnx.tmp-PID-*`; Ctrl-C printed a traceback."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "export.py"), "--model", str(tiny), "--out", str(tmp_path / "onnx")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and not list(tmp_path.glob(".onnx.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("export.py: interrupted by SIGTERM: "), err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_missing_optional_library_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    """Row 9: a missing optional library ended in an ImportError traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "open_clip" else real(name, *a))
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    (tmp_path / "zs" / "red").mkdir(parents=True)
    status, err = _command(monkeypatch, capsys, "evaluate", ["--model", f"open_clip:ViT-B-32:{weights}", "--zeroshot", str(tmp_path / "zs")])
    assert status == 2 and "needs the 'open_clip_torch' package, which is not installed: pip install open_clip_torch" in _one_line(err, "evaluate")
