"""Your model, II (issue 33): what a researcher's trial found outside the tests, fixed on the libraries' real classes.

- timm and open_clip specs from the environment ``make setup`` builds (no torchvision): the README's commands in
  subprocesses with no stand-in of the tests' on the path (row 1).
- Each library's own crop arithmetic: transformers' processor starts a crop at (H − S) // 2, torchvision at
  round((H − S) / 2), on odd sizes (row 5).
- A converted checkpoint carries its tokenizer: moving or deleting the original's folder does not matter (row 6).
- ``siclip divergence`` and ``siclip convert`` take any model spec with the user's captions and images (row 8).
- With an ``hf:`` teacher the default tokenizer is the teacher's (row 9).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_image

from foreign_models import save_hf_clip, save_open_clip
from siclip.data import Preprocess, preprocess_image
from siclip.interop import load_clip

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ODD_SIZES = [(35, 32), (100, 45), (33, 57), (32, 35), (45, 100), (57, 33), (41, 64), (64, 41), (37, 90), (90, 37), (33, 33)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Calibration captions and photos, and a digits CSV with a held-out class folder (real scans)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "photos").mkdir()
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)[::4, ::4]).save(root / "photos" / name)
    (root / "captions.txt").write_text("a photo of the digit seven\na red circle\nthis is a large drawing of a temple\n")
    digits = load_digits()
    rows = ["filepath,title"]
    (root / "img").mkdir()
    for i in range(32):
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a photo of the digit {NAMES[digits.target[i]]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(64, 74):
        path = root / "test" / NAMES[digits.target[i]] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(path)
    (root / "templates.txt").write_text("a photo of the digit {}\n")
    return root


def _run(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


# ── row 1: timm and open_clip outside the tests ─────────────────────────────────────────────────────────────────────


@pytest.mark.slow  # three commands in fresh interpreters, each importing torch, transformers and open_clip or timm (≈ 15 s each)
def test_readme_timm_and_open_clip_commands_run_without_the_tests_standin(tmp_path, inputs):
    """``make setup`` installs timm and open_clip without torchvision: they imported only inside the tests. Now siclip
    lends them its stand-in, says so once, and the README's commands run in a clean environment."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    config, weights = save_open_clip(tmp_path / "oc", seed=1)
    vit_args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **vit_args).state_dict(), tmp_path / "vit.pt")
    (tmp_path / "vit.json").write_text(json.dumps({"name": "vit_tiny_patch16_224", "kwargs": vit_args}))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}  # no PYTHONPATH at all
    probe = _run("-c", "import sys, importlib.util; print(importlib.util.find_spec('torchvision')); print(sys.path)", cwd=tmp_path, env=env)
    assert probe.stdout.startswith("None") and "tests" not in probe.stdout  # no torchvision, nothing of the tests' on the path
    commands = [
        (ROOT / "experiments/convert_model.py", "--model", f"timm:{tmp_path / 'vit.json'}:{tmp_path / 'vit.pt'}", "--calibration-images",
         inputs / "photos", "--sharing", "adjacent", "--out", tmp_path / "vit_sasp.pt"),
        (ROOT / "experiments/evaluate.py", "--model", f"open_clip:{config}:{weights}", "--zeroshot", inputs / "test", "--templates",
         inputs / "templates.txt", "--out", tmp_path / "eval"),
        (ROOT / "experiments/train.py", "--model", "siclip_tiny", "--teacher", f"open_clip:{config}:{weights}", "--no-inherit", "--wikd",
         "--data", inputs / "train.csv", "--tokenizer", "words", "--image-size", "32", "--batch-size", "16", "--epochs", "1", "--no-eval",
         "--out", tmp_path / "student"),
    ]  # fmt: skip
    for command in commands:
        done = _run(*command, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("TorchvisionStandinWarning") == 1 and "it is not installed" in done.stderr  # said once, naming why
    assert "it reloads to the same model" in _run(*commands[0], cwd=tmp_path, env=env).stdout
    assert (tmp_path / "eval" / "test_zeroshot_classification.json").is_file() and (tmp_path / "student" / "model.pt").is_file()


def test_the_standin_is_lent_to_timm_and_open_clip_alone():
    """transformers never takes the stand-in for a torchvision (it would import its video modules), and the stand-in
    leaves no torchvision behind."""
    import importlib.util

    pytest.importorskip("open_clip")
    from siclip.interop._torchvision_standin import StandinImport, install

    import open_clip  # noqa: F401  (through the hook, where torchvision cannot load)
    from transformers.utils import import_utils

    finder = install()
    assert isinstance(finder, StandinImport) and finder.failure is not None
    assert "torchvision" not in sys.modules and not import_utils.is_torchvision_available()
    assert importlib.util.find_spec("torchvision") is None or finder.failure.startswith(("RuntimeError", "ImportError", "OSError"))
    with pytest.raises(NotImplementedError, match="siclip/interop/_torchvision_standin"):
        open_clip.image_transform(32, is_train=False)  # a torchvision transform: refused, never faked


# ── row 5: each library's crop arithmetic ───────────────────────────────────────────────────────────────────────────


def test_hf_models_crop_as_transformers_processor_does_on_odd_sizes(tmp_path, seed):
    """siclip cropped at torchvision's round((H − S) / 2); CLIPImageProcessor at (H − S) // 2: 10 of 22 odd-sized images
    differed by up to 3.75. An hf: model now sees the processor's pixels exactly (to float32 rounding)."""
    import warnings

    import transformers

    directory = save_hf_clip(tmp_path / "hf", "clip", seed=1)
    preprocess = load_clip(f"hf:{directory}").model.preprocess
    assert preprocess.crop_rounding == "floor"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = transformers.CLIPImageProcessor.from_pretrained(directory)
    rng = np.random.default_rng(seed)
    moved = 0
    for height, width in ODD_SIZES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess_image(image, preprocess), theirs, rtol=0, atol=1e-5)
        torchvision_rule = preprocess_image(image, Preprocess(**{**preprocess.to_dict(), "mean": tuple(preprocess.mean),
                                                                 "std": tuple(preprocess.std), "crop_rounding": "round"}))  # fmt: skip
        moved += not torch.allclose(torchvision_rule, theirs, atol=1e-5)
    assert moved >= 5  # the sizes where the two rules part


