"""Attention readers: the softmax attention a block computed on a call, read from the call itself.

    P = softmax(q kᵀ/√d + M),   q = W_Q·Norm(x), k = W_K·Norm(x)     (batch, heads, tokens, tokens)

``M`` is what the block itself applied on that call: its causal mask and key padding, from the arguments it was
called with, in its own convention (siclip's ``key_padding_mask``/``causal``, transformers' 4-D masks, open_clip's and
timm's ``attn_mask``). Readers are looked up by block type, beside the SAS-P converters
(:class:`~siclip.blocks.registry.TypeRegistry`, foreign libraries registered from :mod:`siclip.interop`), so the
divergence between the blocks of any model can be measured before it is converted. For shaped attention the reader
returns the softmax term ``P`` (the part the blocks' divergence compares; αI and γC are fixed per head).

**Which query rows are tokens.** A padded position is still a query: its row is whatever the library fills in (rows
over the real keys, a uniform row, or NaN when SDPA sees a row with no visible key), and it says nothing about the
text. A reader may return :class:`AttentionRead` (the probabilities and the queries its call's masks mark as padding:
a query whose own key is hidden, or that sees no key); :func:`read_attention_rows` gives both. What the call cannot
show (a causal text tower that passes no padding mask, where padding follows the end-of-text token) the caller says:
calls made inside :func:`real_tokens` carry the input's real-token mask.

**A block read on its own** (:func:`block_causality`): whether a block attends causally when no call says so — its
own flag (siclip), its configuration (a transformers CLIP text layer), its family (GPT-2), or unknown (an open_clip
residual block serves both towers), registered per type.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from .masking import resolve_block_masks
from .pre_ln import PreLNBlock
from .registry import TypeRegistry
from .sas import SASBlock, SASPBlock
from .spatial import SASPBlock2d



class AttentionRead(NamedTuple):
    """What a reader read: ``probs`` (batch, heads, tokens, tokens) and ``padded_queries`` (batch, tokens), True where
    the call's masks make the query a padded position (None: the masks mark none)."""

    probs: Tensor
    padded_queries: Tensor | None = None


AttentionReader = Callable[[nn.Module, tuple, dict], "Tensor | AttentionRead"]
ATTENTION_READERS: TypeRegistry[AttentionReader] = TypeRegistry("attention reader")
# ``fn(block) -> True | False | None``: whether the block attends causally when no call says so (None: it cannot tell).
BLOCK_CAUSALITY: TypeRegistry[Callable[[nn.Module], "bool | None"]] = TypeRegistry("block causality")
_REAL_TOKENS: ContextVar[Tensor | None] = ContextVar("siclip_real_tokens", default=None)


def register_attention_reader(block_type: type) -> Callable[[AttentionReader], AttentionReader]:
    """Register ``fn(block, args, kwargs) -> (batch, heads, tokens, tokens)`` for ``block_type`` (and subclasses)."""
    return ATTENTION_READERS.register(block_type)


def register_block_causality(block_type: type) -> Callable:
    """Register ``fn(block) -> bool | None`` (does the block attend causally on its own?) for ``block_type``."""
    return BLOCK_CAUSALITY.register(block_type)


def has_attention_reader(block: nn.Module) -> bool:
    return ATTENTION_READERS.find(block) is not None


def block_causality(block: nn.Module) -> bool | None:
    """Whether ``block`` attends causally when no call says so; None when the block cannot tell (see the module docstring)."""
    entry = BLOCK_CAUSALITY.find(block)
    return None if entry is None else entry(block)


