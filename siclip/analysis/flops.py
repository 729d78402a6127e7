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

from siclip.blocks.flop_count import CPU_ATTENTION_FLOPS, flop_counter  # noqa: F401 (CPU_ATTENTION_FLOPS: re-exported)


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


def _call(model: nn.Module, inputs):
    if callable(inputs) and not isinstance(inputs, (Tensor, nn.Module)):
        return inputs()
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def pick_output(output, pick=None) -> Tensor:
    """The tensor of a model's output to differentiate: ``pick(output)`` when callable, the field or key ``pick``
    names (``"pooler_output"``), else the output itself, a tensor's first element of a tuple, or a model output's
    first tensor field (transformers' ``last_hidden_state``)."""
    if callable(pick):
        return pick(output)
    if pick is not None:
        return output[pick] if isinstance(output, dict) or (isinstance(pick, int) and isinstance(output, (tuple, list))) else getattr(output, pick)
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    values = output.values() if isinstance(output, dict) else vars(output).values()
    return next(v for v in values if isinstance(v, Tensor))


def module_flops(model: nn.Module, inputs, *, output=None, backward: bool = False) -> tuple[int, dict[str, int]]:
    """``(total FLOPs, FLOPs per top-level child)`` of ``model`` called on ``inputs`` (a tensor, a tuple of positional
    arguments, a dict of keyword arguments, or a function that runs it), counted by PyTorch's ``FlopCounterMode`` at
    the dispatcher (every matrix product, convolution and fused attention, FLOPs = 2 × multiply-adds). ``backward``:
    forward and backward of the output ``output`` picks (:func:`pick_output`), as a training step runs them."""
    with flop_counter() as counter:
        if backward:
            y = pick_output(_call(model, inputs), output)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                _call(model, inputs)
    counts = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}

    def flops_of(path: str, module: nn.Module) -> int:
        # A called module's count includes its children's; a container that is never called (a ModuleList) sums them.
        key = f"{type(model).__name__}.{path}"
        return counts[key] if key in counts else sum(flops_of(f"{path}.{n}", m) for n, m in module.named_children())

    by_child = {name: flops_of(name, child) for name, child in model.named_children()}
    return int(counter.get_total_flops()), {name: f for name, f in by_child.items() if f}


def clip_train_step_flops(model, batch: int = 2) -> float:
    """FLOPs of one CLIP-loss training step of a siclip CLIP on ``batch`` random pairs at its input size: forward and
    backward of both towers and of the loss, counted as a compute budget counts a run's step
    (:func:`siclip.train.budget.measure_step_flops`; the model's buffers and gradients are left as they were)."""
    from siclip.distill import ObjectiveConfig, SiCLIPObjective
    from siclip.train.budget import measure_step_flops
    from siclip.train.task import TrainingTask

    images, ids = clip_inputs(model, batch)
    pairs = {"image": (images * 255).to(torch.uint8), "text": ids, "size": batch}
    objective = SiCLIPObjective(model.embed_dim, None, ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))
    return measure_step_flops(TrainingTask(model, objective), [pairs], device=torch.device("cpu"))


def model_report(model, inputs=None, *, output=None, backward: bool = False, train_batch: int | None = None) -> dict:
    """FLOPs and parameters.

    - ``model_report(clip)``: a siclip CLIP's per-image and per-caption GFLOPs and parameters (inference, batch 1);
      with ``train_batch=B`` also ``gflops_train_step``, one CLIP-loss training step at batch B (forward and backward,
      :func:`clip_train_step_flops`), and ``gflops_train_pair``, that ÷ B.
    - ``model_report(any_module, inputs, output=..., backward=...)``: any module (a transformers, timm or open_clip
      model, converted or not) on the inputs it is called with (:func:`module_flops`): ``params`` (shared
      parameters once), ``trainable``, ``gflops`` (forward, or forward + backward of the picked output) and
      ``gflops_by_module`` (per top-level child).
    """
    if inputs is None:
        report = _clip_report(model)
        if train_batch is not None:
            step = clip_train_step_flops(model, train_batch) / 1e9
            report |= {"train_batch": train_batch, "gflops_train_step": step, "gflops_train_pair": step / train_batch}
        return report
    from siclip.blocks import count_parameters

    was_training = model.training
    model.train(backward)
    try:
        total, by_child = module_flops(model, inputs, output=output, backward=backward)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {"model": type(model).__name__, "params": count_parameters(model), "trainable": count_parameters(model, trainable_only=True),
            "gflops": total / 1e9, "gflops_by_module": {k: v / 1e9 for k, v in by_child.items()}}  # fmt: skip


@torch.no_grad()
def _clip_report(model) -> dict:
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
