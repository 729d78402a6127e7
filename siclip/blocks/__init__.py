"""Transformer blocks of *Simplifying Transformer Blocks* (He & Hofmann, ICLR 2024), usable on their own.

- :func:`shaped_attention`: (αI + β·softmax(QKᵀ/√d + M) − γC)·V with fused attention and no T×T matrix.
- :class:`PreLNBlock`, :class:`SASBlock`, :class:`SASPBlock` on ``(batch, tokens, dim)``; :class:`Block2d`
  runs any of them on ``(batch, channels, height, width)`` maps.
- :mod:`~siclip.blocks.sharing`: weight-sharing plans between adjacent blocks.
- :mod:`~siclip.blocks.convert`: Pre-LN → SAS-P conversion with weight inheritance; :func:`sasp_from_parts` for any
  Pre-LN block; converters and :mod:`~siclip.blocks.readers` (attention readers) are looked up by block type.
"""

from .attention import Attention
from .backends import xformers_status
from .convert import (
    BlockStack, ConversionReport, SASPConversion, convert_block, convert_to_sasp, register_converter, register_host_fixup, sasp_from_parts,
)  # fmt: skip
from .mlp import Mlp, create_act
from .norms import TokenBatchNorm, create_norm
from .param_groups import no_weight_decay_names, param_groups_weight_decay
from .pre_ln import LayerScale, PreLNBlock
from .readers import (
    AttentionRead, block_causality, read_attention, read_attention_rows, read_softmax, real_tokens, register_attention_reader,
    register_block_causality, softmax_attention,
)  # fmt: skip
from .sas import SASBlock, SASPBlock, ShapedSelfAttention, ValueSkipInit
from .shaped_attention import (
    ShapedAttention,
    centred_values,
    shaped_attention,
    shaped_attention_matrix,
    shaped_attention_reference,
)
from .sharing import (
    SharingPlan,
    SharingReport,
    apply_sharing,
    count_parameters,
    plan_adjacent_pairs,
    plan_all,
    plan_none,
    plan_optimal,
    plan_sharing,
    plan_threshold,
)
from .spatial import Block2d, SASPBlock2d

__all__ = [
    "Attention", "AttentionRead", "Block2d", "BlockStack", "ConversionReport", "LayerScale", "Mlp", "PreLNBlock", "SASBlock",
    "SASPBlock", "SASPBlock2d", "SASPConversion", "ShapedAttention", "ShapedSelfAttention", "SharingPlan", "SharingReport",
    "TokenBatchNorm", "ValueSkipInit", "apply_sharing", "centred_values", "convert_block", "convert_to_sasp",
    "count_parameters", "create_act", "create_norm", "no_weight_decay_names", "param_groups_weight_decay",
    "plan_adjacent_pairs", "plan_all", "plan_none", "plan_optimal", "plan_sharing", "plan_threshold",
    "block_causality", "read_attention", "read_attention_rows", "read_softmax", "real_tokens", "register_attention_reader",
    "register_block_causality", "register_converter", "register_host_fixup", "sasp_from_parts", "shaped_attention",
    "shaped_attention_matrix", "shaped_attention_reference", "softmax_attention", "xformers_status",
]  # fmt: skip
