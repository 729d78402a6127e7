"""Which parameters get weight decay: the SAS/CLIP convention, none on gains, norms and biases."""

from __future__ import annotations

from typing import Iterable

from torch import nn


def no_weight_decay_names(model: nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Names of the parameters that should not be decayed.

    Every parameter of at most one dimension: norm weights and biases, linear biases, the per-head
    α/β/γ and block gains of shaped blocks, layer-scale vectors, logit scales. Shared parameters are
    listed once, under their first name. ``extra`` adds names (e.g. embeddings) and a model's own
    ``no_weight_decay()`` set is honoured, as in timm.
    """
    names = {name for name, p in model.named_parameters() if p.ndim <= 1}
    names.update(extra)
    own = getattr(model, "no_weight_decay", None)
    if callable(own):
        names.update(own())
    return names


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float = 0.1, extra_no_decay: Iterable[str] = ()
) -> list[dict]:
    """Two AdamW parameter groups, ``weight_decay`` and 0, over the trainable parameters only."""
    skip = no_weight_decay_names(model, extra_no_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
