"""Triton kernels for the combination step of shaped attention, forward and backward in one pass each.

Given the softmax term S = softmax(QKᵀ·scale + M)·V (from SDPA), per head h::

    Y = α_h·V + β_h·S − γ_h·C·V,      C·V_i = Σ_{j visible from i} w_j·V_j / Σ_{j visible from i} w_j

with w_j = 0 for padded keys and 1 otherwise; "visible" is every key (bidirectional) or j ≤ i (causal).
Backward, with R_j = Σ_{i: j visible from i} dY_i / n_i (n_i the visible count of query i)::

    dV_j = α·dY_j − γ·w_j·R_j,   dS = β·dY,
    dα = Σ dY·V,   dβ = Σ dY·S,   dγ = −Σ_j w_j·V_j·R_j   (sums over batch, tokens, head_dim)

dγ uses Σ_i dY_i·C·V_i = Σ_j w_j·V_j·R_j, so the backward never forms C·V. Bidirectionally R is one
row per (batch, head); causally it is a reverse cumulative sum, taken in the same backward sweep.

One program owns one (batch, head) and a block of head_dim columns and sweeps the tokens; a causal
sweep carries its running sums between token blocks. Forward reads V and S once (V twice when
bidirectional: the mean first) and writes Y; backward reads dY, V and S once (dY twice when
bidirectional) and writes dV, dS and per-program partial sums of the gain gradients, which a small
ordered reduction turns into dα, dβ, dγ (deterministic). Everything accumulates in float32 (float64 for
float64 inputs, so the tests can hold the kernels to the float64 reference).

The ops are registered with ``torch.library.custom_op`` (with fake implementations and autograd), so they
run inside ``torch.compile`` graphs without a graph break. On CPU tensors the kernels need Triton's
interpreter: ``TRITON_INTERPRET=1`` must be set before this module is first imported (the tests do).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch import Tensor

# Set when the kernels were decorated under Triton's interpreter (they then run on CPU tensors only).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BLOCK_T = 32


@triton.jit
def _program_head(alpha_ptr, beta_ptr, gamma_ptr, heads, head_dim, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """This program's batch index, head index, head_dim columns (and which exist) and the head's gains."""
    row = tl.program_id(0)
    b = (row // heads).to(tl.int64)
    h = (row % heads).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    alpha = tl.load(alpha_ptr + h).to(ACC)
    beta = tl.load(beta_ptr + h).to(ACC)
    gamma = tl.load(gamma_ptr + h).to(ACC)
    return b, h, cols, cols < head_dim, alpha, beta, gamma


@triton.jit
def _key_weights(w_ptr, b, sw_b, sw_t, t, t_ok, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """w_t for the token block ``t``: 1 for visible keys, 0 for padded ones and for rows past the end."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + b * sw_b + t * sw_t, mask=t_ok, other=0.0).to(ACC)
    else:
        w = t_ok.to(ACC)
    return w