@torch.no_grad()
def read_attention_rows(block: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    """The softmax attention ``block(*args, **kwargs)`` computes and the queries its call marks as padding."""
    reader = ATTENTION_READERS.find(block)
    if reader is None:
        raise TypeError(f"cannot read attention from a {type(block).__qualname__}; readers exist for {', '.join(ATTENTION_READERS.known())}")
    read = reader(block, args, kwargs)
    return read if isinstance(read, AttentionRead) else AttentionRead(read)


def read_attention(block: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The softmax attention ``block(*args, **kwargs)`` computes, ``(batch, heads, tokens, tokens)``."""
    return read_attention_rows(block, args, kwargs).probs


@contextlib.contextmanager
def real_tokens(mask: Tensor | None) -> Iterator[None]:
    """Inside the ``with`` block, the input's real tokens are ``mask`` ``(batch, tokens)``, True = a token (not
    padding): attention read from the calls made inside counts only these queries (see the module docstring)."""
    if mask is not None and (mask.dim() != 2 or mask.dtype != torch.bool):
        raise ValueError(f"real_tokens takes a (batch, tokens) bool mask, got {tuple(mask.shape)} {mask.dtype}")
    token = _REAL_TOKENS.set(mask)
    try:
        yield
    finally:
        _REAL_TOKENS.reset(token)


def current_real_tokens() -> Tensor | None:
    """The mask of the innermost :func:`real_tokens` block around this call (None outside any)."""
    return _REAL_TOKENS.get()


def padded_queries(batch: int, tokens: int, *, key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor | None:
    """``(batch, tokens)`` True for the queries a call's masks make padding: in self-attention a padded key's own query
    (``key_padding_mask``, True = hidden), and under a library's ``attn_mask`` (boolean, True = attend, or additive,
    ≤ −10⁴ hidden) a query whose own key is hidden or that sees no key. None when there are none."""
    padded = None if key_padding_mask is None else key_padding_mask.bool()
    if attn_mask is not None:
        visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4
        while visible.dim() < 4:
            visible = visible[None]
        real = (visible.diagonal(dim1=-2, dim2=-1) & visible.any(-1)).any(1)  # (batch or 1, tokens): any head's row
        masked = ~real.expand(batch, tokens)
        padded = masked if padded is None else padded | masked
    return padded if padded is not None and bool(padded.any()) else None


def read_softmax(q: Tensor, k: Tensor, heads: int, *, causal: bool = False, key_padding_mask: Tensor | None = None,
                 scale: float | None = None, attn_mask: Tensor | None = None) -> AttentionRead:  # fmt: skip
    """:func:`softmax_attention` and the queries its masks make padding (:func:`padded_queries`)."""
    probs = softmax_attention(q, k, heads, causal=causal, key_padding_mask=key_padding_mask, scale=scale, attn_mask=attn_mask)
    return AttentionRead(probs, padded_queries(q.shape[0], q.shape[1], key_padding_mask=key_padding_mask, attn_mask=attn_mask))


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
    return read_softmax(block.attn.q(h), block.attn.k(h), block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(SASBlock)
def _read_sas(block: SASBlock, args: tuple, kwargs: dict) -> Tensor:
    h = block.norm1(args[0])
    causal, padding = _masks(block, args, kwargs)
    return read_softmax(block.attn.q(h), block.attn.k(h), block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(PreLNBlock)
def _read_pre_ln(block: PreLNBlock, args: tuple, kwargs: dict) -> Tensor:
    q, k, _ = block.attn.qkv(block.norm1(args[0])).chunk(3, dim=-1)
    causal, padding = _masks(block, args, kwargs)
    return read_softmax(q, k, block.num_heads, causal=causal, key_padding_mask=padding)


@register_attention_reader(SASPBlock2d)
def _read_sasp2d(block: SASPBlock2d, args: tuple, kwargs: dict) -> Tensor:
    h = block.normed_tokens(args[0])  # attention over the map's h·w positions, no mask
    return softmax_attention(block.attn.q(h), block.attn.k(h), block.attn.num_heads)


for _own_flag in (SASPBlock, SASBlock, PreLNBlock):
    register_block_causality(_own_flag)(lambda block: bool(block.causal))
register_block_causality(SASPBlock2d)(lambda block: False)  # attention over a map's positions
