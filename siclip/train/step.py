"""One optimisation step, in the pieces the training loop and the step benchmark share.

    terms = forward_terms(model, batch, bf16=True)       # student, teacher, every loss term
    backward_and_step(terms["total"], optimizer, params, grad_clip=1.0)

The loop checks ``terms`` for non-finite values between the two, the gradient norm before the step
(``before_step``) and the weights after it, so the saved state is always the last good one;
``benchmarks/gpu_train_step.py`` times exactly these calls.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from siclip.blocks import param_groups_weight_decay
from siclip.models.clip import MAX_LOGIT_SCALE


TOWERS = ("image", "text")


def check_tower_names(values: dict, field: str) -> None:
    """Raise a ValueError naming ``field`` when ``values`` has a key that is not one of :data:`TOWERS`."""
    unknown = set(values) - set(TOWERS)
    if unknown:
        raise ValueError(f"{field} names unknown towers {sorted(unknown)}; towers are {list(TOWERS)}")


def tower_of(name: str) -> str | None:
    """The tower a parameter name belongs to: ``"image"`` (``visual.``), ``"text"`` (``text.``), else None.

    Names may be prefixed by their owner (``student.visual.…`` in a training task)."""
    parts = name.split(".")
    if "visual" in parts[:-1]:
        return "image"
    if "text" in parts[:-1]:
        return "text"
    return None


def create_optimizer(
    module: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
    tower_lr_scale: dict | None = None, inherited: set[str] = frozenset(), inherited_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters, no decay on gains, norms and biases; fused on CUDA.

    Each group holds one tower's parameters (``group["tower"]``: "image", "text" or None), at
    ``lr × tower_lr_scale[tower]`` (1 when not given); the parameters named in ``inherited`` (weights a student
    inherited and trains) form groups of their own (``group["inherited"]``) at that lr × ``inherited_lr_scale``.

    After every step the optimiser clamps each trainable ``logit_scale`` in place to [0, ln 100]
    (:func:`clamp_logit_scales_`), so the bound never sits inside a forward pass.
    """
    scales = dict(tower_lr_scale or {})
    check_tower_names(scales, "tower_lr_scale")
    if inherited_lr_scale < 0:
        raise ValueError(f"inherited_lr_scale must not be negative, got {inherited_lr_scale}")
    tower = {id(p): tower_of(name) for name, p in module.named_parameters()}
    is_inherited = {id(p): name in inherited for name, p in module.named_parameters()}
    groups = []
    for group in param_groups_weight_decay(module, weight_decay):
        for name in (*TOWERS, None):
            for kept in (False, True):
                params = [p for p in group["params"] if tower[id(p)] == name and is_inherited[id(p)] == kept]
                if params:
                    scale = scales.get(name, 1.0) * (inherited_lr_scale if kept else 1.0)
                    groups.append({**group, "params": params, "tower": name, "inherited": kept, "lr": lr * scale})
    on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None)
    temperatures = logit_scale_parameters(module)
    if temperatures:
        optimizer.register_step_post_hook(lambda *_: clamp_logit_scales_(temperatures))
    return optimizer


def logit_scale_parameters(module: nn.Module) -> list[Tensor]:
    """The trainable CLIP temperatures of ``module``: parameters named ``logit_scale`` (model, SigLIP loss)."""
    return [p for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] == "logit_scale" and p.requires_grad]


@torch.no_grad()
def clamp_logit_scales_(scales: Iterable[Tensor]) -> None:
    """s ← clamp(s, 0, ln 100) in place: exp(s) stays in [1, 100] while s keeps its gradient at the bound."""
    for scale in scales:
        scale.clamp_(0.0, MAX_LOGIT_SCALE)


def channels_last_on(device: torch.device, requested: bool = True) -> bool:
    """Whether to lay images and convolutions out channels-last on ``device``: on CUDA only.

    cuDNN prefers NHWC; on a CPU (torch 2.13) the backward of a strided 1×1 convolution in that layout
    corrupts the heap, and the CPU gains nothing from it.
    """
    return requested and torch.device(device).type == "cuda"


def to_device(batch: dict, device: torch.device, *, channels_last: bool = False) -> dict:
    """The batch's tensors on ``device``, images laid out channels-last when asked (the layout cuDNN convolutions
    prefer). Images stay uint8 crops: each model normalises them its own way (``TrainingTask``)."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if "image" in out and channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def trains_on_one_sample(student: nn.Module, image_size: int, device: torch.device) -> bool:
    """Whether the student, in training mode, takes a batch of one image. BatchNorm normalises each channel over
    batch × height × width values and refuses a single one: a map reduced to 1×1 (MCi's last stages at 32 px) fails
    on a batch that skipped samples left with one. Probed once on a blank image; the buffers it touches are put back."""
    buffers = list(student.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            student.encode_image(torch.zeros(1, 3, image_size, image_size, device=device))
        return True
    except ValueError as err:
        if "Expected more than 1 value per channel" not in str(err):
            raise
        return False
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def forward_terms(model: nn.Module, batch: dict, *, bf16: bool) -> dict[str, Tensor]:
    """The task's loss terms for ``batch``, under bf16 autocast when ``bf16``."""
    device_type = batch["image"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        return model(batch)


def backward_and_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    *,
    grad_clip: float | None,
    before_step: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Backward, clip the global gradient norm ‖g‖₂ = (Σ_p ‖g_p‖²)^½ to ``grad_clip`` (if set), optimizer step;
    returns the norm before clipping.

    ``before_step(norm)`` runs between clipping and the step (the loop's non-finite gradient check: it
    raises before a NaN gradient reaches the weights); with it the norm is computed even without clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = loss.new_zeros(())
    if grad_clip or before_step is not None:
        max_norm = grad_clip or float("inf")  # an infinite bound measures without clipping
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm, foreach=True)
    if before_step is not None:
        before_step(norm)
    optimizer.step()
    return norm
