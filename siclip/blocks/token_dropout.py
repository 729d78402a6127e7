"""FLIP's token masking (Li et al., *Scaling Language-Image Pre-training via Masking*, CVPR 2023), for any ViT tower.

During training a random subset of each image's patch tokens is dropped after the positional embedding and before
the first block; the prefix tokens (class, registers) are always kept::

    x ∈ ℝ^{B×(P+N)×D}  ↦  [x_{:, :P} ; x_{b, P + k_b}]  ∈ ℝ^{B×(P+K)×D},   K = max(1, ⌊N·(1 − r)⌋)

with ``k_b`` K distinct indices drawn uniformly for each sample b (ratio r = 0.5 or 0.75 in FLIP). Evaluation sees
every token (identity in eval mode). The blocks then run on P + K tokens, so a ViT's forward and backward cost
about (1 − r) of the unmasked ones; dropped tokens get no gradient. K floors as open_clip's and timm's
``PatchDropout`` do; the kept indices are drawn from the torch RNG of the tokens' device (saved with every
checkpoint, so a resumed run masks the same tokens) and returned in increasing order.

**Switching it on** for a model: :func:`enable_token_dropout` finds the model's image tower and puts a
:class:`TokenDropout` where that tower drops tokens — ``patch_dropout`` (siclip's ViT towers: any module with a
``patch_dropout`` module and an int ``num_prefix_tokens``; open_clip's ``VisionTransformer``), ``patch_drop`` (timm's
``VisionTransformer``), the output of the embeddings (transformers' CLIP, SigLIP and ViT vision models, converted to
SAS-P or not). Foreign towers are registered by their :mod:`siclip.interop` module; a tower that cannot take it
(MobileCLIP's hybrid MCi) registers a refusal that says why.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from einops import repeat
from torch import Tensor, nn

from .registry import TypeRegistry

# ``install(tower, ratio) -> TokenDropout`` per image-tower type; raising ValueError refuses the tower with the reason.
TOKEN_DROPOUT: TypeRegistry[Callable[[nn.Module, float], "TokenDropout"]] = TypeRegistry("token dropout")


def register_token_dropout(cls: type):
    """Decorator: ``@register_token_dropout(TowerType)`` over ``install(tower, ratio) -> TokenDropout``."""
    return TOKEN_DROPOUT.register(cls)


def kept_tokens(tokens: int, ratio: float) -> int:
    """K = max(1, ⌊N·(1 − r)⌋) of N patch tokens at ratio r (open_clip's and timm's count; the ε guards 0.3·10 = 2.99…)."""
    return max(1, math.floor(tokens * (1.0 - ratio) + 1e-9))


class TokenDropout(nn.Module):
    """``(batch, P + N, dim) → (batch, P + K, dim)`` in training mode, identity in eval mode or at ratio 0."""

    def __init__(self, ratio: float, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        check_ratio(ratio)
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must not be negative, got {num_prefix_tokens}")
        self.ratio, self.num_prefix_tokens = float(ratio), num_prefix_tokens

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, num_prefix_tokens={self.num_prefix_tokens}"

    def draw(self, batch: int, tokens: int, device: torch.device) -> Tensor:
        """``(batch, K)`` kept patch indices in [0, N), increasing, uniform without replacement per sample."""
        scores = torch.rand(batch, tokens, device=device)
        return scores.topk(kept_tokens(tokens, self.ratio), dim=1).indices.sort(dim=1).values

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.ratio == 0.0:
            return x
        if x.dim() != 3:
            raise ValueError(f"token dropout takes (batch, tokens, dim) tokens, got shape {tuple(x.shape)}")
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        keep = self.draw(patches.shape[0], patches.shape[1], x.device)
        kept = patches.gather(1, repeat(keep, "b k -> b k d", d=patches.shape[2]))
        return torch.cat([prefix, kept], dim=1)


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"the token mask ratio must be in [0, 1), got {ratio}")
    return ratio


def _attribute_tower(module: nn.Module) -> str | None:
    """The attribute of a siclip-style ViT tower that drops tokens (``patch_dropout``, with ``num_prefix_tokens``)."""
    slot = getattr(module, "patch_dropout", None)
    prefix = getattr(module, "num_prefix_tokens", None)
    return "patch_dropout" if isinstance(slot, nn.Module) and isinstance(prefix, int) else None


def replace_slot(tower: nn.Module, attribute: str, ratio: float, num_prefix_tokens: int) -> TokenDropout:
    """Put a :class:`TokenDropout` in ``tower.<attribute>`` (a tower that applies that module to its tokens after the
    positional embedding), or re-use the one there; returns it at ``ratio``."""
    current = getattr(tower, attribute)
    if isinstance(current, TokenDropout):
        current.ratio = check_ratio(ratio)
        return current
    dropout = TokenDropout(ratio, num_prefix_tokens).train(tower.training)
    setattr(tower, attribute, dropout)
    return dropout


def _towers(model: nn.Module):
    """The outermost modules of ``model`` that have a token-dropout entry (or the ``patch_dropout`` attribute)."""
    found = []

    def visit(module: nn.Module) -> None:
        if _attribute_tower(module) is not None or module in TOKEN_DROPOUT:
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def enable_token_dropout(model: nn.Module, ratio: float) -> list[TokenDropout]:
    """Switch FLIP's masking at ``ratio`` on for ``model``'s image tower (see the module docstring); returns the
    :class:`TokenDropout` modules now in it. A ValueError names a model with no tower that takes it, or says why its
    tower cannot (MobileCLIP's MCi)."""
    check_ratio(ratio)
    towers = _towers(model)
    if not towers:
        raise ValueError(f"token masking (FLIP) needs a ViT image tower; {type(model).__name__} has none that siclip can mask "
                         f"(known: towers with patch_dropout and num_prefix_tokens, {', '.join(TOKEN_DROPOUT.known())})")  # fmt: skip
    modules = []
    for tower in towers:
        attribute = _attribute_tower(tower)
        if attribute is not None:
            modules.append(replace_slot(tower, attribute, ratio, tower.num_prefix_tokens))
        else:
            modules.append(TOKEN_DROPOUT.find(tower)(tower, ratio))
    return modules


def set_token_dropout(modules: Iterable[TokenDropout], ratio: float) -> None:
    """Every module of ``modules`` at ``ratio`` (0: unmasked, FLIP's tuning phase)."""
    check_ratio(ratio)
    for module in modules:
        module.ratio = float(ratio)