def test_torchvision_rule_and_saved_records(tmp_path):
    """open_clip's, Apple's and siclip's own models keep torchvision's round((H − S) / 2) (Python's round, as
    torchvision's CenterCrop); a record saved before the field existed keeps it too; a bad rule is refused."""
    image = np.arange(37 * 32 * 3, dtype=np.uint8).reshape(37, 32, 3)  # 37 → crop 32: round(2.5) = 2, 5 // 2 = 2; 35: round(1.5) = 2, 1
    for height, top in ((37, 2), (35, 2), (39, 4), (33, 0)):
        view = preprocess_image(np.ascontiguousarray(np.resize(image, (height, 32, 3))), Preprocess(size=32, mean=(0,) * 3, std=(1,) * 3),
                                normalize=False)  # fmt: skip
        expected = np.resize(image, (height, 32, 3))[top : top + 32]
        assert np.array_equal(view.permute(1, 2, 0).numpy(), expected)
    floor = Preprocess(size=32, crop_rounding="floor")
    assert Preprocess.from_dict(floor.to_dict()) == floor and floor.at(64).crop_rounding == "floor"
    old = {k: v for k, v in Preprocess(size=32).to_dict().items() if k != "crop_rounding"}
    assert Preprocess.from_dict(old).crop_rounding == "round"
    with pytest.raises(ValueError, match="crop_rounding must be one of"):
        Preprocess(size=32, crop_rounding="ceil")


# ── row 6: converted files carry what they need ─────────────────────────────────────────────────────────────────────


