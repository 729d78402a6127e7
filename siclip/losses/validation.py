"""Input checks shared by every loss: clear errors instead of silent broadcasting or NaN training."""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteInput(ValueError):
    """A loss was given features holding NaN or Inf (the training loop reports it as a non-finite forward pass)."""


def check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("image_features", "text_features"), same_width: bool = True) -> None:
    """Two ``(batch, dim)`` feature tensors of one batch, finite."""
    for name, t in zip(names, (a, b)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a (batch, dim) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {names[0]} has {a.shape[0]} rows, {names[1]} has {b.shape[0]}")
    if same_width and a.shape[1] != b.shape[1]:
        raise ValueError(f"widths differ: {names[0]} is {a.shape[1]}-d, {names[1]} is {b.shape[1]}-d")
    for name, t in zip(names, (a, b)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteInput(f"{name} contains NaN or Inf")
