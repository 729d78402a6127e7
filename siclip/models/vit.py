"""siclip's Vision Transformer image tower (Dosovitskiy et al. 2021, as open_clip's ``VisionTransformer`` lays it out).

    x = [cls;] Conv_p(img) + P           (patches of p×p pixels, learned positions P, a class token when pool="cls")
    x = patch_dropout(x)                 (identity unless a token-masking strategy such as FLIP installs a module)
    x = norm_pre(x);  x = Block_i(x) for i < L;  x = norm(x)
    feature = (x[:, 0] if pool == "cls" else mean_t x[:, t]) @ W_proj

Blocks are siclip's Pre-LN blocks (:class:`~siclip.blocks.PreLNBlock`, GELU) or SAS-P blocks
(:class:`~siclip.blocks.SASPBlock`, He & Hofmann's published initialisation), chosen by ``ViTConfig.block``.

**The ``patch_dropout`` contract** (where open_clip applies its ``PatchDropout``: after the positional embedding, before
the pre-norm and the first block): ``patch_dropout`` is an ``nn.Module`` mapping ``(batch, tokens, width)`` to
``(batch, kept, width)``; the first :attr:`VisionTransformer.num_prefix_tokens` tokens (the class token, when there is
one) are prefix tokens that it must keep, first and in order; in evaluation mode it must be the identity. Everything
after it reads the sequence length from its input, so any ``kept ≥ num_prefix_tokens + 1`` works. Pooling: the class
token (``pool="cls"``, the default, CLIP's and open_clip's reading) or the mean of every token that reached the last
block (``pool="mean"``, no class token; under masking the mean of the kept tokens, as in FLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from siclip.blocks import PreLNBlock, SASPBlock

from .stages import run_stages

VIT_BLOCKS = ("pre_ln", "sasp")
VIT_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class ViTConfig:
    """A ViT image tower; the defaults are the ``vit_tiny`` preset (:data:`siclip.models.towers.TOWER_PRESETS`)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 96
    layers: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    block: str = "pre_ln"  # "pre_ln" (Pre-LN, GELU) or "sasp" (SAS-P, He & Hofmann's defaults)
    pool: str = "cls"  # "cls": a class token, read after the last norm; "mean": no class token, the mean of the tokens
    family: str = "vit"

    def __post_init__(self) -> None:
        if self.block not in VIT_BLOCKS:
            raise ValueError(f"unknown ViT block {self.block!r}; choose one of {VIT_BLOCKS}")
        if self.pool not in VIT_POOLS:
            raise ValueError(f"unknown ViT pool {self.pool!r}; choose one of {VIT_POOLS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"ViT width {self.width} is not divisible by its {self.heads} heads")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class TokenEmbedding(nn.Module):
    """Images ``(batch, 3, S, S)`` → tokens ``(batch, prefix + (S/p)², width)``: patch projection, class token, positions."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width)) if config.pool == "cls" else None
        prefix = 1 if self.cls_token is not None else 0
        self.positional_embedding = nn.Parameter(torch.empty(prefix + config.grid**2, config.width))
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)  # timm's: the class token starts (nearly) at zero

    def forward(self, images: Tensor) -> Tensor:
        tokens = rearrange(self.proj(images), "b d h w -> b (h w) d")
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.positional_embedding


class TokenPool(nn.Module):
    """``(batch, tokens, width)`` → ``(batch, embed_dim)``: the final norm, then the class token or the token mean, ``@ proj``."""

    def __init__(self, width: int, embed_dim: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)
        return pooled @ self.proj


class VisionTransformer(nn.Module):
    """``(batch, 3, S, S)`` pixels (the model's own normalisation) → ``(batch, embed_dim)`` features (unnormalised)."""

    def __init__(self, config: ViTConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config)
        self.patch_dropout: nn.Module = nn.Identity()  # FLIP's token masking plugs in here (see the module docstring)
        self.norm_pre = nn.LayerNorm(config.width)
        if config.block == "pre_ln":
            blocks = [PreLNBlock(config.width, config.heads, config.mlp_ratio, act="gelu") for _ in range(config.layers)]
        else:
            blocks = [SASPBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)]
        self.blocks = nn.Sequential(*blocks)
        self.head = TokenPool(config.width, embed_dim, config.pool)
        self.grad_checkpointing = False

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (the class token): a ``patch_dropout`` module keeps them."""
        return 0 if self.embed.cls_token is None else 1

    def stages(self) -> list[nn.Module]:
        """The tower as a chain of units, in the order they run (see :func:`~siclip.models.stages.run_stages`)."""
        return [self.embed, self.patch_dropout, self.norm_pre, *self.blocks, self.head]

    def attention_blocks(self) -> tuple[str, nn.Sequential]:
        """The name (within the tower) and the stack of its transformer blocks: what SiCLIP converts and shares."""
        return "blocks", self.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trainable block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, height, width), got shape {tuple(images.shape)}")
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"this ViT takes {size}×{size} images (its positions are learned for that grid), got {tuple(images.shape[-2:])}")
        return run_stages(self.stages(), images, checkpointing=self.grad_checkpointing)