def test_a_converted_file_survives_its_originals_folder_moving(tmp_path, seed):
    """The converted model read its tokenizer from the original's folder by path: after moving it, evaluation and
    training failed. The file now holds the tokenizer (its files as text) and the preprocessing, and its origin's paths
    absolute; an open_clip file holds its tokenizer's arguments, so its config JSON may go too."""
    from siclip.data.tokenizer import tokenizer_from_spec
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_converted, load_converted_clip, load_original
    from siclip.interop.converted import save_converted

    original = save_hf_clip(tmp_path / "hf", "clip", seed=seed % 100)
    before = load_clip(f"hf:{original}")
    ids = before.tokenizer(["a photo of the digit seven", "a red circle"])
    os.chdir(tmp_path)  # a relative spec, as a user types it
    try:
        model = load_original("hf:hf")
        recipe = ConvertedRecipe(origin="hf:hf", architecture=architecture_of("hf:hf", model), blocks=["text_model.encoder.layers.1"])
        convert(model, recipe)
        save_converted(model, recipe, "converted.pt")
    finally:
        os.chdir(ROOT)
    payload = torch.load(tmp_path / "converted.pt", weights_only=True)
    assert payload["origin"] == f"hf:{original.resolve()}" and payload["tokenizer"]["name"] == "hf"
    assert "tokenizer_config.json" in payload["tokenizer"]["files"] and {"tokenizer.json", "vocab.json"} & set(payload["tokenizer"]["files"])
    json.dumps(payload["tokenizer"])  # plain data
    shutil.move(original, tmp_path / "elsewhere")
    loaded = load_clip(tmp_path / "converted.pt")
    assert torch.equal(loaded.tokenizer(["a photo of the digit seven", "a red circle"]), ids)
    assert loaded.model.preprocess == before.model.preprocess and loaded.model.preprocess.crop_rounding == "floor"
    assert torch.equal(tokenizer_from_spec(payload["tokenizer"])(["a red circle"]), ids[1:])
    shutil.rmtree(tmp_path / "elsewhere")
    student = load_converted_clip(tmp_path / "converted.pt")  # what training reads
    assert student.model.recipe.tokenizer == payload["tokenizer"]
    with torch.no_grad():
        torch.testing.assert_close(student.model.encode_text(ids), loaded.model.encode_text(ids), rtol=0, atol=0)
    student.model.save(tmp_path / "trained.pt")  # a trained student saved again keeps them
    assert load_converted(tmp_path / "trained.pt")[1].tokenizer == payload["tokenizer"]
    # open_clip: the model-config JSON deleted after conversion
    config, weights = save_open_clip(tmp_path / "oc", seed=2)
    spec = f"open_clip:{config}:{weights}"
    model = load_original(spec)
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, model), blocks=["transformer.resblocks.0"])
    convert(model, recipe)
    save_converted(model, recipe, tmp_path / "oc.pt")
    shutil.rmtree(tmp_path / "oc")
    oc = load_clip(tmp_path / "oc.pt")
    assert oc.tokenizer(["a red circle"]).shape == (1, 16) and oc.tokenizer.spec()["name"] == "open_clip" and oc.model.preprocess.size == 32


def test_a_converted_file_from_before_names_the_missing_original(tmp_path):
    """A file written before converted files carried their tokenizer reads its original's, and says so when it is gone."""
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, save_converted

    directory = save_hf_clip(tmp_path / "hf", "clip", seed=0)
    model = load_original(f"hf:{directory}")
    recipe = ConvertedRecipe(origin=f"hf:{directory}", architecture=architecture_of(f"hf:{directory}", model),
                             blocks=["text_model.encoder.layers.0"])  # fmt: skip
    convert(model, recipe)
    payload = torch.load(save_converted(model, recipe, tmp_path / "old.pt"), weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "tokenizer"}, tmp_path / "old.pt")  # as files were written before
    assert load_clip(tmp_path / "old.pt").tokenizer.vocab_size == 49408  # the original's, read from its folder
    shutil.rmtree(directory)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer .* reads the tokenizer of its original, hf:.*convert the original again"):
        load_clip(tmp_path / "old.pt")


# ── row 8: any model spec in divergence and convert ─────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A siclip model with its own words tokenizer, as training on the digits writes it (untrained weights suffice)."""
    from siclip.data.tokenizer import create_tokenizer, tokenizer_spec
    from siclip.models import create_model, save_checkpoint

    tokenizer = create_tokenizer("words", words=["a", "photo", "of", "the", "digit", *NAMES], context_length=16)
    model = create_model("mobileclip_tiny", text={"vocab_size": tokenizer.vocab_size, "tokenizer": "words", "context_length": 16},
                         image={"image_size": 32})  # fmt: skip
    return save_checkpoint(model, tmp_path_factory.mktemp("digits") / "model.pt", tokenizer=tokenizer_spec(tokenizer))


