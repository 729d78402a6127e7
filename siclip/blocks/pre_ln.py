"""The standard Pre-LN transformer block, the baseline SAS-P is measured against.

    X̂ = X + ls₁·MHA(Norm₁(X)),   X_out = X̂ + ls₂·MLP(Norm₂(X̂))        (He & Hofmann Eq. 1–2, α = β = 1)

with optional layer scale (ls, as in MobileCLIP's image attention blocks and CaiT).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention
from .init import init_linears
from .masking import check_block_input, resolve_block_masks
from .mlp import Mlp
from .norms import NormSpec, create_norm


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x·γ`` (Touvron et al., CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class PreLNBlock(nn.Module):
    """Pre-LN block on ``(batch, tokens, dim)``: attention and MLP sub-blocks, each with a skip."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm: NormSpec = "layernorm",
        act: str | nn.Module = "gelu",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mlp_bias: bool = True,
        causal: bool = False,
        layer_scale_init: float | None = None,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.causal = dim, causal
        self.norm1 = create_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, fused_attn=fused_attn)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = create_norm(norm, dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act=act, bias=mlp_bias)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        init_linears(self)

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool | None = None, **kw) -> Tensor:
        check_block_input(x, self.dim, type(self).__name__)
        causal, key_padding_mask = resolve_block_masks(self.causal, key_padding_mask, causal, **kw)
        x = x + self.ls1(self.attn(self.norm1(x), causal=causal, key_padding_mask=key_padding_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))
