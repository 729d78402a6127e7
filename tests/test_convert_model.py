"""Your model, simplified, from the command line (issue 22): convert_model.py on a transformers CLIP directory, an
open_clip architecture + weights file and a timm name + weights file (real classes, small random sizes), the saved
file reloading to the same model, divergence_report.py --model, and the paper's recipe: the converted CLIP trains
against its unconverted original as teacher (WI + WIKD + PM) and evaluate.py scores it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_image

from foreign_models import save_hf_clip, save_open_clip
from siclip.interop import load_clip
from siclip.interop.converted import ConvertedRecipe, calibration_run, convert, load_converted, load_original, save_converted

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Calibration captions and real photos, a digits training CSV and a held-out class folder."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "photos").mkdir()
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(root / "photos" / name)
    (root / "captions.txt").write_text("a photo of the digit seven\na red circle\nthis is a large drawing\n")
    digits = load_digits()
    rows = ["filepath,title"]
    for i in range(64):
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a photo of the digit {NAMES[digits.target[i]]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(64, 84):
        path = root / "test" / NAMES[digits.target[i]] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(path)
    (root / "templates.txt").write_text("a photo of the digit {}\n")
    return root


def _run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def _same_outputs(spec, recipe_path, inputs_dir):
    from siclip.data.sources import read_image_folder

    model, recipe = load_converted(recipe_path)
    captions = (inputs_dir / "captions.txt").read_text().splitlines()
    run = calibration_run(spec, load_original(spec), captions, read_image_folder(inputs_dir / "photos"))
    return model, recipe, run


@pytest.mark.slow
def test_convert_model_on_a_transformers_clip_directory(tmp_path, inputs):
    spec = f"hf:{save_hf_clip(tmp_path / 'hf', 'clip', seed=2)}"
    out = tmp_path / "converted.pt"
    done = _run(ROOT / "experiments" / "convert_model.py", "--model", spec, "--calibration-captions", inputs / "captions.txt",
                "--calibration-images", inputs / "photos", "--sharing", "optimal", "--max-groups", "1", "--out", out, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloads to the same model (max |Δ| of the outputs on your inputs: 0.0e+00)" in done.stdout
    assert "| text_model.encoder.layers | 0-1 |" in done.stdout and "dropped" in done.stdout and "| converted |" in done.stdout
    report = json.loads((tmp_path / "converted_report" / "divergence.json").read_text())
    assert set(report["stacks"]) == {"text_model.encoder.layers", "vision_model.encoder.layers"}
    model, recipe = load_converted(out)
    assert recipe.sharing["text_model.encoder.layers"] == {"groups": [[0, 1]], "scope": "block"}
    layers = model.text_model.encoder.layers
    assert layers[0] is layers[1] and type(layers[0]).__name__ == "SASPCLIPEncoderLayer"  # one block, two positions
    loaded = load_clip(out)  # as a CLIP: its original's tokenizer and preprocessing
    assert loaded.model.preprocess.size == 32 and loaded.tokenizer.vocab_size == 49408
    payload = torch.load(out, weights_only=True)  # data only: a pickle with code would not load this way
    assert payload["format"] == "siclip-converted-1" and payload["origin"] == spec


def test_open_clip_and_timm_models_save_and_reload_to_the_same_outputs(tmp_path, inputs, seed):
    timm = pytest.importorskip("timm")
    config, weights = save_open_clip(tmp_path / "oc", seed=seed % 1000)
    arguments = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **arguments)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    (tmp_path / "vit.json").write_text(json.dumps({"name": "vit_tiny_patch16_224", "kwargs": arguments}))
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224 .* give the arguments it was built with"):
        load_original(f"timm:vit_tiny_patch16_224:{tmp_path / 'vit.pt'}")
    for spec, blocks in ((f"open_clip:{config}:{weights}", ["transformer.resblocks.0", "transformer.resblocks.1", "visual.transformer.resblocks.0"]),
                         (f"timm:{tmp_path / 'vit.json'}:{tmp_path / 'vit.pt'}", ["blocks.0", "blocks.1"])):  # fmt: skip
        original = load_original(spec)
        from siclip.interop.converted import architecture_of, original_preprocess

        recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, original), blocks=blocks,
                                 sharing={blocks[0].rsplit(".", 1)[0]: {"groups": [[0, 1]], "scope": "attention"}},
                                 preprocess=original_preprocess(spec, original).to_dict())  # fmt: skip
        convert(original, recipe)
        path = save_converted(original, recipe, tmp_path / f"{spec.split(':')[0]}.pt")
        reloaded, again = load_converted(path)
        from dataclasses import replace

        from siclip.interop.converted import resolve_origin

        # stored with its origin's paths absolute and the original's tokenizer (open_clip's; a timm model reads no text)
        assert again == replace(recipe, origin=resolve_origin(spec), tokenizer=again.tokenizer)
        assert (again.tokenizer or {}).get("name") == ("open_clip" if spec.startswith("open_clip") else None)
        from siclip.data.sources import read_image_folder

        captions = (inputs / "captions.txt").read_text().splitlines()
        run = calibration_run(spec, original, captions, read_image_folder(inputs / "photos"))
        with torch.no_grad():
            first, second = run(original.eval()), run(reloaded)
        for a, b in zip(first if isinstance(first, tuple) else (first,), second if isinstance(second, tuple) else (second,)):
            assert torch.equal(a, b), spec
        stack = reloaded.get_submodule(blocks[0].rsplit(".", 1)[0])
        assert stack[0].sasp.attn is stack[1].sasp.attn  # attention scope: W_Q, W_K and gains shared


@pytest.mark.slow
def test_divergence_report_reads_a_model_before_conversion(tmp_path, inputs):
    config, weights = save_open_clip(tmp_path / "oc", seed=5)
    done = _run(ROOT / "experiments" / "divergence_report.py", "--model", f"open_clip:{config}:{weights}", "--calibration-captions",
                inputs / "captions.txt", "--calibration-images", inputs / "photos", "--out", tmp_path / "report", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| transformer.resblocks | 0-1 |" in done.stdout and (tmp_path / "report" / "divergence.json").is_file()
    assert len(list((tmp_path / "report").glob("*.png"))) == 4


@pytest.mark.slow
def test_the_papers_recipe_on_a_transformers_clip(tmp_path, inputs):
    """A converted CLIP trains as a SiCLIP student against its unconverted original (WI + WIKD + PM): only its SAS-P
    blocks train; evaluate.py scores the result like any model."""
    spec = f"hf:{save_hf_clip(tmp_path / 'hf', 'clip', seed=4)}"
    converted = tmp_path / "converted.pt"
    done = _run(ROOT / "experiments" / "convert_model.py", "--model", spec, "--calibration-captions", inputs / "captions.txt",
                "--calibration-images", inputs / "photos", "--sharing", "adjacent", "--out", converted, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "student"
    train = _run(ROOT / "experiments" / "train.py", "--model", converted, "--teacher", spec, "--wikd", "--data", inputs / "train.csv",
                 "--batch-size", "16", "--epochs", "1", "--zeroshot", inputs / "test", "--templates", inputs / "templates.txt",
                 "--out", out, cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"clip", "feature", "relation", "interactive", "pair_matching"} <= set(summary["final_loss"]) and summary["steps"] == 4
    before, _ = load_converted(converted)
    after, _ = load_converted(out / "model.pt")
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))}
    assert changed and all(".sasp." in n for n in changed)  # weight inheritance: only the SAS-P blocks trained
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 10
    scored = _run(ROOT / "experiments" / "evaluate.py", "--model", out / "model.pt", "--zeroshot", inputs / "test", "--templates",
                  inputs / "templates.txt", "--out", tmp_path / "eval", cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    record = json.loads((tmp_path / "eval" / "test_zeroshot_classification.json").read_text())
    assert record["metrics"]["acc1"] == pytest.approx(summary["eval"]["test/acc1"])