@triton.jit
def _combine_fwd_kernel(
    v_ptr, s_ptr, y_ptr, w_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    tokens, heads, head_dim,
    sv_b, sv_h, sv_t, sv_d,
    ss_b, ss_h, ss_t, ss_d,
    sy_b, sy_h, sy_t, sy_d,
    sw_b, sw_t,
    CAUSAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b, h, cols, col_ok, alpha, beta, gamma = _program_head(alpha_ptr, beta_ptr, gamma_ptr, heads, head_dim, BLOCK_D, ACC)
    v_base = v_ptr + b * sv_b + h * sv_h + cols[None, :] * sv_d
    s_base = s_ptr + b * ss_b + h * ss_h + cols[None, :] * ss_d
    y_base = y_ptr + b * sy_b + h * sy_h + cols[None, :] * sy_d

    # Running (causal) or total (bidirectional) weighted sum of V and count of visible keys.
    total = tl.zeros([BLOCK_D], dtype=ACC)
    count = tl.zeros([BLOCK_D], dtype=ACC)
    if not CAUSAL:
        for t0 in range(0, tokens, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < tokens
            ok = t_ok[:, None] & col_ok[None, :]
            x = tl.load(v_base + t[:, None] * sv_t, mask=ok, other=0.0).to(ACC)
            w = _key_weights(w_ptr, b, sw_b, sw_t, t, t_ok, HAS_WEIGHT, ACC)
            total += tl.sum(x * w[:, None], axis=0)
            count += tl.sum(w[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC), axis=0)
        centre_all = total / count
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < tokens
        ok = t_ok[:, None] & col_ok[None, :]
        x = tl.load(v_base + t[:, None] * sv_t, mask=ok, other=0.0).to(ACC)
        s = tl.load(s_base + t[:, None] * ss_t, mask=ok, other=0.0).to(ACC)
        if CAUSAL:
            w = _key_weights(w_ptr, b, sw_b, sw_t, t, t_ok, HAS_WEIGHT, ACC)
            wx = x * w[:, None]
            w2 = w[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
            run = tl.cumsum(wx, axis=0) + total[None, :]
            seen = tl.cumsum(w2, axis=0) + count[None, :]
            # Rows past the end may see no key; they are not stored, but must not divide by zero.
            centre = run / tl.where(seen > 0, seen, 1.0)
            total += tl.sum(wx, axis=0)
            count += tl.sum(w2, axis=0)
        else:
            centre = centre_all[None, :]
        y = alpha * x + beta * s - gamma * centre
        tl.store(y_base + t[:, None] * sy_t, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, v_ptr, s_ptr, dv_ptr, ds_ptr, part_ptr, w_ptr, alpha_ptr, beta_ptr, gamma_ptr,
    tokens, heads, head_dim,
    sg_b, sg_h, sg_t, sg_d,
    sv_b, sv_h, sv_t, sv_d,
    ss_b, ss_h, ss_t, ss_d,
    sdv_b, sdv_h, sdv_t, sdv_d,
    sds_b, sds_h, sds_t, sds_d,
    sw_b, sw_t,
    CAUSAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b, h, cols, col_ok, alpha, beta, gamma = _program_head(alpha_ptr, beta_ptr, gamma_ptr, heads, head_dim, BLOCK_D, ACC)
    dy_base = dy_ptr + b * sg_b + h * sg_h + cols[None, :] * sg_d
    v_base = v_ptr + b * sv_b + h * sv_h + cols[None, :] * sv_d
    s_base = s_ptr + b * ss_b + h * ss_h + cols[None, :] * ss_d
    dv_base = dv_ptr + b * sdv_b + h * sdv_h + cols[None, :] * sdv_d
    ds_base = ds_ptr + b * sds_b + h * sds_h + cols[None, :] * sds_d

    # First sweep: the number of visible keys (both directions) and, bidirectionally, R = Σ_i dY_i / n.
    count = tl.zeros([BLOCK_D], dtype=ACC)
    reach = tl.zeros([BLOCK_D], dtype=ACC)
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < tokens
        w = _key_weights(w_ptr, b, sw_b, sw_t, t, t_ok, HAS_WEIGHT, ACC)
        count += tl.sum(w[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC), axis=0)
        if not CAUSAL:
            ok = t_ok[:, None] & col_ok[None, :]
            reach += tl.sum(tl.load(dy_base + t[:, None] * sg_t, mask=ok, other=0.0).to(ACC), axis=0)
    if not CAUSAL:
        reach = reach / count

    acc_alpha = tl.zeros([BLOCK_D], dtype=ACC)
    acc_beta = tl.zeros([BLOCK_D], dtype=ACC)
    acc_gamma = tl.zeros([BLOCK_D], dtype=ACC)
    # Causal R is a reverse cumulative sum, so this sweep runs from the last token block to the first.
    n_blocks = tl.cdiv(tokens, BLOCK_T)
    for i in range(0, n_blocks):
        t0 = (n_blocks - 1 - i) * BLOCK_T if CAUSAL else i * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < tokens
        ok = t_ok[:, None] & col_ok[None, :]
        w = _key_weights(w_ptr, b, sw_b, sw_t, t, t_ok, HAS_WEIGHT, ACC)
        dy = tl.load(dy_base + t[:, None] * sg_t, mask=ok, other=0.0).to(ACC)
        x = tl.load(v_base + t[:, None] * sv_t, mask=ok, other=0.0).to(ACC)
        s = tl.load(s_base + t[:, None] * ss_t, mask=ok, other=0.0).to(ACC)
        if CAUSAL:
            w2 = w[:, None] + tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
            # count holds the keys up to the end of this block; n_i = keys visible from query i.
            block_count = tl.sum(w2, axis=0)
            seen = tl.cumsum(w2, axis=0) + (count - block_count)[None, :]
            q = tl.where(ok, dy / tl.where(seen > 0, seen, 1.0), 0.0)
            # Σ_{i ≥ j} q_i within the block, plus everything after it (reach).
            r = tl.sum(q, axis=0)[None, :] - tl.cumsum(q, axis=0) + q + reach[None, :]
            reach += tl.sum(q, axis=0)
            count -= block_count
        else:
            r = reach[None, :]
        wr = w[:, None] * r
        tl.store(dv_base + t[:, None] * sdv_t, (alpha * dy - gamma * wr).to(dv_ptr.dtype.element_ty), mask=ok)
        tl.store(ds_base + t[:, None] * sds_t, (beta * dy).to(ds_ptr.dtype.element_ty), mask=ok)
        acc_alpha += tl.sum(dy * x, axis=0)
        acc_beta += tl.sum(dy * s, axis=0)
        acc_gamma -= tl.sum(tl.where(ok, wr * x, 0.0), axis=0)
    part = part_ptr + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * 3
    tl.store(part, tl.sum(acc_alpha, axis=0))
    tl.store(part + 1, tl.sum(acc_beta, axis=0))
    tl.store(part + 2, tl.sum(acc_gamma, axis=0))


def _empty_like_heads(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty ``(batch, heads, tokens, head_dim)`` tensor stored as ``(batch, tokens, heads, head_dim)``,
    so that merging the heads back (``b h t d -> b t (h d)``) is a view, not a copy."""
    batch, heads, tokens, head_dim = like.shape
    storage = torch.empty(batch, tokens, heads, head_dim, dtype=dtype, device=like.device)
    return rearrange(storage, "b t h d -> b h t d")


def _block_d(head_dim: int, rows: int) -> int:
    """Columns per program: up to 64, fewer when there are few (batch, head) rows (long sequences at a small
    batch), so that a GPU still gets about a thousand programs."""
    block = min(64, triton.next_power_of_2(head_dim))
    while block > 16 and rows * triton.cdiv(head_dim, block) < 1024:
        block //= 2
    return block


def _acc_dtype(v: Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _acc(v: Tensor):
    return tl.float64 if v.dtype == torch.float64 else tl.float32


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the triton shaped-attention kernels got CPU tensors but were compiled for a GPU; on the CPU set "
            "TRITON_INTERPRET=1 before siclip.blocks.shaped_kernels is first imported (Triton's interpreter)"
        )


def _weight_args(weight: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    if weight is None:
        return like, 0, 0  # never read: HAS_WEIGHT is false
    return weight, weight.stride(0), weight.stride(1)


@torch.library.custom_op("siclip::shaped_combine", mutates_args=())
def shaped_combine(
    v: Tensor,
    s: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    weight: Tensor | None,
    causal: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """Y = α·V + β·S − γ·C·V on ``(batch, heads, tokens, head_dim)`` V and S, in one kernel.

    ``alpha``, ``beta``, ``gamma``: ``(heads,)``; ``weight``: ``(batch, tokens)``, 1 for visible keys and 0
    for padded ones, or None. Y is rounded once, from the float32 accumulator to ``out_dtype``.
    """
    _check_device(v)
    batch, heads, tokens, head_dim = v.shape
    y = _empty_like_heads(v, out_dtype)
    w, sw_b, sw_t = _weight_args(weight, v)
    block_d = _block_d(head_dim, batch * heads)
    grid = (batch * heads, triton.cdiv(head_dim, block_d))
    _combine_fwd_kernel[grid](
        v, s, y, w, alpha, beta, gamma, tokens, heads, head_dim,
        *v.stride(), *s.stride(), *y.stride(), sw_b, sw_t,
        CAUSAL=causal, HAS_WEIGHT=weight is not None, BLOCK_T=_BLOCK_T, BLOCK_D=block_d, ACC=_acc(v),
    )  # fmt: skip
    return y


@shaped_combine.register_fake
def _(v, s, alpha, beta, gamma, weight, causal, out_dtype):
    return _empty_like_heads(v, out_dtype)


@torch.library.custom_op("siclip::shaped_combine_backward", mutates_args=())
def shaped_combine_backward(
    dy: Tensor, v: Tensor, s: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, weight: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dV, dS, dα, dβ, dγ)`` of :func:`shaped_combine` for the output gradient ``dy``, in one kernel
    plus an ordered sum of the per-program partial gain gradients."""
    _check_device(v)
    batch, heads, tokens, head_dim = v.shape
    dv, ds = _empty_like_heads(v, v.dtype), _empty_like_heads(s, s.dtype)
    w, sw_b, sw_t = _weight_args(weight, v)
    block_d = _block_d(head_dim, batch * heads)
    grid = (batch * heads, triton.cdiv(head_dim, block_d))
    partial = torch.empty(batch, heads, grid[1], 3, dtype=_acc_dtype(v), device=v.device)
    _combine_bwd_kernel[grid](
        dy, v, s, dv, ds, partial, w, alpha, beta, gamma, tokens, heads, head_dim,
        *dy.stride(), *v.stride(), *s.stride(), *dv.stride(), *ds.stride(), sw_b, sw_t,
        CAUSAL=causal, HAS_WEIGHT=weight is not None, BLOCK_T=_BLOCK_T, BLOCK_D=block_d, ACC=_acc(v),
    )  # fmt: skip
    # One reduction per gain (separate tensors: a custom op's outputs may not alias each other).
    dalpha, dbeta, dgamma = (partial[..., i].sum((0, 2)).to(g.dtype) for i, g in enumerate((alpha, beta, gamma)))
    return dv, ds, dalpha, dbeta, dgamma


@shaped_combine_backward.register_fake
def _(dy, v, s, alpha, beta, gamma, weight, causal):
    heads = v.shape[1]
    gains = [torch.empty(heads, dtype=g.dtype, device=g.device) for g in (alpha, beta, gamma)]
    return _empty_like_heads(v, v.dtype), _empty_like_heads(s, s.dtype), *gains


def _setup_context(ctx, inputs, output) -> None:
    v, s, alpha, beta, gamma, weight, causal, _ = inputs
    ctx.save_for_backward(v, s, alpha, beta, gamma, weight)
    ctx.causal = causal


def _backward(ctx, dy):
    v, s, alpha, beta, gamma, weight = ctx.saved_tensors
    dv, ds, dalpha, dbeta, dgamma = shaped_combine_backward(dy, v, s, alpha, beta, gamma, weight, ctx.causal)
    return dv, ds, dalpha, dbeta, dgamma, None, None, None


shaped_combine.register_autograd(_backward, setup_context=_setup_context)
