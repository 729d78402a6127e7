import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from siclip.data import Preprocess
from siclip.analysis.divergence import (
    attention_probabilities,
    block_divergences,
    calibration_images,
    image_divergences,
    js_divergence,
    plot_heatmap,
    sharing_plans,
    text_divergences,
)
from siclip.blocks import PreLNBlock, SASPBlock, SharingPlan, apply_sharing
from siclip.models import create_model


def test_js_matches_scipy_and_its_properties(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(7), size=20)
    q = rng.dirichlet(np.ones(7), size=20)
    p[0, :3] = 0
    p[0] /= p[0].sum()  # zeros: 0·log 0 = 0
    ours = js_divergence(torch.from_numpy(p), torch.from_numpy(q)).numpy()
    expected = jensenshannon(p, q, axis=-1) ** 2  # scipy returns the distance, the square root
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(js_divergence(torch.from_numpy(q), torch.from_numpy(p)), torch.from_numpy(ours))
    assert js_divergence(torch.from_numpy(p), torch.from_numpy(p)).abs().max() < 1e-12
    disjoint = js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item()
    assert disjoint == pytest.approx(math.log(2))


@pytest.mark.parametrize("cls", [PreLNBlock, SASPBlock])
def test_attention_probabilities_are_the_blocks_softmax(seed, cls):
    block = cls(16, 2, zero_query=False) if cls is SASPBlock else cls(16, 2)
    x = torch.randn(3, 5, 16)
    probs = attention_probabilities(block, x)
    assert probs.shape == (3, 2, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 5))
    if cls is PreLNBlock:
        q, k, _ = block.attn.qkv(block.norm1(x)).chunk(3, -1)
        q, k = q.view(3, 5, 2, 8).transpose(1, 2), k.view(3, 5, 2, 8).transpose(1, 2)
        torch.testing.assert_close(probs, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1))


def test_divergences_of_a_stack_with_shared_blocks(seed):
    blocks = nn.ModuleList(PreLNBlock(16, 2) for _ in range(4))
    apply_sharing(blocks, SharingPlan.from_sizes([2, 2]))
    x = torch.randn(2, 6, 16)

    def run():
        y = x
        for block in blocks:
            y = block(y)

    d = block_divergences(blocks, run)
    assert d["attention"].shape == (4, 4) and d["attention_per_head"].shape == (4, 4, 2)
    for m in (d["attention"], d["features"]):
        torch.testing.assert_close(m, m.T)
        assert m.diagonal().abs().max() == 0 and (m[~torch.eye(4, dtype=torch.bool)] > 0).all()
    torch.testing.assert_close(d["attention"], d["attention_per_head"].mean(-1))


def test_text_report_plans_and_heatmap(tmp_path, seed):
    model = create_model("siclip_tiny").eval()
    ids = torch.randint(1, 200, (3, 32))
    ids[:, 9] = 255
    d = text_divergences(model, ids)
    assert d["attention"].shape == (4, 4)
    plans = sharing_plans(d["attention"])
    assert plans["none"].num_groups == 4 and plans["adjacent"].groups == ((0, 1), (2, 3))
    assert any(k.startswith("optimal") and v.num_groups == 2 for k, v in plans.items())
    path = plot_heatmap(d["attention"], tmp_path / "heat.png", "attention")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_attention_divergences(seed):
    """Converted image blocks attend exactly as the MCi blocks they came from; blocks are compared over map positions."""
    from siclip.blocks import SASPConversion, convert_block
    from siclip.data import EmbeddedConfig, EmbeddedSource

    teacher = create_model("mobileclip_tiny").eval()
    with torch.no_grad():
        for p in teacher.visual.network[7].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    old = teacher.visual.network[7][0]
    new, _ = convert_block(old, SASPConversion())
    x = torch.randn(2, 128, 3, 4)
    probs = attention_probabilities(new.eval(), x)
    assert probs.shape == (2, 4, 12, 12)
    torch.testing.assert_close(probs, attention_probabilities(old, x))
    images = calibration_images(EmbeddedSource(EmbeddedConfig(num_val=4, image_size=64), "val"), 4, Preprocess(size=64))
    assert images.shape == (4, 3, 64, 64)
    student = create_model("siclip_tiny").eval()
    with torch.no_grad():  # a fresh SAS-P block has W_Q = 0 (uniform attention, zero divergence): give it queries
        for p in student.visual.network[7].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    for model in (teacher, student):
        d = image_divergences(model, images)
        assert d["attention"].shape == (2, 2) and d["attention_per_head"].shape == (2, 2, 4)
        torch.testing.assert_close(d["attention"], d["attention"].T)
        assert d["attention"][0, 0] == 0 and d["attention"][0, 1] > 0
    manual = js_divergence(*(p.double() for p in _stage_probabilities(teacher, images))).mean(dim=(0, 2))
    torch.testing.assert_close(image_divergences(teacher, images)["attention_per_head"][0, 1], manual)


@torch.no_grad()  # as image_divergences runs the model: CPU inference takes the explicit attention path
def _stage_probabilities(model, images):
    """The attention rows of both image blocks, read by running the stage block by block."""
    visual = model.visual
    x = nn.Sequential(visual.patch_embed, *visual.network[:7])(images)
    first, second = visual.network[7]
    return attention_probabilities(first, x), attention_probabilities(second, first(x))


@pytest.mark.slow
def test_report_scripts_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "experiments" / "divergence_report.py"), "--model", "siclip_tiny",
                          "--calibration-count", "8", "--out", str(tmp_path)], check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "| text.transformer | adjacent |  | [0,1] [2,3] |" in out and "| visual.network.7 | 0-1 |" in out
    assert "8 captions and images of the embedded world's validation split" in out
    assert (tmp_path / "divergence_visual_network_7_attention.png").exists()
    assert (tmp_path / "divergence_text_transformer_attention.png").exists() and (tmp_path / "divergence.json").exists()
    out = subprocess.run([sys.executable, str(root / "experiments" / "flops_report.py"), "--out", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert "| siclip_s0 | 44,858,793 |" in out and (tmp_path / "flops.csv").exists()
