"""SimCLR's NT-Xent over two augmented views of each image (Chen et al. 2020), SLIP's self-supervised term.

For a batch of N images with view embeddings a_i, b_i (normalised here: ``â = a/‖a‖``) and temperature τ, each of
the 2N views is an anchor whose positive is the other view of its image and whose negatives are the 2N − 2 views of
the other images::

    ℓ(a_i) = −log  exp(â_i·b̂_i/τ) / [ Σ_j exp(â_i·b̂_j/τ) + Σ_{j≠i} exp(â_i·â_j/τ) ]
    ℓ(b_i) = −log  exp(b̂_i·â_i/τ) / [ Σ_j exp(b̂_i·â_j/τ) + Σ_{j≠i} exp(b̂_i·b̂_j/τ) ]
    L = (1/2N) Σ_i [ℓ(a_i) + ℓ(b_i)],   τ = 0.1 (SLIP)

With several ranks the views are gathered (:mod:`siclip.losses.gather`) and N is the global batch, as SLIP's
``SIMCLRLoss`` does; with ``local_loss`` each rank scores only its own anchors against every rank's views (the mean
over ranks is the full loss), otherwise every rank computes the whole loss, as :class:`~siclip.losses.ClipLoss` does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .gather import distributed_info, gather_features
from .validation import check_pair


class NTXentLoss(nn.Module):
    """``loss(a, b)`` for ``(batch, dim)`` view embeddings of the same images, row i of each the same image."""

    def __init__(self, temperature: float = 0.1, *, local_loss: bool = False, gather_with_grad: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"the NT-Xent temperature must be positive, got {temperature}")
        self.temperature, self.local_loss, self.gather_with_grad = temperature, local_loss, gather_with_grad

    def forward(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        check_pair(view_a, view_b, ("first view", "second view"))
        rank, world = distributed_info()
        a, b = F.normalize(view_a, dim=-1), F.normalize(view_b, dim=-1)
        all_a, all_b = gather_features(a, b, gather_with_grad=self.gather_with_grad)
        rows = a.shape[0]
        if self.local_loss or world == 1:
            anchors_a, anchors_b, offset = a, b, rank * rows if world > 1 else 0
        else:
            anchors_a, anchors_b, offset = all_a, all_b, 0
        # Row r of the anchors is image offset + r of the gathered batch: its positive column, and its own view's
        # column, which is no negative (−∞ drops it from the softmax).
        labels = torch.arange(offset, offset + anchors_a.shape[0], device=a.device)
        itself = F.one_hot(labels, all_a.shape[0]).bool()
        a_to_b, b_to_a = anchors_a @ all_b.T / self.temperature, anchors_b @ all_a.T / self.temperature
        a_to_a = (anchors_a @ all_a.T / self.temperature).masked_fill(itself, float("-inf"))
        b_to_b = (anchors_b @ all_b.T / self.temperature).masked_fill(itself, float("-inf"))
        loss_a = F.cross_entropy(torch.cat([a_to_b, a_to_a], dim=1), labels)
        loss_b = F.cross_entropy(torch.cat([b_to_a, b_to_b], dim=1), labels)
        return (loss_a + loss_b) / 2
