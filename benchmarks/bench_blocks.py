"""pytest-benchmark suite (CPU, small sizes): SAS-P against Pre-LN, shaped attention against SDPA.

    make bench                      # timed, sorted by name
    pytest benchmarks --benchmark-compare

Compare rows of one run only; absolute CPU times carry no claim about GPUs.
"""

import pytest
import torch

from siclip.analysis.benchmark import compare_attention, forward_backward_step, make_block
from siclip.blocks import shaped_attention

SHAPES = {"d128-t64-b32": (128, 4, 64, 32), "d256-t77-b16": (256, 8, 77, 16)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["pre_ln", "sasp"])
def test_block_forward_backward(benchmark, kind, shape):
    dim, heads, tokens, batch = SHAPES[shape]
    torch.manual_seed(0)
    block = make_block(kind, dim, heads)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    benchmark.group = f"block {shape}"
    benchmark(forward_backward_step(block, x, torch.float32))
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("tokens", [64, 256])
@pytest.mark.parametrize("kind", ["sdpa", "shaped"])
def test_attention_forward_backward(benchmark, kind, tokens):
    batch = 4096 // tokens
    q, k, v = (torch.randn(batch, 8, tokens, 64, requires_grad=True) for _ in range(3))
    ones = torch.ones(8)

    def step():
        if kind == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = shaped_attention(q, k, v, ones, ones, ones)
        out.sum().backward()

    benchmark.group = f"attention t{tokens}"
    benchmark(step)


def test_compare_attention_rows_are_complete():
    rows = compare_attention([16], batch_tokens=64, heads=2, head_dim=8, steps=1, warmup=0, progress=False)
    assert rows[0]["batch"] == 4 and rows[0]["shaped_ms"] > 0 and rows[0]["sdpa_ms"] > 0
