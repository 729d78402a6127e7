"""Token blocks on channels-first feature maps, as hybrid CNN/transformer encoders need.

- :class:`Block2d` runs any ``(batch, tokens, dim)`` block on ``(batch, channels, height, width)`` maps.
- :class:`SASPBlock2d` is the parallel simplified block of a hybrid encoder's attention stage::

      H = BN(X),   X_out = β_SA·ShapedMHA(H over the h·w tokens) + β_FF·FFN(H)

  no skips (shaped attention's α·I carries the identity), one BatchNorm pre-norm shared by both branches,
  and a map FFN such as FastViT's ConvFFN (a depthwise conv before its 1×1 layers), run in parallel.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .backends import needs_autograd, resolve_backend
from .norms import create_norm
from .sas import ShapedSelfAttention


def _check_map(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects (batch, channels, height, width), got shape {tuple(x.shape)}")


class Block2d(nn.Module):
    """Wrap a ``(batch, tokens, dim)`` block to act on ``(batch, channels, height, width)`` maps.

    The map is flattened row-major into ``height·width`` tokens of ``channels`` features and restored
    after the block; keyword arguments go to the block. With ``norm="batchnorm"`` the block's norm equals
    ``nn.BatchNorm2d`` on the map.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        _check_map(x, "Block2d")
        height = x.shape[-2]
        y = self.block(rearrange(x, "b c h w -> b (h w) c"), **kwargs)
        return rearrange(y, "b (h w) c -> b c h w", h=height)


class SASPBlock2d(nn.Module):
    """Parallel simplified block on maps: X_out = β_SA·ShapedMHA(BN(X)) + β_FF·FFN(BN(X)), no skips.

    Args:
        dim, num_heads: channels and attention heads (``dim`` must divide).
        ffn: the feed-forward branch, a ``(batch, dim, h, w) -> (batch, dim, h, w)`` module.
        qk_bias, zero_query, trainable_value, backend: :class:`~siclip.blocks.sas.ShapedSelfAttention`'s.
        beta_sa, beta_ff: initial branch gains (published: 1 and 0.1).

    The pre-norm is the ``"batchnorm"`` form of :func:`~siclip.blocks.norms.create_norm` on the map's tokens,
    i.e. ``nn.BatchNorm2d`` with its state-dict keys; the attention branch is :class:`Block2d`'s layout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        *,
        qk_bias: bool = False,
        zero_query: bool = True,
        trainable_value: bool = False,
        beta_sa: float = 1.0,
        beta_ff: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm = create_norm("batchnorm", dim)
        self.attn = ShapedSelfAttention(
            dim, num_heads, qk_bias=qk_bias, trainable_value=trainable_value, zero_query=zero_query, backend=backend
        )
        self.ffn = ffn
        self.gain_attn = nn.Parameter(torch.tensor(float(beta_sa)))
        self.gain_mlp = nn.Parameter(torch.tensor(float(beta_ff)))

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def normed_map(self, x: Tensor) -> Tensor:
        """BN(X) as a ``(batch, dim, h, w)`` map in ``x``'s memory format (channels-first or channels-last)."""
        _check_map(x, type(self).__name__)
        if x.is_contiguous(memory_format=torch.channels_last):  # tokens (b, h·w, c) are a free view of it
            return rearrange(self.norm(rearrange(x, "b c h w -> b (h w) c")), "b (h w) c -> b c h w", h=x.shape[-2])
        return nn.BatchNorm1d.forward(self.norm, x.flatten(2)).view_as(x)  # (N, C, L): per-channel, as BatchNorm2d

    def normed_tokens(self, x: Tensor) -> Tensor:
        """H = BN(X) as ``(batch, h·w, dim)`` tokens."""
        return rearrange(self.normed_map(x), "b c h w -> b (h w) c")

    def forward_branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two terms of the output, ``(β_SA·ShapedMHA(BN(X)), β_FF·FFN(BN(X)))``, as maps.

        The FFN's convolutions read BN(X) in the input's memory format: converting a channels-first map to
        tokens for them made the ConvFFN 1.5× slower at batch 1 on a CPU (benchmarks/RESULTS.md)."""
        normed = self.normed_map(x)
        tokens = rearrange(normed, "b c h w -> b (h w) c")
        # SDPA's fused kernels need unit stride along channels (a channels-first map's token view would send
        # them to their math path), so such tokens are copied once for them. The explicit path reads any
        # layout and writes its output in the values' layout, so a channels-first map stays one, uncopied.
        heads = rearrange(tokens, "b t (h d) -> b h t d", h=self.num_heads)
        autograd = needs_autograd(normed, self.attn.q.weight, self.gain_attn)
        if resolve_backend(self.attn.shaped.backend, heads, False, autograd) != "math":
            tokens = tokens.contiguous()
        attention = rearrange(self.attn(tokens, gain=self.gain_attn), "b (h w) c -> b c h w", h=x.shape[-2])
        return attention, self.gain_mlp * self.ffn(normed)

    def forward(self, x: Tensor) -> Tensor:
        attention, ffn = self.forward_branches(x)
        return ffn + attention  # the sum takes the FFN output's layout, which is the input's