def test_divergence_of_a_model_trained_on_your_data(tmp_path, inputs, digits_checkpoint, capsys, monkeypatch):
    """``--checkpoint runs/digits/model.pt`` fed the embedded world's captions through the embedded tokenizer (ids out of
    its 24-word vocabulary) and ignored the caption file; now the user's captions go through the checkpoint's own
    tokenizer, and the printed table is the report object's."""
    from siclip.commands import divergence

    out = tmp_path / "report"
    argv = ["--model", str(digits_checkpoint), "--calibration-captions", str(inputs / "captions.txt"), "--calibration-images",
            str(inputs / "photos"), "--out", str(out)]  # fmt: skip
    made, measure = [], divergence.report_of
    monkeypatch.setattr(divergence, "report_of", lambda *a: made.append(measure(*a)) or made[-1])
    assert divergence.main(argv) == 0
    printed = capsys.readouterr().out
    (_, report, where), = made
    assert str(report) in printed and "3 captions of" in where and "2 images of" in where
    record = json.loads((out / "divergence.json").read_text())
    text = record["stacks"]["text.transformer"]
    assert record["format"] == "siclip-divergence-1" and record["unit"] == "nats"
    assert text["rows_read"] == report.groups["text.transformer"]["rows"] < text["rows_total"] == 3 * 16
    assert {p["strategy"] for p in text["plans"]} == {"none", "adjacent", "threshold", "optimal"}
    threshold = next(p for p in text["plans"] if p["strategy"] == "threshold")
    assert isinstance(threshold["threshold"], float) and all(isinstance(g, list) for g in threshold["groups"])
    assert sorted(record["heatmaps"]) == sorted(p.name for p in out.glob("*.png")) and len(record["heatmaps"]) == 2 * len(record["stacks"])


@pytest.mark.slow  # four commands that each measure, write heatmaps, convert and check the reload: ≈ 15 s on a quiet machine
def test_divergence_and_convert_take_converted_files_and_siclip_checkpoints(tmp_path, inputs, digits_checkpoint):
    from siclip.commands.convert import main as convert
    from siclip.commands.divergence import main as divergence
    from siclip.models import load_checkpoint

    hf = save_hf_clip(tmp_path / "hf", "clip", seed=3)
    files = ["--calibration-captions", str(inputs / "captions.txt"), "--calibration-images", str(inputs / "photos")]
    assert convert(["--model", f"hf:{hf}", *files, "--stacks", "vision_model.encoder.layers", "--out", str(tmp_path / "a.pt")]) == 0
    assert divergence(["--model", str(tmp_path / "a.pt"), *files, "--out", str(tmp_path / "div")]) == 0  # a converted file
    stacks = json.loads((tmp_path / "div" / "divergence.json").read_text())["stacks"]
    assert set(stacks) == {"text_model.encoder.layers", "vision_model.encoder.layers"}
    assert convert(["--model", str(tmp_path / "a.pt"), *files, "--sharing", "adjacent", "--stacks", "text_model.encoder.layers",
                    "--out", str(tmp_path / "b.pt")]) == 0  # its other stack converted and shared  # fmt: skip
    from siclip.interop.converted import load_converted

    model, recipe = load_converted(tmp_path / "b.pt")
    assert len(recipe.blocks) == 4 and recipe.sharing["text_model.encoder.layers"]["groups"] == [[0, 1]]
    assert model.text_model.encoder.layers[0] is model.text_model.encoder.layers[1]
    assert convert(["--model", str(digits_checkpoint), *files, "--sharing", "optimal", "--out", str(tmp_path / "siclip.pt")]) == 0
    student = load_checkpoint(tmp_path / "siclip.pt")  # a measured plan rebuilds from the divergences saved with it
    assert student.config.siclip is not None and student.config.siclip.sharing == "optimal"


