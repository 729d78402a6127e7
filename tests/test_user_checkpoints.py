"""Apple's MobileCLIP-S0 layout from the command line: detection, conversion, errors in the file's own names."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siclip.models import (
    apple_key_to_siclip, create_model, load_checkpoint, load_model, save_checkpoint, siclip_key_to_apple, to_apple_state_dict,
)  # fmt: skip

ROOT = Path(__file__).parent.parent
SPEC = json.loads((ROOT / "tests/data/mobileclip_s0_state_dict.json").read_text())["keys"]


def test_inverse_key_mapping_round_trips_every_apple_key():
    for key in SPEC:
        assert siclip_key_to_apple(apple_key_to_siclip(key)) == key


def test_apple_layout_export_has_every_key_and_shape_of_the_release():
    exported = to_apple_state_dict(create_model("mobileclip_s0"))
    assert {k: list(v.shape) for k, v in exported.items()} == SPEC


@pytest.fixture(scope="module")
def apple_file(tmp_path_factory):
    """A random-weight file in the layout of Apple's mobileclip_s0.pt, and the model it was made from."""
    model = create_model("mobileclip_s0").eval()
    path = tmp_path_factory.mktemp("apple") / "mobileclip_s0.pt"
    torch.save(to_apple_state_dict(model), path)
    return path, model


def test_load_model_detects_both_formats(apple_file, tmp_path, seed):
    path, reference = apple_file
    model, tokenizer = load_model(path)
    assert tokenizer is None and model.config.name == "mobileclip_s0"
    ids = torch.randint(1, 49000, (2, 77))
    ids[:, 9] = 49407
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), reference.encode_text(ids))
    tiny = create_model("mobileclip_tiny")
    ours = save_checkpoint(tiny, tmp_path / "tiny.pt", tokenizer={"name": "embedded", "context_length": 32})
    again, spec = load_model(ours)
    assert spec == {"name": "embedded", "context_length": 32} and again.config == tiny.config
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: neither a siclip checkpoint nor .*Apple.*\['weights'\]"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pt \(4 bytes\) is not a PyTorch weights file: it holds text; pass Apple's"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt") as missing:
        load_model(tmp_path / "nope.pt")
    assert "registered architecture" not in str(missing.value)
    with pytest.raises(FileNotFoundError, match=r"siclip_s0 names a registered architecture.*trained checkpoint"):
        load_model("siclip_s0")  # what a new user tries first with evaluate.py --model


def test_broken_apple_file_names_keys_as_in_the_file(apple_file, tmp_path):
    state = torch.load(apple_file[0], weights_only=True)
    del state["text_encoder.embedding_layer.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"(?s)broken\.pt does not match.*missing keys: text_encoder\.embedding_layer\.weight"):
        load_model(tmp_path / "broken.pt")


@pytest.mark.slow
def test_import_mobileclip_cli_converts_to_a_siclip_checkpoint(apple_file, tmp_path):
    path, reference = apple_file
    out = tmp_path / "s0.pt"
    run = subprocess.run([sys.executable, "experiments/import_mobileclip.py", "--model", str(path), "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    converted = load_checkpoint(out)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, msg=name)
    assert "clip" in run.stdout and str(out) in run.stdout
