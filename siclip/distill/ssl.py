"""SLIP's self-supervised image branch (Mu et al. 2022): a projection MLP over two augmented views, scored by NT-Xent.

    z = W₃·ReLU(BN(W₂·ReLU(BN(W₁·x + c₁)) + c₂)) + c₃            (SLIP's ``image_mlp``: Linear–BN–ReLU–Linear–BN–ReLU–Linear)
    L_ssl = NT-Xent(z(view₁), z(view₂); τ = 0.1)                  (:class:`~siclip.losses.NTXentLoss`)
    L = L_clip + ssl_scale·L_ssl + …,  ssl_scale = 1                (SLIP's weighting)

Sizes: SLIP's head is 4096 wide and 256 out, on a ViT-B's 768-d features. The tiny towers here are 64–512 d, where
a 4096-wide head would outweigh the tower; :func:`slip_head_sizes` keeps SLIP's ratios below 512 d — hidden
``min(4096, 8·d)``, out ``min(256, d)`` — and is exactly SLIP's 4096 / 256 from d = 512 up.

What the head reads (the reading taken where SLIP's towers and these differ): SLIP applies it to the image trunk's
pooled output, before the CLIP projection. Here it reads the tower's CLIP embedding (unit norm, what
``encode_image`` returns), the one image feature every student (MobileCLIP's MCi, a ViT, a converted transformers
or open_clip CLIP) exposes the same way; the first Linear and BatchNorm re-scale it, so the unit norm costs nothing.
"""

from __future__ import annotations

from torch import Tensor, nn


def slip_head_sizes(in_dim: int) -> tuple[int, int]:
    """``(hidden, out)`` of the SLIP head for features of width ``in_dim``: ``(min(4096, 8·d), min(256, d))``."""
    if in_dim < 1:
        raise ValueError(f"the SLIP head needs a positive input width, got {in_dim}")
    return min(4096, 8 * in_dim), min(256, in_dim)


class SlipHead(nn.Module):
    """SLIP's projection MLP, ``(batch, in_dim) → (batch, out_dim)``; sizes from :func:`slip_head_sizes` unless given.

    SLIP's BatchNorms are SyncBatchNorm (statistics over every rank's batch); these are plain BatchNorm1d: each rank
    normalises its own views, as each of SLIP's GPUs would with one rank. Each view passes the head on its own, as in
    SLIP, so its BatchNorm sees one view's batch at a time.
    """

    def __init__(self, in_dim: int, hidden: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        default_hidden, default_out = slip_head_sizes(in_dim)
        hidden, out_dim = hidden or default_hidden, out_dim or default_out
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )  # fmt: skip

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)
