"""Attention readers: the softmax attention a block computed on a call, read from the call itself.

    P = softmax(q kᵀ/√d + M),   q = W_Q·Norm(x), k = W_K·Norm(x)     (batch, heads, tokens, tokens)

``M`` is what the block itself applied on that call: its causal mask and key padding, from the arguments it was
called with, in its own convention (siclip's ``key_padding_mask``/``causal``, transformers' 4-D masks, open_clip's and
timm's ``attn_mask``). Readers are looked up by block type, beside the SAS-P converters
(:class:`~siclip.blocks.registry.TypeRegistry`, foreign libraries registered from :mod:`siclip.interop`), so the
divergence between the blocks of any model can be measured before it is converted. For shaped attention the reader
returns the softmax term ``P`` (the part the blocks' divergence compares; αI and γC are fixed per head).
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from .masking import resolve_block_masks
from .pre_ln import PreLNBlock
from .registry import TypeRegistry
from .sas import SASBlock, SASPBlock
from .spatial import SASPBlock2d

AttentionReader = Callable[[nn.Module, tuple, dict], Tensor]
ATTENTION_READERS: TypeRegistry[AttentionReader] = TypeRegistry("attention reader")


def register_attention_reader(block_type: type) -> Callable[[AttentionReader], AttentionReader]:
    """Register ``fn(block, args, kwargs) -> (batch, heads, tokens, tokens)`` for ``block_type`` (and subclasses)."""
    return ATTENTION_READERS.register(block_type)


def has_attention_reader(block: nn.Module) -> bool:
    return ATTENTION_READERS.find(block) is not None


@torch.no_grad()
def read_attention(block: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The softmax attention ``block(*args, **kwargs)`` computes, ``(batch, heads, tokens, tokens)``."""
    reader = ATTENTION_READERS.find(block)
    if reader is None:
        raise TypeError(f"cannot read attention from a {type(block).__qualname__}; readers exist for {', '.join(ATTENTION_READERS.known())}")
    return reader(block, args, kwargs)


def softmax_attention(
    q: Tensor, k: Tensor, heads: int, *, causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``softmax(q kᵀ·scale + M)`` per head for ``(batch, tokens, heads·d)`` queries and keys; ``scale`` 1/√d by default;
    ``M`` hides later keys (``causal``), padded keys (``key_padding_mask``, True = hidden) and whatever a library's
    ``attn_mask`` says (boolean, True = attend, or additive; any shape broadcasting to (batch, heads, tokens, tokens))."""
    q, k = (rearrange(t, "b t (h d) -> b h t d", h=heads) for t in (q, k))
    logits = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask.to(logits.dtype)
    tokens = logits.shape[-1]
    if causal:
        later = torch.ones(tokens, tokens, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits.masked_fill(later, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _masks(block: nn.Module, args: tuple, kwargs: dict) -> tuple[bool, Tensor | None]:
    """(causal, key_padding_mask) of a siclip block call ``block(x, key_padding_mask, causal, **kw)``."""
    positional = dict(zip(("key_padding_mask", "causal"), args[1:3]))
    return resolve_block_masks(block.causal, **positional, **kwargs)


@register_attention_reader(SASPBlock)
def _read_sasp(block: SASPBlock, args: tuple, kwargs: dict) -> Tensor:
    h = block.norm(args[0])
    causal, padding = _masks(block, args, kwargs)
    return softmax_attention(block.attn.q(h), block.attn.k(h), block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(SASBlock)
def _read_sas(block: SASBlock, args: tuple, kwargs: dict) -> Tensor:
    h = block.norm1(args[0])
    causal, padding = _masks(block, args, kwargs)
    return softmax_attention(block.attn.q(h), block.attn.k(h), block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(PreLNBlock)
def _read_pre_ln(block: PreLNBlock, args: tuple, kwargs: dict) -> Tensor:
    q, k, _ = block.attn.qkv(block.norm1(args[0])).chunk(3, dim=-1)
    causal, padding = _masks(block, args, kwargs)
    return softmax_attention(q, k, block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(SASPBlock2d)
def _read_sasp2d(block: SASPBlock2d, args: tuple, kwargs: dict) -> Tensor:
    h = block.normed_tokens(args[0])  # attention over the map's h·w positions, no mask
    return softmax_attention(block.attn.q(h), block.attn.k(h), block.attn.num_heads)
