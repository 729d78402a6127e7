"""FLOPs and parameters per module, with fvcore, counting attention too.

fvcore skips ``aten::scaled_dot_product_attention`` by default, so the fused attention of every block
(and the softmax term of shaped attention) would vanish from the count. :func:`sdpa_flop_jit` registers
it: ``B·H·Tq·Tk·(d_qk + d_v)`` multiply-adds (QKᵀ and the weighted sum). Shaped attention's identity and
centring terms are element-wise and, like activations and norms, not counted. Figures are reported as
FLOPs = 2 × multiply-adds, the convention of ``torch.utils.flop_counter``; only matrix products and
convolutions count, so the two tools agree (tested).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

def _shape(value) -> list[int]:
    return value.type().sizes()


def sdpa_flop_jit(inputs, outputs) -> int:
    """Multiply-adds of ``scaled_dot_product_attention(q, k, v)``: QKᵀ plus the weighted sum of V."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _no_flops(inputs, outputs) -> int:
    return 0


def flop_analysis(model: nn.Module, inputs: tuple) -> FlopCountAnalysis:
    """fvcore's analysis with attention counted and every non-matmul op ignored."""
    analysis = FlopCountAnalysis(model, inputs).set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    ignored = ["aten::batch_norm", "aten::layer_norm", "aten::group_norm", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
               "aten::mean", "aten::rms_norm"]  # fmt: skip
    # A handle of None only adds to fvcore's ignore list while its built-in handle still counts: use zero.
    return analysis.set_op_handle(**{op: _no_flops for op in ignored})


def total_flops(model: nn.Module, inputs: tuple) -> int:
    """FLOPs (2 × multiply-adds) of matrix products, convolutions and attention."""
    return 2 * int(flop_analysis(model, inputs).total())


def flops_by_module(model: nn.Module, inputs: tuple, depth: int = 2) -> dict[str, int]:
    """FLOPs per module, down to ``depth`` levels of names (e.g. ``text.transformer``)."""
    by_module = flop_analysis(model, inputs).by_module()
    out: dict[str, int] = defaultdict(int)
    for name, count in by_module.items():
        if name and name.count(".") == depth - 1:
            out[name] += 2 * int(count)
    return dict(out)


def reference_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (the cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


class _EncodeBoth(nn.Module):
    """Both encoders of a CLIP as one module, so one trace covers image and text."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.visual(images), self.model.text(ids)


def clip_inputs(model, batch: int = 1) -> tuple[Tensor, Tensor]:
    size, context = model.config.image.image_size, model.config.text.context_length
    ids = torch.ones(batch, context, dtype=torch.long)
    ids[:, -1] = model.config.text.vocab_size - 1
    return torch.rand(batch, 3, size, size), ids


@torch.no_grad()
def model_report(model) -> dict:
    """Per-image and per-caption GFLOPs and parameters of a CLIP model (inference, batch 1)."""
    images, ids = clip_inputs(model)
    wrapped = _EncodeBoth(model.eval())
    per_module = flops_by_module(wrapped, (images, ids), depth=2)
    from siclip.models import count_parameters_by_group

    params = count_parameters_by_group(model)
    return {
        "model": model.config.name,
        "params_total": params["total"],
        "params_image": params["image"],
        "params_text": params["text"],
        "gflops_image": per_module.get("model.visual", 0) / 1e9,
        "gflops_text": per_module.get("model.text", 0) / 1e9,
    }
