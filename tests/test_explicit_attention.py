"""The explicit attention path a CPU takes without autograd (``siclip.blocks.backends.explicit_is_faster``):
A = β·P + α·I − γ·C shaped in the softmax's own storage, then one product A·V in V's layout."""

import pytest
import torch

from siclip.analysis.traffic import trace_traffic
from siclip.blocks import Attention, SASPBlock2d, shaped_attention, shaped_attention_reference
from siclip.blocks import backends
from siclip.blocks.backends import CPU_EXPLICIT_SCORES, resolve_backend
from siclip.models.fastvit import ConvFFN

from helpers import padding_mask, randomized, reference_sasp2d

FLASH = "_scaled_dot_product_flash_attention_for_cpu"
MASKINGS = [(False, False), (False, True), (True, False), (True, True)]  # (causal, padded)


def _qkv_gains(batch=2, heads=3, tokens=9, head_dim=5):
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=torch.float64) for _ in range(3))
    gains = [torch.rand(heads, dtype=torch.float64) + 0.5 for _ in range(3)]
    return q, k, v, gains


def _ops(fn) -> list[str]:
    return [o.op for o in trace_traffic(fn)]


@pytest.mark.parametrize("causal,padded", MASKINGS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_auto_shapes_the_explicit_matrix_without_autograd(seed, causal, padded, mode):
    q, k, v, gains = _qkv_gains()
    mask = padding_mask(2, 9) if padded else None
    inputs = [t.clone() for t in (q, k, v, *gains)]
    ref = shaped_attention_reference(q, k, v, *gains, causal=causal, key_padding_mask=mask)
    with mode():
        ops = _ops(lambda: shaped_attention(q, k, v, *gains, causal=causal, key_padding_mask=mask))
        out = shaped_attention(q, k, v, *gains, causal=causal, key_padding_mask=mask)
    assert FLASH not in ops and {"softmax", "_softmax"} & set(ops)  # inference mode dispatches the composite
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for before, after in zip(inputs, (q, k, v, *gains)):  # the shaping writes into the softmax only
        assert torch.equal(before, after)


def test_autograd_or_many_scores_keep_sdpa(seed):
    """With a graph to record, or once the scores outgrow the cache, the fused kernel runs as before."""
    q, k, v, gains = _qkv_gains()
    leaf = gains[0].clone().requires_grad_()
    assert FLASH in _ops(lambda: shaped_attention(q, k, v, leaf, *gains[1:]))
    with torch.no_grad():
        assert FLASH not in _ops(lambda: shaped_attention(q, k, v, leaf, *gains[1:]))  # no graph: explicit
        big = torch.randn(1, 1, 600, 4)  # 600² scores > CPU_EXPLICIT_SCORES
        assert FLASH in _ops(lambda: shaped_attention(big, big, big, 1.0, 1.0, 1.0))
    edge = 512  # 1 · 1 · 512² = CPU_EXPLICIT_SCORES scores
    assert edge * edge == CPU_EXPLICIT_SCORES
    assert resolve_backend("auto", torch.empty(1, 1, edge, 4), False, autograd=False) == "math"
    assert resolve_backend("auto", torch.empty(1, 1, edge + 1, 4), False, autograd=False) == "sdpa"
    assert resolve_backend("auto", torch.empty(1, 1, 8, 4), False, autograd=True) == "sdpa"
    assert resolve_backend("sdpa", torch.empty(1, 1, 8, 4), False, autograd=False) == "sdpa"  # named: obeyed
    # half precision keeps SDPA, whose kernel runs the softmax in float32
    assert resolve_backend("auto", torch.empty(1, 1, 8, 4, dtype=torch.bfloat16), False, autograd=False) == "sdpa"


def test_head_dim_major_values_give_head_dim_major_output(seed):
    """Values viewed from a channels-first map come back as one: (Vᵀ·Aᵀ)ᵀ, nothing copied into tokens."""
    q, k, _, gains = _qkv_gains()
    v = torch.randn(2, 3, 5, 9, dtype=torch.float64).transpose(-2, -1)  # (batch, heads, tokens, head_dim)
    with torch.no_grad():
        out = shaped_attention(q, k, v, *gains, causal=True)
    assert out.stride(-2) == 1 and out.transpose(-2, -1).is_contiguous()
    torch.testing.assert_close(out, shaped_attention_reference(q, k, v, *gains, causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal,padded", MASKINGS)
def test_softmax_attention_module_takes_the_same_path(seed, causal, padded):
    """MCi0's and MCt's attention get the explicit path under the same rule, so both model families are
    timed on the same kernels; its output equals the fused one."""
    attn = randomized(Attention(24, 3), seed, torch.float64)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    mask = padding_mask(2, 9) if padded else None
    fused = attn(x, causal=causal, key_padding_mask=mask)  # autograd: SDPA
    assert FLASH in _ops(lambda: attn(x, causal=causal, key_padding_mask=mask))
    with torch.no_grad():
        assert FLASH not in _ops(lambda: attn(x, causal=causal, key_padding_mask=mask))
        torch.testing.assert_close(attn(x, causal=causal, key_padding_mask=mask), fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sasp_block2d_inference_keeps_the_map_layout(seed, memory_format):
    block = randomized(SASPBlock2d(64, 4, ConvFFN(64, 192), zero_query=False), seed, torch.float64).eval()
    x = torch.randn(2, 64, 5, 6, dtype=torch.float64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        ops = _ops(lambda: block(x))
        attention, _ = block.forward_branches(x)
        out = block(x)
    assert FLASH not in ops
    assert attention.is_contiguous(memory_format=memory_format)  # channels-first tokens were never copied
    torch.testing.assert_close(out, reference_sasp2d(block, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal,padded", MASKINGS)
def test_a_batch_beyond_the_cache_runs_in_chunks(seed, causal, padded, monkeypatch):
    """Sequences are independent, so a batch whose scores outgrow the cache runs a few sequences per call:
    same values, V's layout kept, two products per chunk; the key-padding mask is sliced with the batch."""
    monkeypatch.setattr(backends, "CPU_EXPLICIT_SCORES", 2 * 3 * 9 * 9)  # two sequences of 3 heads × 9 tokens
    q, k, v, gains = _qkv_gains(batch=5)
    head_dim_major = v.transpose(-2, -1).contiguous().transpose(-2, -1)
    mask = padding_mask(5, 9) if padded else None
    ref = shaped_attention_reference(q, k, v, *gains, causal=causal, key_padding_mask=mask)
    with torch.no_grad():
        ops = _ops(lambda: shaped_attention(q, k, v, *gains, causal=causal, key_padding_mask=mask))
        for values in (v, head_dim_major):
            out = shaped_attention(q, k, values, *gains, causal=causal, key_padding_mask=mask)
            assert out.stride() == values.stride()
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert ops.count("bmm") == 2 * 3  # QKᵀ and A·V for sequences 0–1, 2–3 and 4

    attn = randomized(Attention(9, 3), seed, torch.float64)
    x = torch.randn(5, 9, 9, dtype=torch.float64)
    fused = attn(x, causal=causal, key_padding_mask=mask)
    with torch.no_grad():
        ops = _ops(lambda: attn(x, causal=causal, key_padding_mask=mask))
        torch.testing.assert_close(attn(x, causal=causal, key_padding_mask=mask), fused, rtol=1e-12, atol=1e-12)
    assert FLASH not in ops and ops.count("bmm") == 2 * 3
