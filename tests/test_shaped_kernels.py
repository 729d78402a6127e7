"""The Triton kernels of shaped attention against the float64 reference (on the CPU under Triton's interpreter,
which tests/conftest.py turns on when no CUDA device is present)."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from einops import rearrange

pytest.importorskip("triton", reason="the triton extra is not installed; the kernels cannot run")

from siclip.blocks import SASPBlock, shaped_attention, shaped_attention_reference  # noqa: E402
from siclip.blocks import shaped_kernels  # noqa: E402
from siclip.blocks.backends import resolve_backend  # noqa: E402

from helpers import padding_mask, randomize_  # noqa: E402

MASKINGS = [(False, False), (False, True), (True, False), (True, True)]  # (causal, padded)
ROOT = Path(__file__).resolve().parents[1]


def _inputs(batch=2, heads=3, tokens=37, head_dim=20, dtype=torch.float64):
    """Tokens and head_dim off the kernels' block sizes (32, 64) on purpose: the masked edges get exercised."""
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    gains = [(torch.rand(heads, dtype=dtype) + 0.5).requires_grad_() for _ in range(3)]
    return q, k, v, gains


def test_kernels_really_run_here():
    """Guard against a test run that silently took the PyTorch path: CUDA, or the interpreter on the CPU."""
    assert torch.cuda.is_available() or shaped_kernels.INTERPRETED, "TRITON_INTERPRET was set too late"