@pytest.mark.parametrize("argv, problem", [
    (["--model", "mobileclip_tiny", "--snapshots", "3"], "--snapshots: only with --preset"),
    (["--preset", "demo", "--calibration-captions", "{captions}"], "--calibration-captions: not with --preset"),
    (["--model", "{exported}"], "an exported ONNX model has no blocks to read"),
    (["--model", "timm:vit_tiny_patch16_224:{missing}"], "weights file .* not found"),
    (["--calibration-count", "5"], "give --model SPEC"),
    (["--model", "hf:{folder}"], "another library's model .* give --calibration-captions FILE and/or --calibration-images DIR"),
])  # fmt: skip
def test_divergence_refuses_bad_flags_before_any_model_loads(tmp_path, inputs, capsys, monkeypatch, argv, problem):
    from siclip.commands import divergence

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "siclip_onnx.json").write_text("{}")
    monkeypatch.setattr("siclip.interop.calibration.load_for_calibration", lambda *a, **k: pytest.fail("a model was loaded"))
    files = {"captions": inputs / "captions.txt", "exported": tmp_path / "onnx", "missing": tmp_path / "none.pt", "folder": tmp_path}
    with pytest.raises(SystemExit) as ended:
        divergence.main([a.format(**files) for a in argv] + ["--out", str(tmp_path / "out")])
    assert ended.value.code == 2
    import re

    assert re.search(problem, capsys.readouterr().err)


def test_convert_refuses_bad_flag_combinations(tmp_path, capsys):
    from siclip.commands.convert import main

    for argv, problem in ((["--sharing", "adjacent", "--threshold", "0.1"], "--threshold is the threshold of --sharing threshold"),
                          (["--sharing", "threshold"], "--sharing threshold needs --threshold"),
                          (["--sharing", "adjacent", "--max-groups", "2"], "--max-groups is the number of runs of --sharing optimal")):  # fmt: skip
        with pytest.raises(SystemExit) as ended:
            main(["--model", "mobileclip_tiny", "--out", str(tmp_path / "x.pt"), *argv])
        assert ended.value.code == 2 and problem in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--calibration-captions" in help_text and "--captions" not in help_text.replace("--calibration-captions", "")
    assert "--count" not in help_text.replace("--calibration-count", "") and "--images" not in help_text.replace("--calibration-images", "")


# ── row 9: the teacher's tokenizer by default ───────────────────────────────────────────────────────────────────────


def test_an_hf_teacher_lends_its_tokenizer_by_default(tmp_path, inputs):
    """README and --help: the tokenizer is the teacher's when there is one; with --teacher hf:DIR the embedded tokenizer
    was chosen and refused at 51.5 % <unk>. Now the student reads the teacher's BPE, its vocabulary and context."""
    from siclip.data.tokenizer import tokenizer_from_spec
    from siclip.models import get_model_config
    from siclip.train import DataConfig, TrainConfig, build_task
    from siclip.train.inputs import prepare_run, save_tokenizer

    directory = save_hf_clip(tmp_path / "hf", "clip", seed=1)
    config = TrainConfig(model="mobileclip_tiny", out_dir=str(tmp_path / "run"), evaluate=False, teacher=f"hf:{directory}",
                         data=DataConfig(source=str(inputs / "train.csv"), batch_size=8))  # fmt: skip
    run = prepare_run(config, get_model_config("mobileclip_tiny"))
    teacher = load_clip(f"hf:{directory}")
    assert run.tokenizer.name == teacher.tokenizer.name == "hf:CLIPTokenizer" and run.unknown_rate == 0.0 and run.teacher_tokenizer is None
    captions = ["a photo of the digit seven"]
    assert torch.equal(run.tokenizer(captions), teacher.tokenizer(captions))
    saved = tokenizer_from_spec(json.loads(save_tokenizer(config, run.tokenizer).read_text()))
    assert torch.equal(saved(captions), teacher.tokenizer(captions))
    task = build_task(config, run)
    text = task.student.config.text
    assert text.vocab_size == 49408 and text.context_length == 32  # the teacher pads to 16: the student's 32 positions hold them
    with torch.no_grad():
        assert task.student.encode_text(run.tokenizer(captions)).shape == (1, task.student.config.embed_dim)
