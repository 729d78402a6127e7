"""Reliability II (issue 26): each test replays one of the nine defects a hostile world found; the docstring says which."""

import csv
import json
import os
import signal
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siclip import cli, storage
from siclip.data import AugmentConfig, EpochSampler, ImageTextDataset, ImageTextLoader, TooManySkipped, create_tokenizer
from siclip.data.sources import SampleError, decode_image, encode_image
from siclip.models import create_model, load_checkpoint, load_mobileclip_s0, load_model, save_checkpoint, to_apple_state_dict
from siclip.storage import CheckpointError, DiskFull, load_weights, save_atomic
from siclip.train import DataConfig, NonFiniteLoss, TrainConfig, TrainingInterrupted, train
from siclip.train.state import load_training_checkpoint
from test_reliability import _RunsCode, _script  # a pickle that creates a file when unpickled; a script's module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fault_injection import TRAIN_BAD_ARGUMENTS  # noqa: E402 - the fault injection's list, one source for both


def _config(tmp_path, name, **kw):
    base = dict(model="mobileclip_tiny", out_dir=str(tmp_path / name), data=DataConfig(num_train=64, batch_size=16),
                epochs=1, warmup_steps=2, log_every=1, checkpoint_every=100, evaluate=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _run(monkeypatch, capsys, script: str, argv: list[str]) -> tuple[int, str]:
    """``experiments/<script>.py argv`` in this process, as its ``__main__`` runs it: (status, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    capsys.readouterr()
    status = cli.run(_script(script).main, argv)
    return status, capsys.readouterr().err


def _one_error_line(err: str, script: str) -> str:
    """The single ``SCRIPT: error: …`` line of ``err`` (argparse's usage line may precede it), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{script}.py: ")]
    assert len(lines) == 1, err
    return lines[0]


# 1. The last epoch's skip report and limit.


def _mostly_missing_csv(tmp_path) -> Path:
    """64 rows, 48 of whose images do not exist; each batch of 16 of epoch 0 (seed 0) keeps 4 of the 16 that do."""
    order = EpochSampler(64, seed=0).order(0)
    present = {int(i) for i in order[::4]}
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    path = tmp_path / "mostly_missing.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(64):
            if i in present:
                (tmp_path / "images" / f"{i}.png").write_bytes(encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
            writer.writerow([f"images/{i}.png", f"a picture number {i % 4}"])
    return path


def test_the_last_epochs_skip_limit_stops_a_run_that_ends_inside_it(tmp_path):
    """48 of 64 images missing, one epoch: exit 0, no report, --max-skip-fraction 0.5 ignored (the loop's break closed
    the loader's generator before its end-of-epoch code)."""
    data = DataConfig(source=str(_mostly_missing_csv(tmp_path)), tokenizer="words", batch_size=16, max_skip_fraction=0.5)
    config = _config(tmp_path, "run", data=data, model_overrides={"image": {"image_size": 32}})
    with pytest.raises(TooManySkipped, match=r"(?s)48 of the 64 samples read in the epoch were skipped.*missing image file"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_the_last_epochs_skips_are_reported_and_counted_in_the_summary(tmp_path, caplog):
    data = DataConfig(source=str(_mostly_missing_csv(tmp_path)), tokenizer="words", batch_size=16, max_skip_fraction=None)
    summary = train(_config(tmp_path, "run", data=data, model_overrides={"image": {"image_size": 32}}), progress=False)
    assert summary["steps"] == 4 and summary["skipped_samples"] == 48
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"] == 48
    assert "epoch 0: skipped 48 samples" in caplog.text


def test_the_issue_command_ends_in_one_line_with_status_1(tmp_path, monkeypatch, capsys):
    status, err = _run(monkeypatch, capsys, "train", ["--data", str(_mostly_missing_csv(tmp_path)), "--tokenizer", "words", "--image-size", "32",
                                                      "--batch-size", "16", "--epochs", "1", "--no-eval", "--out", str(tmp_path / "X")])  # fmt: skip
    assert status == 1 and "48 of the 64 samples read in the epoch were skipped" in _one_error_line(err, "train")


def test_a_batch_left_with_one_sample_at_32_px_is_not_trained_on(tmp_path):
    """Found by the fault injection: at 32 px MCi's last stages are 1×1 maps, and a batch that skips left with one
    sample ended the run in BatchNorm's "Expected more than 1 value per channel when training" traceback."""
    order = EpochSampler(16, seed=0).order(0)
    kept = {int(order[0]), *map(int, order[8:])}  # the first batch of epoch 0 keeps one sample, the second all eight
    (tmp_path / "images").mkdir()
    rows = ["filepath,title"]
    for i in range(16):
        if i in kept:
            (tmp_path / "images" / f"{i}.png").write_bytes(encode_image(np.full((16, 16, 3), 10 * i, np.uint8)))
        rows.append(f"images/{i}.png,a picture number {i % 4}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    data = DataConfig(source=str(tmp_path / "data.csv"), tokenizer="words", batch_size=8, max_skip_fraction=None)
    with pytest.warns(UserWarning, match=r"batch\(es\) left with one sample .* were not trained on"):
        summary = train(_config(tmp_path, "run", data=data, model_overrides={"image": {"image_size": 32}}), progress=False)
    assert summary["steps"] == 2 and summary["single_sample_batches"] >= 1


# 2. Decompression bombs.


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width × height greyscale pixels and holds none (what a decompression bomb's header says)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_skipped_with_their_key(tmp_path):
    """A 20000×20000 header-only PNG raised PIL's DecompressionBombError uncaught, naming no file; an image under
    PIL's limit but far above any training size (a real 12000² PNG: 2.5 GB for one sample) decoded in full."""
    with pytest.raises(SampleError, match="larger than PIL's decoding limit") as caught:
        decode_image(_png_header(20000, 20000), "bomb")
    assert caught.value.key == "bomb"
    with pytest.raises(SampleError, match=r"image of 8000×8000 pixels is larger than the decoding limit of 50,000,000"):
        decode_image(_png_header(8000, 8000), "big")  # under PIL's 89 M pixels, over siclip's 50 M
    png = encode_image(np.zeros((100, 120, 3), np.uint8))
    with pytest.raises(SampleError, match=r"120×100 pixels is larger than the decoding limit of 1,000"):
        decode_image(png, "k", max_pixels=1000)
    jpeg = encode_image(np.full((100, 120, 3), 200, np.uint8), "jpg")
    assert decode_image(jpeg, "k", max_pixels=1000).shape == (25, 30, 3)  # decoded at 1/4 scale (DCT), under the limit
    assert decode_image(jpeg, "k").shape == (100, 120, 3)


def test_a_bomb_in_the_data_is_one_skipped_sample(tmp_path):
    from siclip.data import CsvSource

    (tmp_path / "ok.png").write_bytes(encode_image(np.zeros((16, 16, 3), np.uint8)))
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    (tmp_path / "data.csv").write_text("filepath,title\nok.png,a\nbomb.png,b\nok.png,c\nok.png,d\n")
    loader = ImageTextLoader(ImageTextDataset(CsvSource(tmp_path / "data.csv"), create_tokenizer(), augment_config=AugmentConfig(16)),
                             batch_size=2, drop_last=False)  # fmt: skip
    assert sum(b["size"] for b in loader) == 3 and [s.key for s in loader.last_report.skipped] == ["bomb.png"]


# 3. The last good checkpoint is the state after the last step that completed.


def _nan_loss_at_call(monkeypatch, call: int):
    from siclip.losses import ClipLoss

    original, calls = ClipLoss.forward, {"n": 0}

    def nan_at(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(ClipLoss, "forward", nan_at)


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("checkpoint_every", [1, 100])
def test_the_checkpoint_written_on_divergence_is_the_true_state_of_its_step(tmp_path, monkeypatch, checkpoint_every):
    """It carried BatchNorm statistics and counters advanced by the failing batch (156 tensors differed from a true
    step-5 checkpoint) and a loader position one batch ahead; with --checkpoint-every 1 it overwrote the true step's file."""
    config = _config(tmp_path, "true", checkpoint_every=checkpoint_every, data=DataConfig(num_train=128, batch_size=16))
    train(config, max_steps=3, progress=False)
    true = load_training_checkpoint(tmp_path / "true" / "checkpoint.pt")
    _nan_loss_at_call(monkeypatch, 4)
    with pytest.raises(NonFiniteLoss, match=r"became non-finite in step 4 .*the last good state \(after step 3\)"):
        train(_config(tmp_path, "failed", checkpoint_every=checkpoint_every, data=DataConfig(num_train=128, batch_size=16)), progress=False)
    written = load_training_checkpoint(tmp_path / "failed" / "checkpoint.pt")
    true["config"]["out_dir"] = written["config"]["out_dir"]
    _assert_same(written, true)


def test_the_divergence_message_names_the_failing_step_its_lr_and_the_loss_before(tmp_path, monkeypatch):
    """"non-finite at step 1 … last good state (step 1)" at lr 1e6: the message hid the step and the loss that started it."""
    _nan_loss_at_call(monkeypatch, 2)
    with pytest.raises(NonFiniteLoss) as caught:
        train(_config(tmp_path, "msg", lr=1e-3, warmup_steps=1), progress=False)
    message = str(caught.value)
    assert message.startswith("loss term(s) ['clip', 'total'] (clip nan, total nan) became non-finite in step 2 (at lr 0.001; "
                              "step 1 ended with loss clip "), message  # fmt: skip
    assert message.endswith(f"the last good state (after step 1) is in {tmp_path / 'msg' / 'checkpoint.pt'}")


def test_a_teacher_holding_nan_is_refused_naming_its_file(tmp_path):
    """A NaN teacher was reported as student.text.positional_embedding, without naming the teacher file."""
    teacher = create_model("mobileclip_tiny")
    with torch.no_grad():
        teacher.text.positional_embedding[3, 5] = float("nan")
    path = save_checkpoint(teacher, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match=rf"--teacher {path} holds NaN or Inf in text\.positional_embedding: a student cannot inherit"):
        train(_config(tmp_path, "student", model="siclip_tiny", teacher=str(path)), progress=False)
    assert not (tmp_path / "student" / "checkpoint.pt").exists()


# 4. Arguments and inputs checked before the first step.


def _eval_files(tmp_path):
    classes = tmp_path / "test"
    for name in ("red", "blue"):
        (classes / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(classes / name / "0.png")
    (tmp_path / "names.txt").write_text("red\nblue\n")
    return classes




@pytest.mark.parametrize("argv, named", TRAIN_BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in TRAIN_BAD_ARGUMENTS])
def test_a_bad_train_argument_is_a_usage_error_before_anything_runs(tmp_path, monkeypatch, capsys, argv, named):
    """Of 26 bad values none exited with a usage error: 17 tracebacks (ZeroDivisionError for --checkpoint-every 0,
    --log-every 0, --image-size 0), 5 accepted (--batch-size 1 trained at loss 0, --epochs 0 wrote an untrained model)."""
    files = {"missing": tmp_path / "missing", "test": _eval_files(tmp_path), "names": tmp_path / "names.txt"}
    argv = [a.format(**files) for a in argv]
    out = tmp_path / "run"
    status, err = _run(monkeypatch, capsys, "train", ["--num-train", "32", *argv, *(["--out", str(out)] if "--out" not in argv else [])])
    assert status == 2 and named in _one_error_line(err, "train") and not out.exists()


def test_inputs_that_make_no_step_or_a_bad_benchmark_stop_before_training(tmp_path, monkeypatch, capsys):
    """Evaluation inputs were read only after training: a missing --classnames file ended in a traceback after model.pt
    was written, and summary.json was never written."""
    test = _eval_files(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    out = tmp_path / "run"
    status, err = _run(monkeypatch, capsys, "train", ["--num-train", "8", "--batch-size", "16", "--out", str(out)])
    assert status == 2 and "make no training step" in _one_error_line(err, "train") and not out.exists()  # no empty directory left
    status, err = _run(monkeypatch, capsys, "train", ["--num-train", "32", "--batch-size", "16", "--out", str(out), "--zeroshot", str(test),
                                                      "--classnames", str(tmp_path / "empty.txt")])  # fmt: skip
    line = _one_error_line(err, "train")
    assert status == 2 and "empty.txt" in line and "non-empty list" in line
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists() and not (out / "metrics.csv").exists()


def test_overwrite_deletes_nothing_when_the_new_runs_inputs_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(monkeypatch, capsys, "train", ["--num-train", "32", "--batch-size", "16", "--no-eval", "--out", str(out)])[0] == 0
    model = (out / "model.pt").read_bytes()
    (tmp_path / "bad.csv").write_text("filepath,title\nonly-a-path\n")
    status, err = _run(monkeypatch, capsys, "train", ["--data", str(tmp_path / "bad.csv"), "--overwrite", "--out", str(out)])
    assert status == 2 and "bad.csv" in _one_error_line(err, "train")
    assert (out / "model.pt").read_bytes() == model and (out / "checkpoint.pt").exists()


BAD_SCRIPT_ARGUMENTS = [
    ("evaluate", ["--model", "{model}", "--zeroshot", "{test}", "--batch-size", "0"], "--batch-size"),
    ("evaluate", ["--model", "{model}", "--zeroshot", "{test}", "--max-unknown-rate", "2"], "--max-unknown-rate"),
    ("evaluate", ["--model", "{model}", "--zeroshot", "{test}", "--device", "bogus"], "--device"),
    ("evaluate", ["--model", "{missing}", "--zeroshot", "{test}"], "--model"),
    ("evaluate", ["--model", "{model}", "--zeroshot", "{test}", "--templates", "{missing}"], "--templates"),
    ("cache_teacher", ["--teacher", "{model}", "--data", "embedded", "--out", "{out}", "--num-train", "0"], "--num-train"),
    ("cache_teacher", ["--teacher", "{model}", "--data", "embedded", "--out", "{out}", "--batch-size", "-1"], "--batch-size"),
    ("demo", ["--workers", "-1", "--out", "{out}"], "--workers"), ("demo", ["--timing-rounds", "0", "--out", "{out}"], "--timing-rounds"),
    ("ablation", ["--seeds", "0", "--out", "{out}"], "--seeds"), ("ablation", ["--workers", "-2", "--out", "{out}"], "--workers"),
    ("data_scale", ["--seeds", "0", "--out", "{out}"], "--seeds"),
    ("divergence_report", ["--preset", "demo", "--snapshots", "1", "--out", "{out}"], "--snapshots"),
    ("divergence_report", ["--model", "{missing}", "--out", "{out}"], "--model"),
    ("divergence_report", ["--model", "mobileclip_tiny", "--calibration-count", "0", "--out", "{out}"], "--calibration-count"),
    ("divergence_report", ["--model", "mobileclip_tiny", "--snapshots", "3", "--out", "{out}"], "--snapshots"),
    ("convert_model", ["--model", "mobileclip_tiny", "--out", "{out}", "--sharing", "threshold"], "--threshold"),
    ("flops_report", ["--out", "{model}"], "--out"), ("import_mobileclip", ["--model", "{missing}", "--out", "{out}"], "--model"),
    ("import_mobileclip", ["--model", "{model}", "--out", "{out}", "--apple-model", "siclip_s0"], "--apple-model"),
    ("caption_shards", ["--data", "{out}", "--num-captions", "0"], "--num-captions"),
    ("caption_shards", ["--data", "{out}", "--captioner", "nocolon"], "--captioner"),
    ("caption_shards", ["--data", "{out}", "--captioner", "no_such_module_x:f"], "no_such_module_x"),
]  # fmt: skip


@pytest.mark.parametrize("script, argv, named", BAD_SCRIPT_ARGUMENTS, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_SCRIPT_ARGUMENTS])
def test_every_script_ends_a_bad_argument_in_one_line_with_status_2(tmp_path, monkeypatch, capsys, script, argv, named):
    files = {"missing": tmp_path / "missing.pt", "test": _eval_files(tmp_path), "out": tmp_path / "out",
             "model": save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "model.pt")}  # fmt: skip
    status, err = _run(monkeypatch, capsys, script, [a.format(**files) for a in argv])
    assert status == 2 and named in _one_error_line(err, script)
    assert not (tmp_path / "out").exists()


# 5. A full disk.


@pytest.fixture
def full_disk(monkeypatch):
    """Writes through siclip.storage go to /dev/full (ENOSPC from the kernel) from the ``after``-th on, per file name."""
    real, counts = storage._create_unique, {}

    def arm(name: str, after: int = 1):
        def create(path):
            fd, tmp = real(path)
            counts[path.name] = counts.get(path.name, 0) + 1
            if path.name != name or counts[path.name] <= after:
                return fd, tmp
            os.close(fd)
            return os.open("/dev/full", os.O_WRONLY), tmp

        monkeypatch.setattr(storage, "_create_unique", create)

    return arm


def test_a_full_disk_says_so_naming_the_file_and_keeps_the_previous_one(tmp_path, full_disk):
    """A full disk read as "RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos …", the ENOSPC buried."""
    path = save_atomic({"step": torch.arange(10)}, tmp_path / "checkpoint.pt")
    full_disk("checkpoint.pt", after=0)
    with pytest.raises(DiskFull, match=f"no space left on device while writing {path}; the previous checkpoint.pt is intact"):
        save_atomic({"step": torch.zeros(10_000)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"] and torch.equal(load_weights(path)["step"], torch.arange(10))


def test_a_full_disk_ends_training_in_one_line_with_status_1(tmp_path, monkeypatch, capsys, full_disk):
    full_disk("checkpoint.pt", after=2)
    out = tmp_path / "run"
    status, err = _run(monkeypatch, capsys, "train", ["--num-train", "64", "--batch-size", "16", "--checkpoint-every", "1", "--no-eval",
                                                      "--out", str(out)])  # fmt: skip
    line = _one_error_line(err, "train")
    assert status == 1 and line == f"train.py: error: no space left on device while writing {out / 'checkpoint.pt'}; the previous checkpoint.pt is intact"
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 2 and not list(out.glob(".*.tmp"))


# 6. A signal during the final evaluation.


def test_sigterm_during_the_final_evaluation_stops_it_and_resume_evaluates(tmp_path, monkeypatch):
    """SIGTERM during the final evaluation was swallowed: the run finished its evaluation and exited 0."""
    from siclip.train import loop

    evaluate, calls = loop.evaluate_run, []

    def terminated(*args):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this function returns
        return evaluate(*args)

    monkeypatch.setattr(loop, "evaluate_run", terminated)
    config = _config(tmp_path, "eval", evaluate=True, eval_zero_shot_per_class=1, eval_retrieval_images=16,
                     data=DataConfig(num_train=32, batch_size=16))  # fmt: skip
    with pytest.raises(TrainingInterrupted, match="SIGTERM during the final evaluation: training is complete") as caught:
        train(config, progress=False)
    assert caught.value.exit_status == 143 and (tmp_path / "eval" / "model.pt").exists()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["interrupted_in"] == "evaluation" and "eval" not in summary
    assert "zeroshot_top1" in train(config, resume=True, progress=False)["eval"]


# 7. Atomic model writes.


def test_a_failed_model_write_leaves_no_temporary_file_and_the_old_model(tmp_path, monkeypatch):
    """model.pt.tmp had a fixed name (two writers shared it) and stayed behind when a write failed."""
    path = save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "model.pt")
    before = path.read_bytes()

    def half_written(payload, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("the writer died")

    monkeypatch.setattr(storage.torch, "save", half_written)
    with pytest.raises(RuntimeError, match="the writer died"):
        save_checkpoint(create_model("mobileclip_tiny"), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"] and path.read_bytes() == before


def test_concurrent_model_writers_never_share_a_temporary_file(tmp_path):
    models, errors = [create_model("mobileclip_tiny") for _ in range(3)], []

    def writer(model):
        try:
            for _ in range(3):
                save_checkpoint(model, tmp_path / "model.pt")
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    loaded = load_checkpoint(tmp_path / "model.pt").state_dict()
    assert any(all(torch.equal(loaded[k], v) for k, v in m.state_dict().items()) for m in models)


# 8. One loader for every weights file.


def test_torchs_legacy_format_loads_everywhere(tmp_path):
    """A legitimate checkpoint in torch's old (non-zip) format was refused: "mmap can only be used with …"."""
    tiny = create_model("mobileclip_tiny").eval()
    apple = tmp_path / "apple_legacy.pt"
    torch.save(to_apple_state_dict(tiny), apple, _use_new_zipfile_serialization=False)
    ids = torch.randint(1, 200, (2, 32))
    with torch.no_grad():
        for model in (load_mobileclip_s0(apple, model="mobileclip_tiny"), load_model(apple, model="mobileclip_tiny")[0]):
            torch.testing.assert_close(model.encode_text(ids), tiny.encode_text(ids))
    ours = tmp_path / "model_legacy.pt"
    torch.save({"format": "siclip-model-1", "config": tiny.config.to_dict(), "state_dict": tiny.state_dict()}, ours,
               _use_new_zipfile_serialization=False)  # fmt: skip
    assert load_checkpoint(ours).config == tiny.config
    state = tmp_path / "checkpoint_legacy.pt"
    torch.save({"task": {}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": {}, "step": 7}, state, _use_new_zipfile_serialization=False)
    assert load_training_checkpoint(state)["step"] == 7


def _loaders(tmp_path):
    from foreign_models import OPEN_CLIP_CONFIG
    from siclip.interop import load_clip

    (tmp_path / "tiny-clip.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip_spec = f"open_clip:{tmp_path / 'tiny-clip.json'}:{{path}}"
    return {
        "load_weights": load_weights, "load_checkpoint": load_checkpoint, "load_model": lambda p: load_model(p),
        "load_mobileclip_s0": lambda p: load_mobileclip_s0(p), "load_training_checkpoint": load_training_checkpoint,
        "load_clip": lambda p: load_clip(p), "open_clip": lambda p: load_clip(open_clip_spec.format(path=p)),
    }  # fmt: skip


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_by_every_loader_naming_the_file(tmp_path, legacy):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(str(marker))}, path, _use_new_zipfile_serialization=not legacy)
    for name, load in _loaders(tmp_path).items():
        with pytest.raises(CheckpointError, match=f"{path} holds objects other than tensors .*could run code from the file") as caught:
            load(path)
        # What to do, without advising to load it anyway (issue 32: never weights_only=False, never an allow-list).
        assert "save only its tensors" in str(caught.value) and "weights_only=False" not in str(caught.value), name
        assert "add_safe_globals" not in str(caught.value), name
    assert not marker.exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"), (b"hello world\n", "not a PyTorch weights file: it holds text"),
    (np.random.default_rng(0).bytes(3000), "not a PyTorch weights file: it holds bytes starting"),
    (b'{"weights": [1, 2]}', "it holds text that looks like JSON"),
])  # fmt: skip
def test_files_that_are_no_weights_are_refused_in_one_message(tmp_path, content, problem):
    path = tmp_path / "file.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model checkpoint {path} .*{problem}.*; pass a model.pt written by siclip"):
        load_checkpoint(path)
    good = save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "good.pt").read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="is damaged: a torch.save archive that cannot be read .* truncated or overwritten"):
        load_checkpoint(path)


@pytest.mark.parametrize("script, argv", [
    ("import_mobileclip", ["--model", "{evil}", "--out", "{out}"]), ("divergence_report", ["--model", "{evil}", "--out", "{out}"]),
    ("cache_teacher", ["--teacher", "{evil}", "--data", "embedded", "--out", "{out}"]), ("evaluate", ["--model", "{evil}", "--zeroshot", "{test}"]),
    ("train", ["--teacher", "{evil}", "--model", "siclip_tiny", "--out", "{out}"]), ("import_mobileclip", ["--model", "{junk}", "--out", "{out}"]),
    ("train", ["--teacher", "{junk}", "--model", "siclip_tiny", "--out", "{out}"]),
])  # fmt: skip
def test_every_script_refuses_a_bad_weights_file_in_one_line(tmp_path, monkeypatch, capsys, script, argv):
    """--teacher and cache_teacher.py ended in a ValueError traceback; import_mobileclip.py and divergence_report.py in a
    raw UnpicklingError or an mmap RuntimeError."""
    marker = tmp_path / "executed"
    torch.save({"x": _RunsCode(str(marker))}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    files = {"evil": tmp_path / "evil.pt", "junk": tmp_path / "junk.pt", "out": tmp_path / "out", "test": _eval_files(tmp_path)}
    argv = [a.format(**files) for a in argv]
    status, err = _run(monkeypatch, capsys, script, argv)
    line = _one_error_line(err, script)
    named = files["evil"] if "{evil}" in " ".join(argv) or str(files["evil"]) in argv else files["junk"]
    assert status == 2 and str(named) in line and not marker.exists()


# 9. One line where a traceback was.


def test_a_latin1_csv_is_one_line(tmp_path, monkeypatch, capsys):
    """A Latin-1 CSV: the message was clear, inside a traceback."""
    (tmp_path / "a.png").write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "latin.csv").write_bytes("filepath,title\na.png,un café crème\n".encode("latin-1"))
    status, err = _run(monkeypatch, capsys, "train", ["--data", str(tmp_path / "latin.csv"), "--out", str(tmp_path / "run")])
    line = _one_error_line(err, "train")
    assert status == 2 and "latin.csv: unreadable CSV" in line and "utf-8" in line


def test_an_interrupted_demo_says_where_its_runs_are_and_how_to_continue(tmp_path, monkeypatch, capsys):
    """make demo interrupted: a TrainingInterrupted traceback from experiments/demo.py."""
    import siclip.commands.demo as demo  # experiments/demo.py is a thin caller of it

    def interrupted(config, **kw):
        raise TrainingInterrupted(signal.SIGINT, f"SIGINT at step 3: state saved to {config.out_dir}/checkpoint.pt; continue with --resume")

    monkeypatch.setattr(demo, "train", interrupted)
    status, err = _run(monkeypatch, capsys, "demo", ["--out", str(tmp_path / "runs")])
    line = _one_error_line(err, "demo")
    assert status == 130 and line.startswith(f"demo.py: SIGINT in the teacher's run, whose state is kept in {tmp_path / 'runs' / 'demo'}")
    assert "run the demo again (make demo" in line and "--resume" not in line


def test_a_second_ctrl_c_is_one_line_naming_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C (the first one's handler is gone) raised KeyboardInterrupt through the loop: a traceback."""
    from siclip.train import loop

    step = loop.backward_and_step
    calls = []

    def second_ctrl_c(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Python's default handler raises for a Ctrl-C
        return step(*args, **kw)

    monkeypatch.setattr(loop, "backward_and_step", second_ctrl_c)
    out = tmp_path / "run"
    status, err = _run(monkeypatch, capsys, "train", ["--num-train", "64", "--batch-size", "16", "--checkpoint-every", "1", "--no-eval",
                                                      "--out", str(out)])  # fmt: skip
    assert status == 130 and _one_error_line(err, "train") == (f"train.py: interrupted by SIGINT: the checkpoint {out / 'checkpoint.pt'} is kept: "
                                                              "continue with --resume")  # fmt: skip
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_a_rank_that_loses_its_peer_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """Rank 0 ended in gloo's raw traceback ("Connection closed by peer") when another rank died."""
    import torch.distributed as dist

    from siclip.train import loop

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in {"init_process_group": lambda *a, **k: None, "is_initialized": lambda: False, "get_rank": lambda: 0,
                        "get_world_size": lambda: 2, "barrier": lambda: None, "destroy_process_group": lambda: None}.items():  # fmt: skip
        monkeypatch.setattr(dist, name, value)

    def peer_died(*args, **kw):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")

    monkeypatch.setattr(loop, "_train", peer_died)
    out = tmp_path / "run"
    status, err = _run(monkeypatch, capsys, "train", ["--out", str(out), "--no-eval"])
    line = _one_error_line(err, "train")
    assert status == 1 and line.startswith("train.py: error: rank 0 lost contact with the other ranks (") and "Connection closed by peer" in line
    assert line.endswith("no checkpoint was written")