@pytest.mark.parametrize("causal,padded", MASKINGS)
@pytest.mark.parametrize("tokens,head_dim", [(37, 20), (9, 80)])
def test_triton_matches_float64_reference(seed, causal, padded, tokens, head_dim):
    """Output and every gradient, dα/dβ/dγ included; two token blocks, or two head_dim blocks."""
    q, k, v, gains = _inputs(tokens=tokens, head_dim=head_dim)
    mask = padding_mask(2, tokens) if padded else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to PyTorch ops would fail the test
        fast = shaped_attention(q, k, v, *gains, causal=causal, key_padding_mask=mask, backend="triton")
    ref = shaped_attention_reference(q, k, v, *gains, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    inputs = (q, k, v, *gains)
    for got, want in zip(torch.autograd.grad(fast, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width", [32, 64])
def test_wider_column_blocks(seed, monkeypatch, width):
    """A GPU gets up to 64 columns per program; at test sizes the kernels would take 16, so force the width."""
    monkeypatch.setattr(shaped_kernels, "_block_d", lambda head_dim, rows: width)
    q, k, v, gains = _inputs(tokens=37, head_dim=40)
    mask = padding_mask(2, 37)
    for causal in (False, True):
        fast = shaped_attention(q, k, v, *gains, causal=causal, key_padding_mask=mask, backend="triton")
        ref = shaped_attention_reference(q, k, v, *gains, causal=causal, key_padding_mask=mask)
        upstream = torch.randn_like(ref)
        inputs = (v, *gains)
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad(fast, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_views_mixed_dtypes_and_merged_heads(seed, causal):
    """V as a column slice of a fused projection, a bf16 softmax term next to float32 V (SAS-P under autocast),
    a non-contiguous output gradient; the output's heads merge back as a view."""
    batch, heads, tokens, head_dim = 3, 2, 40, 16
    fused = torch.randn(batch, tokens, 3 * heads * head_dim, requires_grad=True)
    v = rearrange(fused[..., heads * head_dim : 2 * heads * head_dim], "b t (h d) -> b h t d", h=heads)
    s = torch.randn(batch, heads, tokens, head_dim).bfloat16().requires_grad_()
    gains = [torch.rand(heads, requires_grad=True) for _ in range(3)]
    mask = padding_mask(batch, tokens)
    weight = (~mask).float()
    out = shaped_kernels.shaped_combine(v, s, *gains, weight, causal, torch.float32)
    assert out.dtype == torch.float32
    assert rearrange(out, "b h t d -> b t (h d)").data_ptr() == out.data_ptr()
    assert rearrange(out, "b h t d -> b t (h d)").is_contiguous()

    from siclip.blocks import centred_values

    alpha, beta, gamma = (g.view(1, heads, 1, 1) for g in gains)
    ref = alpha * v + beta * s.float() - gamma * centred_values(v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(batch, tokens, heads, head_dim).transpose(1, 2)  # a strided gradient
    inputs = (fused, s, *gains)
    for got, want in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        tol = 2**-7 if got.dtype == torch.bfloat16 else 1e-4  # dS is stored in S's dtype: one bf16 rounding
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_autocast_output_takes_the_autocast_dtype(seed):
    """Under autocast the kernel writes bf16 directly: the PyTorch path's output, rounded once."""
    q, k, v, gains = (t.float() if isinstance(t, torch.Tensor) else [g.float() for g in t] for t in _inputs(tokens=21))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = shaped_attention(q, k, v, *gains, causal=True, backend="triton")
        plain = shaped_attention(q, k, v, *gains, causal=True, backend="sdpa")
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2**-7, atol=1e-5)
    upstream = torch.randn_like(plain)
    inputs = (q, k, v, *gains)
    got = torch.autograd.grad(fast, inputs, upstream.bfloat16())
    want = torch.autograd.grad(plain, inputs, upstream.to(plain.dtype))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02 * w.abs().max().item())


def test_gain_gradients_are_deterministic(seed):
    q, k, v, gains = _inputs(batch=3, tokens=70)
    out = shaped_attention(q, k, v, *gains, causal=True, backend="triton")
    upstream = torch.randn_like(out)
    first = torch.autograd.grad(out, gains, upstream, retain_graph=True)
    second = torch.autograd.grad(out, gains, upstream)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_sasp_block_with_triton_backend_matches_pytorch_ops(seed, causal):
    """The kernels inside SAS-P (β_SA folded into the gains, fused projection), every parameter's gradient."""
    blocks = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(seed)
        blocks[backend] = randomize_(SASPBlock(24, 3, mlp_ratio=2.0, causal=causal, backend=backend)).double()
    x = torch.randn(2, 19, 24, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(2, 19)
    outs = {name: block(x, key_padding_mask=mask) for name, block in blocks.items()}
    torch.testing.assert_close(outs["triton"], outs["sdpa"], rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(outs["sdpa"])
    grads = {
        name: torch.autograd.grad(outs[name], (x, *block.parameters()), upstream) for name, block in blocks.items()
    }
    for got, want in zip(grads["triton"], grads["sdpa"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_custom_ops_pass_opcheck(seed):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    _, _, v, gains = _inputs(tokens=11, head_dim=8)
    s = torch.randn_like(v, requires_grad=True)
    weight = (~padding_mask(2, 11)).double()
    for causal in (False, True):
        torch.library.opcheck(shaped_kernels.shaped_combine, (v, s, *gains, weight, causal, torch.float64))
        torch.library.opcheck(shaped_kernels.shaped_combine, (v, s, *gains, None, causal, torch.float32))
        # The backward op has no backward of its own (no double backward): its inputs need no gradient.
        plain = [t.detach() for t in (torch.randn_like(v), v, s, *gains)]
        torch.library.opcheck(shaped_kernels.shaped_combine_backward, (*plain, weight, causal))


def test_compiled_graph_has_no_break_and_matches_eager(seed):
    """The custom op traces into one ``torch.compile`` graph (fullgraph) with its backward."""
    q, k, v, gains = _inputs(tokens=21, head_dim=8)

    def fn(q, k, v, a, b, g):
        return shaped_attention(q, k, v, a, b, g, causal=True, backend="triton")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, ref = compiled(q, k, v, *gains), fn(q, k, v, *gains)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    inputs = (q, k, v, *gains)
    for got, want in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_auto_picks_pytorch_ops_on_cpu_and_triton_falls_back_with_a_warning(seed, monkeypatch):
    q, k, v, gains = _inputs(tokens=9, head_dim=4)
    assert resolve_backend("auto", q, False) == "sdpa"
    monkeypatch.setattr(shaped_kernels, "INTERPRETED", False)  # as if the kernels had been compiled for a GPU
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        shaped_kernels.shaped_combine(v, v, *gains, None, False, v.dtype)
    with pytest.warns(RuntimeWarning, match="PyTorch ops for the α/β/γ combination"):
        out = shaped_attention(q, k, v, *gains, backend="triton")
    torch.testing.assert_close(out, shaped_attention(q, k, v, *gains, backend="sdpa"))


def test_kernels_compile_for_an_h100():
    """Triton's real compiler (not the interpreter) lowers every kernel variant to sm_90 PTX, no GPU needed:
    the interpreter accepts programs that the compiler rejects (types of loop-carried values, for one)."""
    script = textwrap.dedent(
        """
        import inspect
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from siclip.blocks import shaped_kernels as K

        pointers = {"v_ptr": "*fp32", "w_ptr": "*bf16"}  # float32 V beside bf16 S, as under autocast
        for kernel in (K._combine_fwd_kernel, K._combine_bwd_kernel):
            names = list(inspect.signature(kernel.fn).parameters)
            for causal in (False, True):
                for has_weight in (False, True):
                    consts = dict(CAUSAL=causal, HAS_WEIGHT=has_weight, BLOCK_T=32, BLOCK_D=64, ACC=tl.float32)
                    signature = {
                        n: "constexpr" if n in consts else (pointers.get(n, "*bf16") if n.endswith("_ptr") else "i32")
                        for n in names
                    }
                    constexprs = {(names.index(n),): value for n, value in consts.items()}
                    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
                    assert ".target sm_90" in compiled.asm["ptx"]
        print("compiled")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("causal,padded", MASKINGS)
def test_cuda_bfloat16_matches_reference(seed, causal, padded):
    """On CUDA, ``auto`` picks the kernels; bf16 forward and gradients against the float64 reference."""
    q, k, v, gains = _inputs(batch=4, heads=8, tokens=77, head_dim=64)
    mask = padding_mask(4, 77) if padded else None
    ref = shaped_attention_reference(q, k, v, *gains, causal=causal, key_padding_mask=mask)
    cuda = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v, *gains)]
    assert resolve_backend("auto", cuda[0], padded) == "triton"
    out = shaped_attention(*cuda, causal=causal, key_padding_mask=None if mask is None else mask.cuda())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0.05, atol=0.05)
    upstream = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, *gains), upstream)
    got = torch.autograd.grad(out, cuda, upstream.cuda().bfloat16())
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        torch.testing.assert_close(g.double().cpu() / scale, w / scale, rtol=0.05, atol=0.05)
