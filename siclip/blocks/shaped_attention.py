"""Shaped attention (He & Hofmann, *Simplifying Transformer Blocks*, ICLR 2024, Eq. 5; after Noci et al. 2023).

Per head h::

    A_h = α_h·I + β_h·softmax(Q_h K_hᵀ/√d + M) − γ_h·C,     out_h = A_h·V_h

with C = softmax(M), the attention a query would pay with all logits at zero: bidirectional rows are
uniform over the non-padded keys, causal rows uniform over the visible keys (C_ij = 1/i for j ≤ i).
α, β, γ act after the softmax, so the rows of A_h sum to α + β − γ, not to one.

The fused path never forms a T×T matrix for I or C: I·V = V, and C·V is the (cumulative, when causal)
mean of V over the visible keys, so only the softmax term goes through a fused attention kernel. The
combination α·V + β·S − γ·C·V (S the softmax term) runs either as PyTorch ops or, with the ``"triton"``
backend, as one Triton kernel forward and one backward (:mod:`siclip.blocks.shaped_kernels`).

The explicit ``"math"`` path (chosen by ``"auto"`` for small inputs on a CPU without autograd) forms the
softmax matrix anyway, so it shapes it in place, A = β·P + α·I − γ·C, and multiplies once: A·V.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backends import (
    apply_attention, attention_probs, in_cached_chunks, needs_autograd, resolve_backend, softmax_attention, traced_kernel,
)  # fmt: skip
from .masking import additive_mask, check_key_padding_mask, sdpa_mask


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must share (batch, heads, tokens) with q: shaped attention is self-attention "
            f"(αI needs as many keys as queries), got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )


def _head_gain(name: str, gain: Tensor | float, heads: int, like: Tensor) -> Tensor:
    """A per-head gain as a ``(1, heads, 1, 1)`` tensor; a Python number or 0-d tensor applies to every head."""
    gain = torch.as_tensor(gain, dtype=like.dtype, device=like.device)
    if gain.dim() == 0:
        return gain.expand(heads).view(1, heads, 1, 1)
    if tuple(gain.shape) != (heads,):
        raise ValueError(f"{name} must have shape (heads,) = ({heads},), got {tuple(gain.shape)}")
    return gain.view(1, heads, 1, 1)


def centred_values(v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
    """C·V without forming C: the mean of V over each query's visible keys.

    Bidirectional: one ``(batch, heads, 1, head_dim)`` mean (broadcast over queries). Causal: the
    cumulative mean, ``(batch, heads, tokens, head_dim)``. Accumulates in float32 so a long bf16
    cumulative sum does not drift.
    """
    acc_dtype = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    acc = v
    if key_padding_mask is not None:
        weight = (~key_padding_mask).to(acc_dtype)[:, None, :, None]
        acc = v.to(acc_dtype) * weight
    # The reductions accumulate in acc_dtype themselves: no float32 copy of V is written.
    if causal:
        total = acc.cumsum(-2, dtype=acc_dtype)
        count = (
            torch.arange(1, v.shape[-2] + 1, device=v.device, dtype=acc_dtype).view(-1, 1)
            if key_padding_mask is None
            else weight.cumsum(-2)
        )
    else:
        total = acc.sum(-2, keepdim=True, dtype=acc_dtype)
        count = v.shape[-2] if key_padding_mask is None else weight.sum(-2, keepdim=True)
    return (total / count).to(v.dtype)


def shaped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor | float,
    beta: Tensor | float,
    gamma: Tensor | float,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """(α·I + β·softmax(QKᵀ/√d + M) − γ·C)·V per head, with no T×T matrix for I and C.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``.
        alpha, beta, gamma: per-head gains of shape ``(heads,)`` (a number applies to every head).
        causal: hide keys after each query.
        key_padding_mask: bool ``(batch, tokens)``, True for tokens to ignore.
        scale: logit scale, default ``1/√head_dim``.
        backend: ``"sdpa"`` (PyTorch ``scaled_dot_product_attention``), ``"xformers"`` (CUDA only,
            falls back to SDPA with a warning), ``"math"`` (the explicit matrix A, then A·V), ``"triton"``
            (SDPA for the softmax, Triton kernels for the combination; CUDA, or CPU under
            ``TRITON_INTERPRET=1``; falls back to PyTorch ops with a warning) or ``"auto"`` (``"triton"``
            on CUDA when Triton imports; ``"math"`` on a CPU without autograd while heads·tokens² is at
            most :data:`~siclip.blocks.backends.CPU_EXPLICIT_SCORES`, in chunks of the batch; else ``"sdpa"``).

    Returns:
        ``(batch, heads, tokens, head_dim)``, laid out like ``v`` on the ``"math"`` path.
    """
    _check_qkv(q, k, v)
    batch, heads, tokens, _ = q.shape
    check_key_padding_mask(key_padding_mask, batch, tokens, causal)
    alpha, beta, gamma = (_head_gain(n, g, heads, v) for n, g in (("alpha", alpha), ("beta", beta), ("gamma", gamma)))

    autograd = needs_autograd(q, k, v, alpha, beta, gamma)
    backend = resolve_backend(backend, q, key_padding_mask is not None, autograd)
    if backend == "math":

        def explicit(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
            attn_mask, is_causal = sdpa_mask(key_padding_mask, causal, tokens)
            probs = attention_probs(q, k, causal=is_causal, attn_mask=attn_mask, scale=scale)
            # In place only in a running model: an exported graph is functional (the diagonal's add is a Where there).
            inplace = not autograd and traced_kernel() is None
            shaped = _shape(probs, alpha, beta, gamma, causal=causal, key_padding_mask=key_padding_mask, inplace=inplace)
            return apply_attention(shaped, v)

        return in_cached_chunks(explicit, q, k, v, key_padding_mask, autograd=autograd)
    softmax_backend = "sdpa" if backend == "triton" else backend
    attn_mask, is_causal = sdpa_mask(key_padding_mask, causal, tokens)
    if attn_mask is not None and softmax_backend == "sdpa" and attn_mask.device != q.device:
        attn_mask = attn_mask.to(q.device)
    soft = softmax_attention(q, k, v, causal=is_causal, attn_mask=attn_mask, scale=scale, backend=softmax_backend)
    if backend == "triton":
        from .shaped_kernels import shaped_combine

        weight = None if key_padding_mask is None else (~key_padding_mask).to(v.dtype)
        gains = (g.reshape(heads).contiguous() for g in (alpha, beta, gamma))
        # Under autocast the kernel writes the autocast dtype, as SDPA does: the next product would cast a
        # wider output to it anyway (the same single rounding), at the cost of a pass.
        device = v.device.type
        out_dtype = torch.promote_types(v.dtype, soft.dtype)
        if torch.is_autocast_enabled(device) and out_dtype.is_floating_point:
            out_dtype = torch.get_autocast_dtype(device)
        return shaped_combine(v, soft, *gains, weight, causal, out_dtype)
    centre = centred_values(v, causal=causal, key_padding_mask=key_padding_mask)
    # Two fused multiply-adds over the full tensor; γ·C·V is (batch, heads, 1, d) when bidirectional.
    return torch.addcmul(torch.addcmul(-gamma * centre, alpha, v), beta, soft)


def _shape(
    probs: Tensor,
    alpha: Tensor,
    beta: Tensor,
    gamma: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    inplace: bool,
) -> Tensor:
    """A = β·P + α·I − γ·C from the softmax matrix P, gains ``(1, heads, 1, 1)``; in P's storage when ``inplace``
    (allowed only without autograd: the softmax's backward reads P)."""
    tokens = probs.shape[-1]
    centre: Tensor | float = 1.0 / tokens  # bidirectional, unpadded: C is uniform
    if causal or key_padding_mask is not None:
        rows = 1 if key_padding_mask is None else probs.shape[0]
        mask = additive_mask(rows, tokens, causal=causal, key_padding_mask=key_padding_mask, dtype=probs.dtype, device=probs.device)
        centre = torch.softmax(mask, dim=-1)
    if not inplace:
        eye = torch.eye(tokens, dtype=probs.dtype, device=probs.device)
        return beta * probs + alpha * eye - gamma * centre
    matrix = probs.mul_(beta)
    matrix.diagonal(dim1=-2, dim2=-1).add_(alpha[..., 0])  # (1, heads, 1) against the (batch, heads, tokens) diagonal
    return matrix.sub_(gamma * centre)


def shaped_attention_matrix(
    q: Tensor,
    k: Tensor,
    alpha: Tensor | float,
    beta: Tensor | float,
    gamma: Tensor | float,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The explicit ``(batch, heads, tokens, tokens)`` matrix α·I + β·softmax(QKᵀ/√d + M) − γ·softmax(M).

    For tests and analysis: this is the T×T tensor the fast path avoids.
    """
    _check_qkv(q, k, k)
    batch, heads, tokens, head_dim = q.shape
    check_key_padding_mask(key_padding_mask, batch, tokens, causal)
    alpha, beta, gamma = (_head_gain(n, g, heads, q) for n, g in (("alpha", alpha), ("beta", beta), ("gamma", gamma)))
    mask = additive_mask(batch, tokens, causal=causal, key_padding_mask=key_padding_mask, dtype=q.dtype, device=q.device)
    scale = head_dim**-0.5 if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-2, -1) * scale + mask, dim=-1)
    centre = torch.softmax(mask, dim=-1)  # C = softmax(M), literally the definition
    eye = torch.eye(tokens, dtype=q.dtype, device=q.device)
    return alpha * eye + beta * probs - gamma * centre


def shaped_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor | float,
    beta: Tensor | float,
    gamma: Tensor | float,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Plain reference: materialise the shaped matrix A and return A·V. Quadratic memory; for tests."""
    _check_qkv(q, k, v)
    matrix = shaped_attention_matrix(
        q, k, alpha, beta, gamma, causal=causal, key_padding_mask=key_padding_mask, scale=scale
    )
    return matrix @ v


class ShapedAttention(nn.Module):
    """Shaped attention with trainable per-head gains α, β, γ (each of shape ``(heads,)``).

    Initialisation follows the official SAS configuration: α = β = γ = 1, so with a zero query
    projection (softmax = C) the matrix is exactly the identity.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        alpha_init: float = 1.0,
        beta_init: float = 1.0,
        gamma_init: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.alpha = nn.Parameter(torch.full((num_heads,), float(alpha_init)))
        self.beta = nn.Parameter(torch.full((num_heads,), float(beta_init)))
        # The official code ties γ's init to β's, so that β·C − γ·C cancels at a zero query.
        self.gamma = nn.Parameter(torch.full((num_heads,), float(beta_init if gamma_init is None else gamma_init)))

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        gain: Tensor | None = None,
    ) -> Tensor:
        """``gain`` (a scalar tensor) multiplies the whole output; folding it into α, β, γ saves a pass."""
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        if gain is not None:
            alpha, beta, gamma = alpha * gain, beta * gain, gamma * gain
        return shaped_attention(
            q, k, v, alpha, beta, gamma, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"
