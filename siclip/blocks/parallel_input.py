"""The input side of a parallel (SAS-P) block as one autograd function: LayerNorm, its projections, activation.

For tokens X (N × d), the query, key and first MLP weights W_Q, W_K, W_1 (biases b likewise)::

    H = LayerNorm(X),   Q = H·W_Qᵀ + b_Q,   K = H·W_Kᵀ + b_K,   P = H·W_1ᵀ + b_1,   A = act(P)

returns (Q, K, H, A): queries, keys, the values of shaped attention (W_V = I, so V = H) and the MLP's
activation. The backward, with dQ, dK, dH, dA flowing in::

    dP = act'(P)·dA
    dH' = dH + dQ·W_Q + dK·W_K + dP·W_1     (dH enters the first product as its accumulator, the others add in place)
    dW_• = d•ᵀ·H,   db_• = Σ_rows d•,   dX = LayerNorm_backward(dH')

What this saves against autograd composing the same ops (``benchmarks/block_traffic.py`` counts it):

- **every ``cat``**: the composed path stacks [W_Q; W_K; W_1] into one d×6d product per call (a copy of the
  weights, which at a CPU batch of a few hundred tokens outweighs the activations) and concatenates the split
  product's gradients in its backward; here each weight multiplies H on its own, and Q and K come out
  contiguous for attention;
- **the ``add`` passes accumulating H's gradient**: the value path's dH enters the matrix products as their
  accumulator (β = 1), instead of being added to their results afterwards, in float32;
- **one cast each way under autocast**: H is cast to the autocast dtype once and used by the projections and
  attention (autocast casts an activation again at every op that takes it), and dH' is cast back once for the
  norm's backward.

Everything else is the same arithmetic as the unfused path (``SASPBlock(fused_input=False)``), which is the
reference the tests hold this to in float64. The block takes the unfused path where the function would not
pay: under ``torch.compile`` (Inductor fuses those elementwise passes itself), under the JIT tracer (which
cannot see into it) and when autograd is not recording (inference: there is no backward to save, and the
autograd function's call overhead cost 3 % of the text encoder at batch 1 on a CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Activations whose backward has an out= form, so act'(P)·dA can be written into a slice of G:
# name -> (forward, backward into ``out``).
_ACTIVATIONS = {
    "gelu": (
        lambda p: nn.functional.gelu(p),
        lambda da, p, out: torch.ops.aten.gelu_backward.grad_input(da, p, approximate="none", grad_input=out),
    ),
    "gelu_tanh": (
        lambda p: nn.functional.gelu(p, approximate="tanh"),
        lambda da, p, out: torch.ops.aten.gelu_backward.grad_input(da, p, approximate="tanh", grad_input=out),
    ),
    "relu": (
        torch.relu,
        lambda da, p, out: torch.ops.aten.threshold_backward.grad_input(da, p, 0.0, grad_input=out),
    ),
    "silu": (
        nn.functional.silu,
        lambda da, p, out: torch.ops.aten.silu_backward.grad_input(da, p, grad_input=out),
    ),
}


def activation_name(act: nn.Module) -> str | None:
    """The :data:`_ACTIVATIONS` key for an activation module, or None when it has no fused form."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.SiLU:
        return "silu"
    return None


