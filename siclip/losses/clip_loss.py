"""Contrastive image–text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid.

CLIP (Radford et al. 2021)::

    L = ½·[CE(s·V Tᵀ, I) + CE(s·T Vᵀ, I)],   s = exp(logit_scale), V, T unit-norm

The scale is used as given: clamping it here would cut its gradient once it reached 100, and it could never
come back down. The training step bounds the parameter instead (``logit_scale ≤ ln 100`` after each
optimiser step, as open_clip does; :func:`siclip.train.step.create_optimizer`).

With several ranks the features are gathered (:mod:`siclip.losses.gather`); with ``local_loss`` each rank
scores only its own rows against everyone's columns (the mean over ranks is the full loss).

SigLIP (Zhai et al. 2023)::

    L = −(1/n)·Σ_ij log σ(z_ij·(t·v_i·t_j + b)),   z_ij = 1 if i = j else −1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .gather import distributed_info, gather_features
from .validation import check_pair


def clip_logits(image: Tensor, text: Tensor, scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(image→text, text→image)`` logits ``s·V Tᵀ`` and ``s·T Vᵀ`` (``s`` unclamped, see the module docstring)."""
    scale = torch.as_tensor(scale, dtype=image.dtype, device=image.device)
    logits = scale * image @ text.T
    return logits, logits.T


class ClipLoss(nn.Module):
    """Symmetric InfoNCE on (already normalised) features; ``logit_scale`` is exp(s), as models return it."""

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = True) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self._labels: dict[tuple, Tensor] = {}

    def labels(self, rows: int, device: torch.device, offset: int) -> Tensor:
        """Targets of the local rows: their own index in the gathered batch (cached per device and size)."""
        key = (rows, device, offset)
        if key not in self._labels:
            labels = torch.arange(offset, offset + rows, device=device)
            if not self.cache_labels:
                return labels
            self._labels[key] = labels
        return self._labels[key]

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
        check_pair(image_features, text_features)
        rank, world = distributed_info()
        all_image, all_text = gather_features(image_features, text_features, gather_with_grad=self.gather_with_grad)
        rows = image_features.shape[0]
        if self.local_loss or world == 1:
            per_image, _ = clip_logits(image_features, all_text, logit_scale)
            per_text, _ = clip_logits(text_features, all_image, logit_scale)
            labels = self.labels(rows, image_features.device, rank * rows if world > 1 else 0)
        else:
            per_image, per_text = clip_logits(all_image, all_text, logit_scale)
            labels = self.labels(all_image.shape[0], image_features.device, 0)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss with its own learnable temperature t = exp(t') and bias b (init 10, −10)."""

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, *, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float | None = None) -> Tensor:
        """``logit_scale`` (exp'd) overrides the module's own temperature when given."""
        check_pair(image_features, text_features)
        rank, world = distributed_info()
        (all_text,) = gather_features(text_features, gather_with_grad=self.gather_with_grad)
        scale = self.logit_scale.exp() if logit_scale is None else torch.as_tensor(logit_scale)
        logits = scale * image_features @ all_text.T + self.logit_bias
        rows = image_features.shape[0]
        signs = -torch.ones_like(logits)
        signs[torch.arange(rows), torch.arange(rank * rows, (rank + 1) * rows)] = 1
        return -F.logsigmoid(signs * logits).sum() / rows
