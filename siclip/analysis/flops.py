"""FLOPs and parameters per module, with fvcore, counting attention too.

fvcore skips ``aten::scaled_dot_product_attention`` by default, so the fused attention of every block
(and the softmax term of shaped attention) would vanish from the count. :func:`sdpa_flop_jit` registers
it: ``B·H·Tq·Tk·(d_qk + d_v)`` multiply-adds (QKᵀ and the weighted sum). Shaped attention's identity and
centring terms are element-wise and, like activations and norms, not counted. Figures are reported as
FLOPs = 2 × multiply-adds, the convention of ``torch.utils.flop_counter``; only matrix products and
convolutions count, so the two tools agree (tested).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from siclip.blocks.flop_count import CPU_ATTENTION_FLOPS


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


class _AttributedFlops:
    """``torch.utils.flop_counter.FlopCounterMode``'s counts (its registry, FLOPs = 2 × multiply-adds), each op
    attributed to the modules that made it.

    Forward ops belong to the modules whose ``forward`` is running. A backward op belongs to the modules that ran the
    forward op whose gradient it computes: every autograd node is tagged, when the module that created it returns,
    with the stack of modules then running (a module's pre-hook first tags what its inputs' graph already holds with its
    callers), and the backward's current node (``torch._C._current_autograd_node()``) names its owners. So a module's
    count is its forward and its own backward, and the top-level modules' counts add up to the total (with what ran
    outside every module, the loss and code outside ``forward``, apart). (PyTorch's own module tracker attributes
    backward by the order modules' backward hooks fire, which gave a two-layer MLP's last layer its forward alone.)"""

    def __init__(self, model: nn.Module, custom_mapping: dict) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=custom_mapping)
        self.registry = counter.flop_registry
        self.model, self.counter = model, counter
        self.stack: list[str] = []
        self.owners: dict = {}  # autograd node -> tuple of module paths
        self.by_path: dict[str, int] = defaultdict(int)
        self.total = 0
        counter._count_flops = self._count  # the counter's dispatch mode, our attribution

    def _count(self, func_packet, out, args, kwargs):
        if func_packet in self.registry:
            flops = int(self.registry[func_packet](*args, **kwargs, out_val=out))
            node = torch._C._current_autograd_node()
            for path in (self.owners.get(node, ()) if node is not None else self._owners()):
                self.by_path[path] += flops
            self.total += flops
        return out

    def _owners(self) -> frozenset[str]:
        """The running modules' paths and their prefixes (a container that is never called, a ModuleList, owns what its
        blocks do)."""
        return frozenset(".".join(parts[:i]) for path in self.stack for parts in [path.split(".")] for i in range(1, len(parts) + 1))

    def _tag(self, value) -> None:
        """Tag the untagged autograd nodes behind ``value``'s tensors with the current module stack."""
        owners = self._owners()
        pending = [t.grad_fn for t in _tensors(value) if t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or node in self.owners:
                continue
            self.owners[node] = owners
            pending.extend(next_node for next_node, _ in node.next_functions)

    def __enter__(self):
        names = {}
        for name, module in self.model.named_modules():  # a shared module is counted under its first name
            names.setdefault(id(module), name or type(self.model).__name__)

        def before(module, args, kwargs):
            self._tag((args, kwargs))
            self.stack.append(names[id(module)])

        def after(module, args, kwargs, output):
            self._tag(output)
            self.stack.pop()

        self.handles = []
        for module in {id(m): m for m in self.model.modules()}.values():
            self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            self.handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.counter.__exit__(*exc)
        finally:
            for handle in self.handles:
                handle.remove()
            self.owners.clear()


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in vars(value).values() for t in _tensors(v)] if hasattr(value, "__dict__") and not isinstance(value, nn.Module) else []


OUTSIDE = "(outside its modules)"


