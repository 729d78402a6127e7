"""Any CLIP as a teacher or under evaluation (issue 23): transformers' CLIPModel and SiglipModel and open_clip's CLIP,
the real classes at small random sizes, through siclip's adapter, the model specs and the command line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from foreign_models import save_hf_clip, save_open_clip
from siclip.data import Preprocess
from siclip.interop import as_clip, load_clip, require

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a photo of a cat", "a red circle", "this is a large blue square drawing"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_hf_clip(root / kind, kind, seed=3) for kind in ("clip", "siglip")}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    return save_open_clip(tmp_path_factory.mktemp("open_clip"), seed=4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_features_equal_the_librarys_own_forward(hf_dirs, kind, seed):
    import transformers

    loaded = load_clip(f"hf:{hf_dirs[kind]}")
    reference = transformers.AutoModel.from_pretrained(hf_dirs[kind]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dirs[kind])
    pixels = torch.randn(3, 3, 32, 32)
    inputs = tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")

    def features(out):
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(pixels), features(reference.get_image_features(pixel_values=pixels)),
                                   rtol=0, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(loaded.model.encode_text(loaded.tokenizer(TEXTS)), features(reference.get_text_features(**inputs)),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert torch.equal(loaded.tokenizer(TEXTS), inputs["input_ids"])
    assert torch.equal(loaded.tokenizer.attention_mask(inputs["input_ids"]), inputs["attention_mask"])
    assert loaded.model.scale().item() == pytest.approx(reference.logit_scale.exp().item())
    expected = {"clip": Preprocess(size=32, resize=32, interpolation="bicubic", crop_rounding="floor"),
                "siglip": Preprocess(size=32, resize=32, resize_mode="squash", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                                     crop_rounding="floor")}  # fmt: skip
    assert loaded.model.preprocess == expected[kind] and not loaded.is_siclip


def test_open_clip_features_equal_the_librarys_own_forward(open_clip_files, seed):
    import open_clip

    config, weights = open_clip_files
    loaded = load_clip(f"open_clip:{config}:{weights}")
    reference = open_clip.CLIP(**__import__("json").loads(config.read_text())).eval()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS, context_length=16)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(pixels), F.normalize(reference.encode_image(pixels), dim=-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.model.encode_text(loaded.tokenizer(TEXTS)), F.normalize(reference.encode_text(ids), dim=-1),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert loaded.model.preprocess.size == 32 and loaded.model.preprocess.interpolation == "bicubic"
    wrapped = as_clip(reference, tokenizer=open_clip.get_tokenizer("ViT-B-32"))  # a built model object, in Python
    with torch.no_grad():
        torch.testing.assert_close(wrapped.model.encode_image(pixels), loaded.model.encode_image(pixels), rtol=0, atol=1e-6)


def test_specs_refuse_clearly(tmp_path, hf_dirs, open_clip_files):
    with pytest.raises(ImportError, match="pip install not-a-package"):
        require("siclip_no_such_module", "not-a-package", "a test")
    with pytest.raises(FileNotFoundError, match="not a transformers model directory"):
        load_clip(f"hf:{tmp_path}")
    config, weights = open_clip_files
    with pytest.raises(FileNotFoundError, match="weights file .* not found"):
        load_clip(f"open_clip:{config}:{tmp_path / 'none.pt'}")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip(f"open_clip:NoSuchArch:{weights}")
    with pytest.raises(ValueError, match="Hugging Face hub"):
        load_clip(f"open_clip:ViT-B-16-SigLIP:{weights}")
    with pytest.raises(TypeError, match="no CLIP adapter for Linear"):
        as_clip(torch.nn.Linear(2, 2))
    (tmp_path / "nodir").mkdir()
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(hf_dirs["clip"], partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        load_clip(f"hf:{partial}")


def _digits(root: Path) -> dict:
    """A tiny training CSV and a two-class test folder of real scans (scikit-learn's digits)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["zero", "one"]
    rows = ["filepath,title"]
    for i in range(64):
        label = int(digits.target[i]) % 2
        path = root / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(path)
        rows.append(f"img/{i}.png,a photo of the digit {names[label]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(64, 70):
        path = root / "test" / names[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(path)
    (root / "templates.txt").write_text("a photo of the digit {}\n")
    return {"train": root / "train.csv", "test": root / "test", "templates": root / "templates.txt"}


def _run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_hf_and_open_clip_teachers_train_a_siclip_student_and_are_evaluated(tmp_path, hf_dirs, open_clip_files):
    """The commands of the README: a SiCLIP student distils from a transformers and from an open_clip teacher (from scratch:
    nothing to inherit), and evaluate.py scores the teachers themselves on the same benchmark."""
    files = _digits(tmp_path)
    config, weights = open_clip_files
    for name, spec in (("hf", f"hf:{hf_dirs['clip']}"), ("open_clip", f"open_clip:{config}:{weights}")):
        out = tmp_path / f"student_{name}"
        train = _run(ROOT / "experiments/train.py", "--model", "siclip_tiny", "--teacher", spec, "--no-inherit", "--wikd",
                     "--data", files["train"], "--tokenizer", "words", "--image-size", "48", "--batch-size", "16", "--epochs", "1",
                     "--zeroshot", files["test"], "--templates", files["templates"], "--out", out, cwd=tmp_path)  # fmt: skip
        assert train.returncode == 0, train.stderr[-3000:]
        metrics = __import__("json").loads((out / "summary.json").read_text())
        assert {"feature", "relation", "interactive", "pair_matching"} <= set(metrics["final_loss"]) and metrics["steps"] == 4
        scored = _run(ROOT / "experiments/evaluate.py", "--model", spec, "--zeroshot", files["test"], "--templates", files["templates"],
                      "--out", tmp_path / f"eval_{name}", cwd=tmp_path)  # fmt: skip
        assert scored.returncode == 0, scored.stderr[-3000:]
        assert (tmp_path / f"eval_{name}" / "test_zeroshot_classification.json").is_file()
    refused = _run(ROOT / "experiments/train.py", "--model", "siclip_tiny", "--teacher", f"hf:{hf_dirs['clip']}", "--wikd",
                   "--data", files["train"], "--tokenizer", "words", "--out", tmp_path / "refused", "--no-eval", cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0 and "inherits weights (WI) only from a siclip MobileCLIP teacher" in refused.stderr
