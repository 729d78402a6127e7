"""Attention kernel backends: PyTorch SDPA everywhere, xformers as an optional CUDA-only extra, and
Triton kernels for shaped attention's α/β/γ combination (:mod:`siclip.blocks.shaped_kernels`).

The xformers wheel on PyPI is built against the CUDA 12 runtime; beside a CUDA 13 build of torch it
imports but its kernels fail at the first call. :func:`xformers_status` therefore runs one tiny kernel
before xformers is ever used, and every caller falls back to SDPA with the reason in a warning.
``"auto"`` picks ``"triton"`` for CUDA tensors when Triton imports. On a CPU without autograd it picks the
explicit ``"math"`` path, in chunks of sequences whose T×T scores fit in a core's cache
(:func:`explicit_is_faster`), and SDPA with PyTorch ops elsewhere.

An exporter traces one path, named with :func:`traced_attention`: inside it every attention of this package runs
that kernel (``"math"`` or ``"sdpa"``) whole, whatever its backend and device, and the choices a running model
makes from its batch size (cache-sized chunks, which operand a product scales) take their batch-free form.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator

import torch
from torch import Tensor

BACKENDS = ("auto", "sdpa", "xformers", "math", "triton")

#: Most heads·tokens² attention scores per explicit call on a CPU without autograd: 1 MiB in float32, which
#: stays in a core's 2 MiB L2 cache through the softmax and the shaping. A larger batch runs in chunks of
#: sequences that fit. SDPA's fused CPU kernel costs 1.2–2.9× as much as these calls (shaped attention, 16
#: heads × 64 tokens: 187 against 108 µs at batch 1, 3.6–7.3 against 2.5 ms at batch 32; causal, 8 heads ×
#: 77 tokens: 12.8–14.4 against 8.7 ms at batch 64); one unchunked call over 4× this many scores lost to it
#: (benchmarks/RESULTS.md, session 7).
CPU_EXPLICIT_SCORES = 2**18

#: The kernels an exporter may trace: ``"math"`` (explicit products: MatMul, Softmax) and ``"sdpa"``
#: (PyTorch's scaled_dot_product_attention, whatever the exporter makes of it). Never Triton's custom ops nor xformers.
TRACEABLE = ("math", "sdpa")
_traced: str | None = None  # a module global, not a ContextVar: torch.compile reads (and guards on) globals


@contextlib.contextmanager
def traced_attention(kernel: str = "math") -> Iterator[None]:
    """While open, every attention in :mod:`siclip.blocks` runs ``kernel`` (one of :data:`TRACEABLE`) over the
    whole batch, on any device and whatever backend it was built with: the graph an exporter records is this
    one path, with no cache-sized chunks (the batch is a symbol there), no Triton custom op and no xformers call.
    Checks that read tensor values (padding masks, token ids) are left to the caller while tracing."""
    global _traced
    if kernel not in TRACEABLE:
        raise ValueError(f"an exporter traces one of {TRACEABLE}, got {kernel!r}")
    previous, _traced = _traced, kernel
    try:
        yield
    finally:
        _traced = previous


def traced_kernel() -> str | None:
    """The kernel :func:`traced_attention` names, or None outside it (a running model)."""
    return _traced


def needs_autograd(*tensors: Tensor | float | None) -> bool:
    """Whether autograd will record an operation on these inputs (grad mode on, one of them requiring grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def explicit_is_faster(x: Tensor, heads: int, tokens: int, autograd: bool) -> bool:
    """Whether attention on input ``x`` should run as explicit products: on a CPU, without autograd (SDPA's
    backward keeps no T×T matrix), in float32 or float64 (SDPA's kernel keeps a half-precision softmax in
    float32; the explicit one would not), when one sequence's heads·tokens² scores fit in cache
    (:data:`CPU_EXPLICIT_SCORES`)."""
    full_precision = x.dtype in (torch.float32, torch.float64)
    return x.device.type == "cpu" and full_precision and not autograd and heads * tokens * tokens <= CPU_EXPLICIT_SCORES


def in_cached_chunks(fn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, autograd: bool) -> Tensor:
    """``fn(q, k, v, mask)`` over ``(batch, heads, tokens, ·)`` inputs; on a CPU without autograd, over as many
    sequences per call as keep the scores within :data:`CPU_EXPLICIT_SCORES` (whole otherwise). ``mask`` is
    sliced with the batch unless it broadcasts over it. A split output is laid out like ``v``."""
    batch, heads, tokens = q.shape[:3]
    chunk = max(1, CPU_EXPLICIT_SCORES // (heads * tokens * tokens))
    if traced_kernel() is not None or autograd or q.device.type != "cpu" or batch <= chunk:
        return fn(q, k, v, mask)
    out = None
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        part = fn(q[rows], k[rows], v[rows], mask if mask is None or mask.shape[0] == 1 else mask[rows])
        if out is None:
            out = torch.empty_like(v, dtype=part.dtype)
        out[rows] = part
    return out


@functools.cache
def xformers_status(device_index: int = 0) -> tuple[bool, str]:
    """``(usable, reason)`` for xformers' memory-efficient attention on CUDA device ``device_index``."""
    if not torch.cuda.is_available():
        return False, "xformers runs on CUDA only and no CUDA device is available"
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError, or a broken binary raising anything at import
        return False, f"xformers is not importable ({type(err).__name__}: {err}); install the 'xformers' extra"
    try:
        x = torch.zeros(1, 8, 1, 32, device=f"cuda:{device_index}", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x)
        torch.cuda.synchronize(device_index)
    except Exception as err:
        return False, (
            f"xformers is installed but its CUDA kernels do not run ({type(err).__name__}: {err}). "
            f"The PyPI wheel needs the CUDA 12 runtime; this torch is built for CUDA {torch.version.cuda}"
        )
    return True, ""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (1.5 s at every script's
    start on a CPU): that decorator only sets this marker, which torch.compile reads when it meets ``fn``
    (tests/test_backends_import.py checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result  # torch.compile calls it instead of tracing a cached import
def triton_status() -> tuple[bool, str]:
    """``(importable, reason)`` for the Triton shaped-attention kernels (importing them compiles nothing)."""
    return _triton_status()


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        from . import shaped_kernels  # noqa: F401
    except Exception as err:  # ImportError, or a Triton that fails at import
        return False, f"triton is not importable ({type(err).__name__}: {err}); install the 'triton' extra"
    return True, ""


def triton_runs_on(x: Tensor) -> tuple[bool, str]:
    """``(usable, reason)`` for the Triton kernels on ``x``'s device: CUDA, or the CPU under Triton's interpreter."""
    usable, reason = triton_status()
    if not usable:
        return False, reason
    from .shaped_kernels import INTERPRETED

    if x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETED):
        return True, ""
    return False, (
        f"the triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, set before "
        f"siclip.blocks.shaped_kernels is imported), got a {x.device.type} tensor"
    )


@functools.cache
def _warn_fallback(reason: str, instead: str = "torch scaled_dot_product_attention") -> None:
    warnings.warn(f"{reason}; falling back to {instead}", RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, x: Tensor, has_padding: bool, autograd: bool = True) -> str:
    """The backend that will really run for ``(batch, heads, tokens, head_dim)`` input ``x``: ``"sdpa"``,
    ``"xformers"``, ``"math"`` or ``"triton"``; ``autograd`` says whether the call will be differentiated.

    ``"triton"`` names the Triton combination kernels of shaped attention; its softmax term runs on SDPA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if traced_kernel() is not None:
        return traced_kernel()
    if backend == "auto":
        if x.device.type == "cuda" and triton_status()[0]:
            return "triton"
        _, heads, tokens, _ = x.shape
        return "math" if explicit_is_faster(x, heads, tokens, autograd) else "sdpa"
    if backend == "triton":
        usable, reason = triton_runs_on(x)
        if not usable:
            _warn_fallback(reason, "PyTorch ops for the α/β/γ combination (softmax on SDPA)")
            return "sdpa"
        return backend
    if backend != "xformers":
        return backend
    if x.device.type != "cuda":
        _warn_fallback(f"xformers was asked for on a {x.device.type} tensor but runs on CUDA only")
        return "sdpa"
    usable, reason = xformers_status(x.device.index or 0)
    if not usable:
        _warn_fallback(reason)
        return "sdpa"
    if has_padding:
        _warn_fallback("the xformers path takes no key_padding_mask")
        return "sdpa"
    return "xformers"


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attn_mask: Tensor | None,
    scale: float | None,
    backend: str,
) -> Tensor:
    """softmax(QKᵀ·scale + M)·V on ``(batch, heads, tokens, head_dim)`` tensors with the resolved backend.

    ``attn_mask`` is SDPA's boolean keep-mask (see :func:`siclip.blocks.masking.sdpa_mask`).
    """
    if backend == "xformers":
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
        )
        return out.transpose(1, 2)
    if backend == "math":

        def explicit(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
            return apply_attention(attention_probs(q, k, causal=causal, attn_mask=attn_mask, scale=scale), v)

        return in_cached_chunks(explicit, q, k, v, attn_mask, autograd=needs_autograd(q, k, v))
    # SDPA's fused kernels (flash, memory-efficient; CPU and CUDA) need a unit stride along head_dim and
    # otherwise fall back to its math path, which writes the T×T matrix. A strided input, such as values
    # taken straight from a channels-first map, is copied once instead.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if attn_mask is not None and traced_kernel() is not None:
        # ONNX Runtime's Attention op (what opset 23 makes of SDPA) reads a mask's query axis: a padding mask broadcast
        # over the queries (batch, 1, 1, T) is spelled out as (batch, 1, T, T).
        attn_mask = attn_mask.expand(-1, -1, q.shape[-2], -1)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale
    )


def attention_probs(q: Tensor, k: Tensor, *, causal: bool, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """P = softmax(QKᵀ·scale + M), the explicit ``(batch, heads, tokens, tokens)`` matrix.

    The logits are scaled and masked in place: they are a fresh tensor, and neither a product's nor a
    scaling's backward reads its output, so this is safe under autograd too.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if causal:
        t = q.shape[-2]
        logits.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if attn_mask is not None:
        logits.masked_fill_(~attn_mask, float("-inf"))
    return logits.softmax(-1)


def apply_attention(matrix: Tensor, v: Tensor) -> Tensor:
    """matrix·V per head, ``(batch, heads, tokens, head_dim)``, laid out like V in memory.

    Values viewed from a channels-first map are head_dim-major (``stride(-2) == 1``); the product is then
    computed as (Vᵀ·matrixᵀ)ᵀ, so the output is a channels-first map again and nothing is copied back.
    """
    if v.stride(-2) == 1 and v.stride(-1) != 1:
        return torch.matmul(v.transpose(-2, -1), matrix.transpose(-2, -1)).transpose(-2, -1)
    return torch.matmul(matrix, v)
