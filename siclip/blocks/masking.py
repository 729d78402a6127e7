"""Validation and construction of attention masks shared by every attention in :mod:`siclip.blocks`.

Convention (the one of ``torch.nn.MultiheadAttention``): a ``key_padding_mask`` is a bool tensor of
shape ``(batch, tokens)`` that is **True for tokens to ignore**. ``causal`` hides keys after the query.
Arbitrary additive masks are not supported: shaped attention needs C = softmax(M) for its centring
term, which is only cheap (no T×T matrix) for causal and key-padding masks.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .backends import traced_kernel


def check_key_padding_mask(key_padding_mask: Tensor | None, batch: int, tokens: int, causal: bool) -> None:
    """Raise a clear error unless ``key_padding_mask`` is None or a usable ``(batch, tokens)`` bool mask.

    A usable mask leaves every query at least one visible key: a fully padded sequence (or, when
    causal, a query preceded only by padded keys) has no softmax and no centring row.
    """
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = ignore this token), got {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != (batch, tokens):
        raise ValueError(
            f"key_padding_mask must have shape (batch, tokens) = ({batch}, {tokens}), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if traced_kernel() is not None:  # an exported graph checks no values (the mask is a function of its input)
        return
    visible = visible_key_counts(key_padding_mask, causal)
    if bool((visible == 0).any()):
        rows = (visible == 0).nonzero()[:4].tolist()
        where = "a query preceded only by padded keys" if causal else "a sequence whose keys are all padded"
        raise ValueError(f"key_padding_mask leaves {where} with no visible key (batch, query) = {rows}")


def visible_key_counts(key_padding_mask: Tensor, causal: bool) -> Tensor:
    """Number of keys each query sees: ``(batch, tokens)`` when causal, else ``(batch, 1)``."""
    valid = (~key_padding_mask).to(torch.int32)
    return valid.cumsum(-1) if causal else valid.sum(-1, keepdim=True)


def sdpa_mask(key_padding_mask: Tensor | None, causal: bool, tokens: int) -> tuple[Tensor | None, bool]:
    """The ``(attn_mask, is_causal)`` pair for ``F.scaled_dot_product_attention`` (True = attend).

    Padding alone gives a broadcast ``(batch, 1, 1, tokens)`` mask, never a T×T one; only causal
    attention *with* padding needs the combined ``(batch, 1, tokens, tokens)`` boolean mask, since SDPA
    accepts either ``is_causal`` or a mask, not both.
    """
    if key_padding_mask is None:
        return None, causal
    keep = (~key_padding_mask)[:, None, None, :]
    if not causal:
        return keep, False
    lower = torch.ones(tokens, tokens, dtype=torch.bool, device=keep.device).tril()
    return keep & lower, False


def additive_mask(
    batch: int, tokens: int, *, causal: bool, key_padding_mask: Tensor | None, dtype: torch.dtype, device
) -> Tensor:
    """The explicit additive mask M of shape ``(batch, 1, tokens, tokens)``: 0 where visible, -inf elsewhere.

    Used by the reference implementations only (it is the T×T matrix the fast paths avoid).
    """
    visible = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool, device=device)
    if causal:
        visible = visible & torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        visible = visible & (~key_padding_mask)[:, None, None, :]
    mask = torch.zeros(batch, 1, tokens, tokens, dtype=dtype, device=device)
    return mask.masked_fill(~visible, float("-inf"))


def check_block_input(x: Tensor, dim: int, block: str) -> None:
    """A block's input must be ``(batch, tokens, dim)``: a clear error instead of an einops or unpacking one."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{block} takes a (batch, tokens, {dim}) tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        hint = " (add a batch axis: x[None])" if x.dim() == 2 and x.shape[-1] == dim else ""
        raise ValueError(f"{block} takes a (batch, tokens, {dim}) tensor, got shape {tuple(x.shape)}{hint}")


def resolve_block_masks(
    default_causal: bool,
    key_padding_mask: Tensor | None = None,
    causal: bool | None = None,
    *,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool | None = None,
) -> tuple[bool, Tensor | None]:
    """``(causal, key_padding_mask)`` for a block call, accepting ``nn.TransformerEncoderLayer``'s argument
    names too, so a converted block is a drop-in replacement for one."""
    if src_mask is not None:
        raise NotImplementedError(
            "arbitrary attention masks (src_mask) are not supported: pass is_causal=True or a key_padding_mask"
        )
    if key_padding_mask is not None and src_key_padding_mask is not None:
        raise ValueError("pass key_padding_mask or src_key_padding_mask, not both")
    mask = key_padding_mask if key_padding_mask is not None else src_key_padding_mask
    flags = [f for f in (causal, is_causal) if f is not None]
    return (bool(flags[0]) if flags else default_causal), mask


# The largest value an additive mask may use for "hidden": libraries write −inf or the dtype's most negative number.
_HIDDEN_BELOW = -1e4
_last_decoded: list = [None, None, None]  # [weak reference to the mask, (version, causal, batch, tokens), result]


