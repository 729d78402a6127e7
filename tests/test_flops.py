import pytest
import torch

from siclip.analysis.flops import clip_inputs, model_report, reference_flops, total_flops
from siclip.blocks import PreLNBlock, SASPBlock
from siclip.models import create_model, reparameterize_model


def _explicit(block):
    """The same block computing attention with explicit matmuls, which FlopCounterMode sees on a CPU."""
    if isinstance(block, PreLNBlock):
        block.attn.fused_attn = False
    else:
        block.attn.shaped.backend = "math"
    return block


@pytest.mark.parametrize("cls", [PreLNBlock, SASPBlock])
def test_fvcore_counts_attention_like_flop_counter_mode(cls):
    block = cls(64, 4).eval()
    x = torch.randn(2, 50, 64)
    fused = total_flops(block, (x,))
    expected = reference_flops(_explicit(block), x)
    assert fused == expected
    attention = 2 * 2 * 4 * 50 * 50 * (16 + 16)  # B·H·T²·(d_qk + d_v) multiply-adds, doubled
    assert fused > attention  # attention is counted, not skipped


def test_model_counts_match_the_reference_implementation():
    text_model = create_model("mobileclip_tiny").eval()
    for block in text_model.text.transformer:
        _explicit(block)
    images, ids = clip_inputs(text_model)
    assert total_flops(text_model.text, (ids,)) == reference_flops(text_model.text, ids)
    report = model_report(reparameterize_model(create_model("mobileclip_s0").eval()))
    # Measured with the reference MobileCLIP code and FlopCounterMode (shared/notes): 4.77 and 2.64 GFLOPs.
    assert report["gflops_text"] == pytest.approx(2.64, abs=0.005)
    assert report["gflops_image"] == pytest.approx(4.77, abs=0.02)
    assert report["params_total"] == 53_792_065


def _flop_counter(fn) -> int:
    """FLOPs of ``fn()`` as PyTorch's FlopCounterMode counts them (with siclip's CPU attention mapping)."""
    from torch.utils.flop_counter import FlopCounterMode

    from siclip.analysis.flops import CPU_ATTENTION_FLOPS

    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


def _step(module, x):
    """Forward and backward of ``module`` on ``x``, as a training step runs it (the gradient of a sum of outputs)."""
    def run():
        y = module(x)
        y.backward(torch.ones_like(y))

    return run


def test_per_module_flops_with_backward_add_up_and_match_flop_counter_mode(seed):
    """Issue 33 row 10: with backward=True a two-layer MLP's last layer got its forward only (2.05e-5 against 6.1e-5) and
    a toy ViT's modules summed to 0.079 of a 0.113 total. Each module is its forward and its own backward: the first
    layer computes no gradient for the data, the later ones do, and the parts add up to FlopCounterMode's total."""
    from torch import nn

    from siclip.analysis.flops import OUTSIDE

    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    report = model_report(mlp, x, backward=True)
    by_module = {k: round(v * 1e9) for k, v in report["gflops_by_module"].items()}
    first = _flop_counter(_step(nn.Linear(16, 32), x))  # its input needs no gradient: forward and weight gradient
    last = _flop_counter(_step(nn.Linear(32, 8), torch.randn(4, 32, requires_grad=True)))  # forward, weight and input gradients
    assert by_module == {"0": first, "2": last} and last == 3 * 2 * 4 * 32 * 8
    assert round(report["gflops"] * 1e9) == _flop_counter(_step(mlp, x)) == first + last

    class ToyViT(nn.Module):
        def __init__(self, dim=32, heads=4):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 8, stride=8)
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True) for _ in range(2))
            self.head = nn.Parameter(torch.randn(dim, 10))

        def forward(self, images):
            x = self.patch(images).flatten(2).transpose(1, 2)
            for block in self.blocks:
                x = block(x)
            return x.mean(1) @ self.head  # the model's own product, outside its modules

    vit = ToyViT()
    images = torch.randn(2, 3, 32, 32)
    report = model_report(vit, images, backward=True)
    parts = {k: round(v * 1e9) for k, v in report["gflops_by_module"].items()}
    total = _flop_counter(_step(vit.train(), images))
    assert round(report["gflops"] * 1e9) == total == sum(parts.values()) and set(parts) == {"patch", "blocks", OUTSIDE}
    assert parts["patch"] == _flop_counter(_step(vit.patch, images))
    tokens = torch.randn(2, 16, 32, requires_grad=True)
    assert parts["blocks"] == 2 * _flop_counter(_step(vit.blocks[0], tokens))  # each block: forward, weights' and input's gradients
    forward = model_report(vit, images)
    assert sum(forward["gflops_by_module"].values()) == pytest.approx(forward["gflops"], rel=1e-12) and forward["gflops"] < report["gflops"] / 2


def test_model_report_is_a_table_and_json_and_refuses_a_module_without_inputs(tmp_path):
    import json

    from torch import nn

    report = model_report(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), torch.randn(3, 4))
    assert report["params"] == 4 * 8 + 8 + 8 * 2 + 2 and dict(report)["model"] == "Sequential"  # read as the dict it was
    assert "| params | 58 |" in str(report) and "| module | GFLOPs | share |" in str(report)
    saved = json.loads(report.save(tmp_path / "flops.json").read_text())
    assert saved["gflops_by_module"] == report["gflops_by_module"]
    with pytest.raises(TypeError, match="a Sequential needs the inputs it is called with: model_report\\(model, inputs\\)"):
        model_report(nn.Sequential(nn.Linear(2, 2)))
