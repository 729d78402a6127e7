"""Run a token block on channels-first feature maps, as hybrid CNN/transformer encoders need."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn


class Block2d(nn.Module):
    """Wrap a ``(batch, tokens, dim)`` block to act on ``(batch, channels, height, width)`` maps.

    The map is flattened row-major into ``height·width`` tokens of ``channels`` features and restored
    after the block. With ``norm="batchnorm"`` the block's norm equals ``nn.BatchNorm2d`` on the map.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Block2d expects (batch, channels, height, width), got shape {tuple(x.shape)}")
        height = x.shape[-2]
        y = self.block(rearrange(x, "b c h w -> b (h w) c"))
        return rearrange(y, "b (h w) c -> b c h w", h=height)
