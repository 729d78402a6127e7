"""MCt, MobileCLIP's text encoder: [RepMixer, N × Pre-LN transformer, RepMixer] over token embeddings.

    x = E[ids] + P_T;  x = RepMixer(x);  x = Block_i(x) for i < N;  x = RepMixer(x)
    feature = LayerNorm(x)[eot] @ W_proj,   eot = argmax(ids)  (the end-of-text token has the largest id)

``P_T`` is the positional table resampled to the ``T`` tokens given, as Apple's MCt does (bilinear
``F.interpolate`` of the (1, 1, C, D) table to (T, D), half-pixel centres): row ``t`` is
``(1 − w)·P[⌊s⌋] + w·P[min(⌊s⌋ + 1, C − 1)]`` with ``s = max(0, (t + ½)·C/T − ½)``, ``w = s − ⌊s⌋``;
at ``T = C`` it is ``P`` itself.

Attention is bidirectional over every position, padding included, as in Apple's encoder (it passes no
mask); the RepMixer blocks convolve over the sequence laid out as a 1×T map. ``mask_padding=True`` hides
the positions after the end-of-text token from every attention (``key_padding_mask``): a short caption is
then read from its own words instead of a mean dominated by padding. At initialisation that is the
difference between prompts of two classes at cosine 0.999 and 0.97, and it is what lets a small model
trained from scratch learn the words that rarely decide a batch (``experiments/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from siclip.blocks import PreLNBlock
from siclip.blocks.backends import traced_kernel

from .fastvit import RepMixerBlock
from .stages import has_trainable, run_stages


@dataclass(frozen=True)
class TextConfig:
    """MCt of MobileCLIP-S0 by default."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    heads: int = 8
    layers: int = 4
    mlp_ratio: float = 4.0
    mixer_kernel: int = 11
    layer_scale_init: float = 1e-5
    tokenizer: str = "clip"  # the tokenizer whose ids the vocabulary holds: "clip" (BPE), "embedded", "words"
    mask_padding: bool = False  # False: attention sees the padding, as Apple's MCt does


def resample_positions(table: Tensor, length: int) -> Tensor:
    """``(length, width)`` positions from a ``(context, width)`` table by linear interpolation along the
    sequence with half-pixel centres (Apple's bilinear resize of the table; the width axis is unchanged)."""
    if length == table.shape[0]:
        return table
    resized = F.interpolate(rearrange(table, "pos width -> 1 width pos"), size=length, mode="linear", align_corners=False)
    return rearrange(resized, "1 width pos -> pos width")


class SequenceRepMixerBlock(RepMixerBlock):
    """A RepMixer block over ``(batch, tokens, width)`` sequences (a ``1 × kernel`` depthwise mixer)."""

    def __init__(self, width: int, mlp_ratio: float, kernel: int, layer_scale_init: float) -> None:
        super().__init__(width, mlp_ratio, (1, kernel), layer_scale_init, ffn_kernel=(1, kernel))

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x.transpose(1, 2).unsqueeze(2))
        return y.squeeze(2).transpose(1, 2)


class MCt(nn.Module):
    """Token ids ``(batch, tokens ≤ context)`` → ``(batch, embed_dim)`` text features (unnormalised)."""

    def __init__(self, config: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.mixer_in = SequenceRepMixerBlock(width, config.mlp_ratio, config.mixer_kernel, config.layer_scale_init)
        self.transformer = nn.ModuleList(
            PreLNBlock(width, config.heads, config.mlp_ratio, act="gelu") for _ in range(config.layers)
        )
        self.mixer_out = SequenceRepMixerBlock(width, config.mlp_ratio, config.mixer_kernel, config.layer_scale_init)
        self.final_norm = nn.LayerNorm(width)
        self.projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.projection, std=width**-0.5)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trainable block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer (batch, tokens) tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed the context length {self.config.context_length}")
        # An exported graph reads no values to check (traced_attention): the runtime refuses an id outside the table.
        if traced_kernel() is None and ids.numel() and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]: "
                "does the tokenizer match the model's vocabulary?"
            )
        trainable = self.positional_embedding.requires_grad or has_trainable(self.token_embedding)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):  # a frozen embedding stores nothing
            x = self.token_embedding(ids) + resample_positions(self.positional_embedding, ids.shape[1])
        stages = [self.mixer_in, *self.transformer, self.mixer_out, self.final_norm]
        eot = ids.argmax(dim=-1)
        kwargs = None
        if self.config.mask_padding:  # True after the end-of-text token: padding no attention may read
            padding = torch.arange(ids.shape[1], device=ids.device)[None, :] > eot[:, None]
            kwargs = [{}, *({"key_padding_mask": padding} for _ in self.transformer), {}, {}]
        x = run_stages(stages, x, checkpointing=self.grad_checkpointing, stage_kwargs=kwargs)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.projection