def decode_attention_mask(mask: Tensor | None, batch: int, tokens: int, causal: bool | None = None) -> tuple[bool, Tensor | None]:
    """``(causal, key_padding_mask)`` equivalent to a library's attention mask (key padding True = ignore, or None).

    Accepted: boolean (True = attend) or additive (0 visible, ≤ −10⁴ or −inf hidden) masks of shape ``(T, T)``,
    ``(B, T, T)``, ``(B·H, T, T)`` (heads repeated, as open_clip builds them) or ``(B, 1, T, T)`` (transformers'),
    and ``(B, T)`` key masks (1/True = keep, as tokenizers return them). ``causal`` None: read from the mask (every
    later key hidden). Shaped attention needs ``C = softmax(M)``, which is cheap only for causal and key-padding
    masks, so any other mask is refused with a :class:`NotImplementedError`. The pattern is read off the last query
    row (causal) or the first (not) and checked on every query that is not itself padding (a padded query's row is
    free: libraries unmask it to avoid empty softmax rows). One library mask serves every block of a forward pass,
    so the last decoding is kept (the same tensor, unchanged, gives the same answer).

    While an exporter traces (:func:`siclip.blocks.backends.traced_kernel`), the mask's values are symbols: nothing is
    read off or checked. ``causal`` must then be given; a mask with a batch axis gives its padding (the last or first
    row, as above) as a tensor, one without (the same for every sequence: causality only) none.
    """
    if mask is None:
        return bool(causal), None
    if traced_kernel() is not None:
        return _decode_traced(mask, batch, tokens, causal)
    if mask.is_inference():  # no version counter to know it unchanged: decoded each time
        return _decode(mask, batch, tokens, causal)
    key = (mask._version, causal, batch, tokens)
    ref, seen, result = _last_decoded
    if ref is not None and ref() is mask and seen == key:  # a weak reference: a freed mask's id may be reused
        return result
    result = _decode(mask, batch, tokens, causal)
    _last_decoded[:] = [weakref.ref(mask), key, result]
    return result


def _decode(mask: Tensor, batch: int, tokens: int, causal: bool | None) -> tuple[bool, Tensor | None]:
    if mask.dim() == 2 and tuple(mask.shape) == (batch, tokens) and batch != tokens:
        keep = mask if mask.dtype == torch.bool else mask > 0.5
        return bool(causal), None if bool(keep.all()) else ~keep
    return _decode_square(mask, batch, tokens, causal)


def _decode_traced(mask: Tensor, batch, tokens: int, causal: bool | None) -> tuple[bool, Tensor | None]:
    """:func:`decode_attention_mask` without reading values (see there). The batch axis is a symbol: a mask whose
    first axis is a plain number is one mask for every sequence."""
    if causal is None:
        raise NotImplementedError("an attention mask whose causality is unknown cannot be traced for export: the block must know whether "
                                  "it is causal (a converted block learns it from its host model)")  # fmt: skip
    visible = mask if mask.dtype == torch.bool else mask > _HIDDEN_BELOW
    if visible.dim() == 4:
        visible = visible[:, 0]
    if isinstance(visible.shape[0], int) and (visible.dim() == 2 or visible.shape[0] == 1):  # shared by every sequence: causality only
        return bool(causal), None
    if visible.dim() == 2:  # (batch, tokens) keys to keep
        return bool(causal), ~visible
    visible = visible.reshape(batch, -1, tokens, tokens)[:, 0]  # (batch, T, T) or (batch·heads, T, T), heads repeated
    return bool(causal), ~visible[:, -1 if causal else 0, :]


def _decode_square(mask: Tensor, batch: int, tokens: int, causal: bool | None) -> tuple[bool, Tensor | None]:
    visible = mask if mask.dtype == torch.bool else mask > _HIDDEN_BELOW
    if visible.dim() == 4:
        if visible.shape[1] != 1:
            raise NotImplementedError(f"a per-head attention mask {tuple(mask.shape)}: shaped attention takes one mask for all heads")
        visible = visible[:, 0]
    if visible.dim() == 2:
        visible = visible[None]
    if tuple(visible.shape[-2:]) != (tokens, tokens):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit {batch} sequences of {tokens} tokens")
    if visible.shape[0] not in (1, batch):
        if visible.shape[0] % batch:
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit {batch} sequences of {tokens} tokens")
        per_head = visible.view(batch, visible.shape[0] // batch, tokens, tokens)  # (B·H, T, T), heads repeated per sequence
        if not bool((per_head == per_head[:, :1]).all()):
            raise NotImplementedError(f"a per-head attention mask {tuple(mask.shape)}: shaped attention takes one mask for all heads")
        visible = per_head[:, 0]
    visible = visible.expand(batch, tokens, tokens)
    later = torch.ones(tokens, tokens, dtype=torch.bool, device=mask.device).triu(1)
    if causal is None:
        causal = tokens > 1 and not bool((visible & later).any())
    padding = ~visible[:, -1 if causal else 0, :]
    expected = ~padding[:, None, :]
    if causal:
        expected = expected & ~later
    rows = ~padding  # queries that are tokens; padded queries' rows are free
    if bool(((visible != expected) & rows[:, :, None]).any()):
        kind = "causal and key-padding" if causal else "key-padding"
        raise NotImplementedError(
            f"this attention mask is not a {kind} mask: shaped attention (αI + β·softmax(QKᵀ + M) − γ·C) needs "
            "C = softmax(M), which it builds for causal and key-padding masks only (left padding of causal text "
            "is not supported either: a query before every token would see no key)"
        )
    return causal, (padding if bool(padding.any()) else None)