def module_flops(model: nn.Module, inputs, *, output=None, backward: bool = False) -> tuple[int, dict[str, int]]:
    """``(total FLOPs, FLOPs per top-level child)`` of ``model`` called on ``inputs`` (a tensor, a tuple of positional
    arguments, a dict of keyword arguments, or a function that runs it), counted at the dispatcher with PyTorch's
    ``FlopCounterMode`` registry (every matrix product, convolution and fused attention, FLOPs = 2 × multiply-adds),
    each op attributed to the modules that made it (:class:`_AttributedFlops`). ``backward``: forward and backward of
    the output ``output`` picks (:func:`pick_output`), as a training step runs them; a child's count is its forward and
    its own backward. FLOPs made outside every child (the model's own code, a loss) are under :data:`OUTSIDE`, so the
    entries add up to the total."""
    with _AttributedFlops(model, CPU_ATTENTION_FLOPS) as counter:
        if backward:
            y = pick_output(_call(model, inputs), output)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                _call(model, inputs)
    names = {id(m): n for n, m in model.named_modules()}
    by_child = {name: counter.by_path.get(names[id(child)], 0) for name, child in model.named_children() if names.get(id(child)) == name}
    by_child = {name: f for name, f in by_child.items() if f}
    outside = counter.total - sum(by_child.values())
    if outside:
        by_child[OUTSIDE] = outside
    return counter.total, by_child


class ModelReport(Mapping):
    """What :func:`model_report` measured, read like the dict it used to be (``report["gflops"]``), printed as a
    table (``print(report)``), and saved as JSON (:meth:`save`)."""

    def __init__(self, values: dict) -> None:
        self.values = dict(values)

    def __getitem__(self, key):
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"ModelReport({self.values!r})"

    def __str__(self) -> str:
        lines = ["| measure | value |", "|---|---:|"]
        for key, value in self.values.items():
            if isinstance(value, dict):
                continue
            shown = value if isinstance(value, (bool, str)) else f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
            lines.append(f"| {key} | {shown} |")
        by_module = self.values.get("gflops_by_module")
        if by_module:
            total = self.values["gflops"]
            lines += ["", "| module | GFLOPs | share |", "|---|---:|---:|"]
            lines += [f"| {name} | {value:.6g} | {value / total:.1%} |" for name, value in by_module.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(self.values)

    def save(self, path: str | Path) -> Path:
        """The report as JSON at ``path``, written atomically."""
        from siclip.storage import write_text_atomic

        return write_text_atomic(json.dumps(self.to_dict(), indent=1) + "\n", Path(path))


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


def model_report(model, inputs=None, *, output=None, backward: bool = False, train_batch: int | None = None) -> ModelReport:
    """FLOPs and parameters, as a :class:`ModelReport` (a table when printed, JSON when saved, a dict when read).

    - ``model_report(clip)``: a siclip CLIP's per-image and per-caption GFLOPs and parameters (inference, batch 1);
      with ``train_batch=B`` also ``gflops_train_step``, one CLIP-loss training step at batch B (forward and backward,
      :func:`clip_train_step_flops`), and ``gflops_train_pair``, that ÷ B.
    - ``model_report(any_module, inputs, output=..., backward=...)``: any module (a transformers, timm or open_clip
      model, converted or not) on the inputs it is called with (:func:`module_flops`): ``params`` (shared
      parameters once), ``trainable``, ``gflops`` (forward, or forward + backward of the picked output) and
      ``gflops_by_module`` (per top-level child, adding up to ``gflops``).
    """
    if inputs is None:
        from siclip.models import CLIP

        if not isinstance(model, CLIP):
            raise TypeError(f"model_report(model) without inputs measures a siclip CLIP at batch 1; a {type(model).__name__} needs the inputs "
                            "it is called with: model_report(model, inputs) (a tensor, a tuple, a dict of keyword arguments, or a "
                            "function that runs it)")  # fmt: skip
        report = _clip_report(model)
        if train_batch is not None:
            step = clip_train_step_flops(model, train_batch) / 1e9
            report |= {"train_batch": train_batch, "gflops_train_step": step, "gflops_train_pair": step / train_batch}
        return ModelReport(report)
    from siclip.blocks import count_parameters

    was_training = model.training
    model.train(backward)
    try:
        total, by_child = module_flops(model, inputs, output=output, backward=backward)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return ModelReport({"model": type(model).__name__, "params": count_parameters(model), "trainable": count_parameters(model, trainable_only=True),
                        "gflops": total / 1e9, "backward": backward, "gflops_by_module": {k: v / 1e9 for k, v in by_child.items()}})  # fmt: skip


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
