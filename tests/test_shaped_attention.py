import warnings

import pytest
import torch

from siclip.blocks import ShapedAttention, centred_values, shaped_attention, shaped_attention_matrix
from siclip.blocks import shaped_attention_reference

from helpers import ShapeRecorder, padding_mask

MASKINGS = [(False, False), (False, True), (True, False), (True, True)]  # (causal, padded)


def _inputs(batch=2, heads=3, tokens=9, head_dim=5, dtype=torch.float64, requires_grad=False):
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    gains = [(torch.rand(heads, dtype=dtype) + 0.5).requires_grad_(requires_grad) for _ in range(3)]
    return q, k, v, gains


@pytest.mark.parametrize("causal,padded", MASKINGS)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_fast_path_matches_reference_forward_and_gradients(seed, causal, padded, backend):
    q, k, v, (a, b, g) = _inputs(requires_grad=True)
    mask = padding_mask(2, 9) if padded else None
    fast = shaped_attention(q, k, v, a, b, g, causal=causal, key_padding_mask=mask, backend=backend)
    ref = shaped_attention_reference(q, k, v, a, b, g, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, (q, k, v, a, b, g), upstream)
    grads_ref = torch.autograd.grad(ref, (q, k, v, a, b, g), upstream)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal,padded", MASKINGS)
def test_gradcheck(seed, causal, padded):
    q, k, v, (a, b, g) = _inputs(batch=2, heads=2, tokens=5, head_dim=3, requires_grad=True)
    mask = padding_mask(2, 5) if padded else None

    def fn(*args):
        return shaped_attention(*args, causal=causal, key_padding_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, a, b, g))


def test_reference_matrix_is_the_definition(seed):
    """C = softmax(M): rows uniform over visible keys; rows of A sum to α + β − γ."""
    q, k, _, (a, b, g) = _inputs()
    mask = padding_mask(2, 9)
    for causal in (False, True):
        zero = torch.zeros_like(q)
        centre = shaped_attention_matrix(zero, k, 0.0, 0.0, -1.0, causal=causal, key_padding_mask=mask)
        visible = ~mask[:, None, None, :]
        if causal:
            visible = visible & torch.ones(9, 9, dtype=torch.bool).tril()
        expected = visible / visible.sum(-1, keepdim=True)
        torch.testing.assert_close(centre, expected.to(centre.dtype).expand_as(centre))
        matrix = shaped_attention_matrix(q, k, a, b, g, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(matrix.sum(-1), (a + b - g)[None, :, None].expand(2, 3, 9))


@pytest.mark.parametrize("causal,padded", MASKINGS)
def test_identity_when_logits_vanish(seed, causal, padded):
    """A zero query makes softmax(·) = C, so with β = γ the matrix is α·I."""
    _, k, v, (a, b, _) = _inputs()
    mask = padding_mask(2, 9) if padded else None
    out = shaped_attention(torch.zeros_like(k), k, v, a, b, b, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, a[None, :, None, None] * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_centred_values_is_c_times_v(seed, causal):
    _, k, v, _ = _inputs()
    mask = padding_mask(2, 9)
    c = shaped_attention_matrix(torch.zeros_like(k), k, 0.0, 0.0, -1.0, causal=causal, key_padding_mask=mask)
    expected = c @ v
    got = centred_values(v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(got.expand_as(expected), expected)


@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False)])
def test_no_token_by_token_tensor_is_built(seed, causal, padded):
    """Forward and backward create no (T, T) tensor: I and C act on V directly, softmax is fused."""
    tokens = 37
    q, k, v, (a, b, g) = _inputs(tokens=tokens, dtype=torch.float32, requires_grad=True)
    mask = padding_mask(2, tokens) if padded else None
    with ShapeRecorder() as rec:
        shaped_attention(q, k, v, a, b, g, causal=causal, key_padding_mask=mask).sum().backward()
    quadratic = [(op, s) for op, s in rec.shapes if s[-2:] == (tokens, tokens)]
    assert not quadratic, quadratic


def test_bfloat16_close_to_float64(seed):
    q, k, v, (a, b, g) = _inputs(tokens=64, head_dim=16)
    ref = shaped_attention_reference(q, k, v, a, b, g, causal=True)
    low = shaped_attention(*(t.bfloat16() for t in (q, k, v, a, b, g)), causal=True)
    torch.testing.assert_close(low.double(), ref, rtol=0.05, atol=0.05)


