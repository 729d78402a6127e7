"""The input side of a parallel (SAS-P) block as one autograd function: LayerNorm, one projection, activation.

For tokens X (N × d) and the stacked weights W = [W_Q; W_K; W_1] (biases b likewise)::

    H = LayerNorm(X),   Z = H·Wᵀ + b = [Q | K | P],   A = act(P)

returns (Q, K, H, A): queries, keys, the values of shaped attention (W_V = I, so V = H) and the MLP's
activation. The backward, with dQ, dK, dH, dA flowing in::

    G  = [dQ | dK | act'(P)·dA]            (one buffer; act' is written straight into its slice)
    dH' = dH + G·W                          (one matrix product; dH enters as its accumulator)
    dW = Gᵀ·H,   db = Σ_rows G,   dX = LayerNorm_backward(dH')

What this saves against autograd composing the same ops (``benchmarks/block_traffic.py`` counts it):

- **the ``cat`` of the split projection's gradients**: only dQ and dK are copied into G; the activation's
  gradient is written into G where it belongs;
- **the ``add`` passes accumulating H's gradient**: the value path's dH enters the matrix product as its
  accumulator (β = 1), instead of being added to its result afterwards, in float32;
- **one cast each way under autocast**: H is cast to the autocast dtype once and used by both the
  projection and attention (autocast casts an activation again at every op that takes it), and dH' is cast
  back once for the norm's backward.

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
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, qk_width, act, dtype, norm_dtype):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            tokens = x.reshape(-1, x.shape[-1]).to(norm_dtype)
            affine = [None if p is None else p.to(norm_dtype) for p in (norm_weight, norm_bias)]
            normed, mean, rstd = torch.native_layer_norm(tokens, (x.shape[-1],), *affine, eps)
            h = normed.to(dtype)  # the one cast of H: projection and attention both read this copy
            w = weight.to(dtype)
            z = torch.addmm(bias.to(dtype), h, w.t()) if bias is not None else h @ w.t()
            pre = z[:, 2 * qk_width :]
            a = _ACTIVATIONS[act][0](pre)
        ctx.save_for_backward(tokens, mean, rstd, *affine, h, w, pre)
        ctx.meta = (x.shape, x.dtype, qk_width, act, *(None if p is None else p.dtype for p in (norm_weight, norm_bias, weight, bias)))
        lead = x.shape[:-1]
        q, k = z[:, :qk_width], z[:, qk_width : 2 * qk_width]
        return q.view(*lead, -1), k.view(*lead, -1), h.view(x.shape), a.view(*lead, -1)

    @staticmethod
    def backward(ctx, dq, dk, dh, da):  # noqa: D102
        tokens, mean, rstd, norm_weight, norm_bias, h, w, pre = ctx.saved_tensors
        shape, x_dtype, qk_width, act, norm_weight_dtype, norm_bias_dtype, weight_dtype, bias_dtype = ctx.meta
        needs = ctx.needs_input_grad
        with torch.autocast(tokens.device.type, enabled=False):
            grad = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
            for i, d in enumerate((dq, dk)):
                part = grad[:, i * qk_width : (i + 1) * qk_width]
                if d is None:
                    part.zero_()
                else:  # dQ and dK arrive in attention's head layout: one strided copy into G, not a reshape first
                    part.view(d.shape).copy_(d)
            hidden = grad[:, 2 * qk_width :]
            if da is None:
                hidden.zero_()
            else:
                _ACTIVATIONS[act][1](da.reshape(pre.shape).to(pre.dtype), pre, hidden)
            if dh is None:
                dh_total = grad @ w
            else:
                dh_total = torch.addmm(dh.reshape(h.shape).to(h.dtype), grad, w)
            dweight = (grad.t() @ h).to(weight_dtype) if needs[3] else None
            dbias = grad.sum(0).to(bias_dtype) if bias_dtype is not None and needs[4] else None
            dx, dnorm_weight, dnorm_bias = torch.ops.aten.native_layer_norm_backward(
                dh_total.to(tokens.dtype), tokens, (shape[-1],), mean, rstd, norm_weight, norm_bias,
                [needs[0], norm_weight is not None and needs[1], norm_bias is not None and needs[2]],
            )  # fmt: skip
        dx = None if dx is None else dx.view(shape).to(x_dtype)
        dnorm_weight = None if dnorm_weight is None else dnorm_weight.to(norm_weight_dtype)
        dnorm_bias = None if dnorm_bias is None else dnorm_bias.to(norm_bias_dtype)
        return dx, dnorm_weight, dnorm_bias, dweight, dbias, None, None, None, None, None


def norm_project_act(
    x: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Tensor | None, qk_width: int, act: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Q, K, H, act(P)) of ``[Q | K | P] = LayerNorm(x)·weightᵀ + bias`` with the fused backward above.

    ``weight`` stacks W_Q and W_K (``qk_width`` rows each) over W_1; ``act`` is a key of
    :data:`_ACTIVATIONS`. Under autocast every output is in the autocast dtype (H included, cast once) and
    the norm runs in float32, as autocast runs ``layer_norm``; otherwise everything is in ``x``'s dtype.
    """
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    norm_dtype = torch.float32 if autocast else x.dtype
    return _NormProjectAct.apply(x, norm.weight, norm.bias, weight, bias, norm.eps, qk_width, act, dtype, norm_dtype)
