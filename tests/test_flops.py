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