def fusable_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a LayerNorm over the last axis only, which the fused function implements."""
    return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1


class _NormProjectAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, w_q, b_q, w_k, b_k, w_1, b_1, eps, act, dtype, norm_dtype):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            tokens = x.reshape(-1, x.shape[-1]).to(norm_dtype)
            affine = [None if p is None else p.to(norm_dtype) for p in (norm_weight, norm_bias)]
            normed, mean, rstd = torch.native_layer_norm(tokens, (x.shape[-1],), *affine, eps)
            h = normed.to(dtype)  # the one cast of H: the three products and attention all read this copy
            weights = [w.to(dtype) for w in (w_q, w_k, w_1)]
            # Three products, not one over the stacked weights: stacking copies the d×6d weights every call (at a
            # CPU batch of a few hundred tokens that copy is larger than the activations), and Q and K come out
            # contiguous for attention.
            q, k, pre = (h @ w.t() if b is None else torch.addmm(b.to(dtype), h, w.t()) for w, b in zip(weights, (b_q, b_k, b_1)))
            a = _ACTIVATIONS[act][0](pre)
        ctx.save_for_backward(tokens, mean, rstd, *affine, h, *weights, pre)
        ctx.meta = (x.shape, x.dtype, act, *(None if p is None else p.dtype for p in (norm_weight, norm_bias, w_q, b_q, w_k, b_k, w_1, b_1)))
        lead = x.shape[:-1]
        return q.view(*lead, -1), k.view(*lead, -1), h.view(x.shape), a.view(*lead, -1)

    @staticmethod
    def backward(ctx, dq, dk, dh, da):  # noqa: D102
        tokens, mean, rstd, norm_weight, norm_bias, h, w_q, w_k, w_1, pre = ctx.saved_tensors
        shape, x_dtype, act, norm_weight_dtype, norm_bias_dtype, *dtypes = ctx.meta
        needs = ctx.needs_input_grad
        with torch.autocast(tokens.device.type, enabled=False):
            # dQ and dK arrive in attention's head layout: one copy each into token rows (the reshape)
            grads = [None if d is None else d.reshape(-1, d.shape[-1]).to(h.dtype) for d in (dq, dk)]
            if da is None:
                grads.append(None)
            else:
                grads.append(_ACTIVATIONS[act][1](da.reshape(pre.shape).to(pre.dtype), pre, torch.empty_like(pre)))
            # dH' = dH + dQ·W_Q + dK·W_K + dP·W_1: the value path's dH is the first product's accumulator (no
            # in-place write to a gradient autograd handed in), the others accumulate into that result
            dh_total = None
            for g, w in zip(grads, (w_q, w_k, w_1)):
                if g is None:
                    continue
                if dh_total is None:
                    dh_total = g @ w if dh is None else torch.addmm(dh.reshape(h.shape).to(h.dtype), g, w)
                else:
                    dh_total.addmm_(g, w)
            if dh_total is None:
                dh_total = torch.zeros_like(h) if dh is None else dh.reshape(h.shape).to(h.dtype)
            out = []  # (dW_Q, db_Q, dW_K, db_K, dW_1, db_1), in the order forward takes them (inputs 3 to 8)
            for g, w_dtype, b_dtype, need_w, need_b in zip(grads, dtypes[0::2], dtypes[1::2], needs[3:9:2], needs[4:9:2]):
                out.append(None if g is None or not need_w else (g.t() @ h).to(w_dtype))
                out.append(None if g is None or b_dtype is None or not need_b else g.sum(0).to(b_dtype))
            dx, dnorm_weight, dnorm_bias = torch.ops.aten.native_layer_norm_backward(
                dh_total.to(tokens.dtype), tokens, (shape[-1],), mean, rstd, norm_weight, norm_bias,
                [needs[0], norm_weight is not None and needs[1], norm_bias is not None and needs[2]],
            )  # fmt: skip
        dx = None if dx is None else dx.view(shape).to(x_dtype)
        dnorm_weight = None if dnorm_weight is None else dnorm_weight.to(norm_weight_dtype)
        dnorm_bias = None if dnorm_bias is None else dnorm_bias.to(norm_bias_dtype)
        return dx, dnorm_weight, dnorm_bias, *out, None, None, None, None


def norm_project_act(
    x: Tensor, norm: nn.LayerNorm, weights: tuple[Tensor, Tensor, Tensor], biases: tuple[Tensor | None, Tensor | None, Tensor | None], act: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Q, K, H, act(P)) of ``H = LayerNorm(x)``, ``Q = H·W_Qᵀ + b_Q``, ``K = H·W_Kᵀ + b_K``, ``P = H·W_1ᵀ + b_1``
    with the fused backward above.

    ``weights`` = (W_Q, W_K, W_1), ``biases`` likewise (None where a layer has none); ``act`` is a key of
    :data:`_ACTIVATIONS`. Under autocast every output is in the autocast dtype (H included, cast once) and
    the norm runs in float32, as autocast runs ``layer_norm``; otherwise everything is in ``x``'s dtype.
    """
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    norm_dtype = torch.float32 if autocast else x.dtype
    (w_q, w_k, w_1), (b_q, b_k, b_1) = weights, biases
    return _NormProjectAct.apply(x, norm.weight, norm.bias, w_q, b_q, w_k, b_k, w_1, b_1, norm.eps, act, dtype, norm_dtype)