def test_scalar_gains_broadcast_over_heads(seed):
    q, k, v, _ = _inputs()
    per_head = shaped_attention(q, k, v, torch.full((3,), 0.7), torch.full((3,), 1.2), torch.full((3,), 0.4))
    torch.testing.assert_close(per_head, shaped_attention(q, k, v, 0.7, 1.2, 0.4))


def test_module_starts_as_identity_and_gain_scales(seed):
    _, k, v, _ = _inputs(dtype=torch.float32)
    module = ShapedAttention(3)
    assert [p.shape for p in module.parameters()] == [(3,)] * 3
    torch.testing.assert_close(module(torch.zeros_like(k), k, v), v)
    q = torch.randn_like(k)
    torch.testing.assert_close(module(q, k, v, gain=torch.tensor(2.5)), 2.5 * module(q, k, v))


def test_xformers_on_cpu_falls_back_with_a_warning(seed):
    from siclip.blocks import backends

    q, k, v, (a, b, g) = _inputs(dtype=torch.float32)
    backends._warn_fallback.cache_clear()  # each fallback warns once per process: an earlier test may have seen it
    with pytest.warns(RuntimeWarning, match="CUDA only"):
        out = shaped_attention(q, k, v, a, b, g, backend="xformers")
    torch.testing.assert_close(out, shaped_attention(q, k, v, a, b, g))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, "batch, heads, tokens, head_dim"),
        (lambda q, k, v, m: (q, k[:, :, :5], v, m), ValueError, "same shape"),
        (lambda q, k, v, m: (q, k, v[:, :, :5], m), ValueError, "self-attention"),
        (lambda q, k, v, m: (q, k, v, m.int()), TypeError, "torch.bool"),
        (lambda q, k, v, m: (q, k, v, m[:, :5]), ValueError, r"\(batch, tokens\)"),
        (lambda q, k, v, m: (q, k, v, torch.ones_like(m)), ValueError, "no visible key"),
    ],
)
def test_bad_inputs_give_clear_errors(change, error, match):
    q, k, v, (a, b, g) = _inputs()
    q, k, v, mask = change(q, k, v, torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(error, match=match):
        shaped_attention(q, k, v, a, b, g, key_padding_mask=mask)


def test_bad_gains_backend_and_causal_padding():
    q, k, v, (a, b, g) = _inputs()
    with pytest.raises(ValueError, match=r"alpha must have shape \(heads,\)"):
        shaped_attention(q, k, v, torch.ones(4), b, g)
    with pytest.raises(ValueError, match="unknown attention backend"):
        shaped_attention(q, k, v, a, b, g, backend="flash9")
    left_padded = torch.zeros(2, 9, dtype=torch.bool)
    left_padded[1, :2] = True
    shaped_attention(q, k, v, a, b, g, key_padding_mask=left_padded)  # fine bidirectionally
    with pytest.raises(ValueError, match="preceded only by padded keys"):
        shaped_attention(q, k, v, a, b, g, causal=True, key_padding_mask=left_padded)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_half_precision_matches_reference(seed, backend, causal):
    """On CUDA, bf16 against the float64 reference; xformers may fall back to SDPA with a warning."""
    q, k, v, (a, b, g) = _inputs(batch=4, heads=8, tokens=77, head_dim=64)
    ref = shaped_attention_reference(q, k, v, a, b, g, causal=causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = shaped_attention(*(t.cuda().bfloat16() for t in (q, k, v, a, b, g)), causal=causal, backend=backend)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0.05, atol=0.05)


def test_strided_head_dim_still_takes_sdpa_fused_kernel(seed):
    """Values viewed from a channels-first map have head_dim strided; SDPA's fused kernels need unit stride
    there, so the input is copied once rather than sending SDPA to its T×T math path. Same result either way."""
    from siclip.analysis.traffic import trace_traffic

    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    v = torch.randn(2, 4, 8, 9).transpose(-2, -1)  # (batch, heads, tokens, head_dim) with head_dim strided
    assert v.stride(-1) != 1
    gains = torch.rand(4) + 0.5, torch.rand(4) + 0.5, torch.rand(4)
    ops = trace_traffic(lambda: shaped_attention(q, k, v, *gains, backend="sdpa"))
    names = [o.op for o in ops]
    assert "_scaled_dot_product_flash_attention_for_cpu" in names and "bmm" not in names
    expected = shaped_attention(q, k, v.contiguous(), *gains, backend="math")
    torch.testing.assert_close(shaped_attention(q, k, v, *gains, backend="sdpa"), expected, rtol=1e-5, atol=1e-5)
