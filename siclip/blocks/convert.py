"""Replace the Pre-LN blocks of an existing model by SAS-P blocks, inheriting what still has a meaning.

A Pre-LN block ``X + MHA(Norm₁X)`` then ``+ MLP(Norm₂·)`` becomes ``β_SA·ShapedMHA(NormX) + β_FF·MLP(NormX)``
(:class:`~siclip.blocks.sas.SASPBlock`). Inherited: W_Q, W_K (and their biases), the first norm (now
shared by both branches), the MLP with its activation. Dropped: W_V, W_P, the second norm, dropout.
New: the per-head α, β, γ and the branch gains β_SA, β_FF (and the optional value matrix).

Reading chosen (SiCLIP leaves it open, ``paper_math.md`` §6 #4): the inherited W_Q is kept, so the
converted attention starts at I + softmax(QKᵀ/√d) − C rather than I; ``zero_query=True`` zeroes it for
the exact identity start of He & Hofmann. A layer scale on the MLP branch is folded into ``fc2``
(``fold_layer_scale``), which keeps that branch's output unchanged.

Converters are looked up by block type in a registry (:class:`~siclip.blocks.registry.TypeRegistry`), so model code
can register its own (``@register_converter(MyBlock)``), and the interoperability modules register those of
transformers, timm and open_clip blocks (:mod:`siclip.interop`) the first time such a block is met; unknown types
raise a :class:`TypeError` naming the type. A block type nobody registered converts with :func:`sasp_from_parts`.
A converter of a block living inside a foreign model returns a module that keeps the host's call signature (see
:mod:`siclip.blocks.host`); host models that need a fix-up after their blocks changed (transformers' output
recording hooks) register one with :func:`register_host_fixup`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from siclip import wording

from .masking import resolve_block_masks
from .pre_ln import LayerScale, PreLNBlock
from .registry import TypeRegistry
from .sas import SASPBlock

ACTIONS = ("inherited", "dropped", "new")


@dataclass(frozen=True)
class SASPConversion:
    """Options of a conversion; the defaults are SiCLIP's most plausible reading."""

    zero_query: bool = False
    beta_sa: float = 1.0
    beta_ff: float = 0.1
    trainable_value: bool = False
    fold_layer_scale: bool = True
    fused_proj: bool = True
    backend: str = "auto"


@dataclass
class ConversionReport:
    """One row per tensor of every converted block: ``module, parameter, action, numel, note``."""

    rows: list[dict] = field(default_factory=list)

    def add(self, module: str, tensors: dict[str, Tensor | None], action: str, note: str = "") -> None:
        assert action in ACTIONS
        for name, t in tensors.items():
            if t is not None:
                self.rows.append(
                    {"module": module, "parameter": name, "action": action, "numel": t.numel(), "note": note}
                )

    def extend(self, other: ConversionReport, prefix: str) -> None:
        for row in other.rows:
            self.rows.append({**row, "module": f"{prefix}.{row['module']}" if row["module"] else prefix})

    @property
    def modules(self) -> list[str]:
        return sorted({r["module"] for r in self.rows})

    def count(self, action: str) -> int:
        return sum(r["numel"] for r in self.rows if r["action"] == action)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["module", "parameter", "action", "numel", "note"])

    def summary(self):
        """Elements per module and action, a pandas table."""
        frame = self.to_frame()
        table = frame.pivot_table(index="module", columns="action", values="numel", aggfunc="sum", fill_value=0)
        return table.reindex(columns=[a for a in ACTIONS if a in table.columns])

    def __str__(self) -> str:
        return (
            f"converted {wording.count(len(self.modules), 'block')}: inherited {self.count('inherited'):,}, "
            f"dropped {self.count('dropped'):,}, new {self.count('new'):,} elements"
        )


Converter = Callable[[nn.Module, SASPConversion], tuple[nn.Module, ConversionReport]]
CONVERTERS: TypeRegistry[Converter] = TypeRegistry("SAS-P converter")
HOST_FIXUPS: TypeRegistry[Callable[[nn.Module], None]] = TypeRegistry("host fix-up after conversion")


def register_converter(block_type: type) -> Callable[[Converter], Converter]:
    """Register ``fn(block, options) -> (new_module, report)`` for ``block_type`` (and its subclasses)."""
    return CONVERTERS.register(block_type)


def register_host_fixup(model_type: type) -> Callable:
    """Register ``fn(model)``, run on every module of type ``model_type`` inside a model after
    :func:`convert_to_sasp` replaced blocks in it (e.g. hooks that must be installed again)."""
    return HOST_FIXUPS.register(model_type)


def find_converter(module: nn.Module) -> Converter | None:
    return CONVERTERS.find(module)


@torch.no_grad()
def sasp_from_parts(
    *,
    norm: nn.Module,
    q: nn.Linear | tuple[Tensor, Tensor | None],
    k: nn.Linear | tuple[Tensor, Tensor | None],
    fc1: nn.Linear,
    act: nn.Module,
    fc2: nn.Linear,
    num_heads: int,
    causal: bool = False,
    options: SASPConversion | None = None,
    mlp_scale: Tensor | None = None,
) -> tuple[SASPBlock, ConversionReport]:
    """A SAS-P block carrying the given pretrained parts of a Pre-LN block, and the report of what it inherited
    and added: the first ``norm`` (now the one norm of both branches), the query and key projections (``nn.Linear``
    or ``(weight, bias)`` with weight ``(dim, dim)``), the MLP ``fc2(act(fc1(·)))`` and, if the block has one, the
    MLP branch's layer scale ``mlp_scale`` (folded into ``fc2``). For a block type no converter knows::

        block, report = sasp_from_parts(norm=b.ln1, q=b.attn.q, k=b.attn.k, fc1=b.ff[0], act=b.ff[1], fc2=b.ff[2],
                                        num_heads=b.attn.heads, causal=False)

    The caller reports what its block dropped (W_V, W_P, the second norm: ``report.add(..., "dropped")``).
    """
    options = options or SASPConversion()
    q = (q.weight, q.bias) if isinstance(q, nn.Linear) else q
    k = (k.weight, k.bias) if isinstance(k, nn.Linear) else k
    dim = q[0].shape[1]
    if q[0].shape != (dim, dim) or k[0].shape != (dim, dim):
        raise ValueError(f"SAS-P keeps the width: W_Q and W_K must be (dim, dim), got {tuple(q[0].shape)} and {tuple(k[0].shape)}")
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    block = SASPBlock(
        dim,
        num_heads,
        fc1.out_features / dim,
        norm=lambda _: copy.deepcopy(norm),
        act=copy.deepcopy(act),
        mlp_bias=fc1.bias is not None,
        qk_bias=q[1] is not None,
        causal=causal,
        trainable_value=options.trainable_value,
        zero_query=False,
        beta_sa=options.beta_sa,
        beta_ff=options.beta_ff,
        fused_proj=options.fused_proj,
        backend=options.backend,
    ).to(device=q[0].device, dtype=q[0].dtype)
    block.gain_attn.fill_(options.beta_sa)  # exactly, in the inherited dtype (a float32 0.1 made float64 is 0.100000001)
    block.gain_mlp.fill_(options.beta_ff)
    attn, mlp = block.attn, block.mlp
    attn.q.weight.copy_(q[0])
    attn.k.weight.copy_(k[0])
    if q[1] is not None:
        attn.q.bias.copy_(q[1])
        attn.k.bias.copy_(k[1])
    mlp.load_state_dict(nn.ModuleDict({"fc1": fc1, "act": act, "fc2": fc2}).state_dict())
    if mlp_scale is not None:
        mlp.fc2.weight.mul_(mlp_scale[:, None])
        if mlp.fc2.bias is not None:
            mlp.fc2.bias.mul_(mlp_scale)

    report = ConversionReport()
    report.add("", {f"norm.{n}": t for n, t in block.norm.state_dict().items()}, "inherited")
    note = "zeroed (zero_query)" if options.zero_query else ""
    report.add("", {"attn.q.weight": attn.q.weight, "attn.q.bias": attn.q.bias}, "inherited", note)
    report.add("", {"attn.k.weight": attn.k.weight, "attn.k.bias": attn.k.bias}, "inherited")
    fc2_note = "layer scale folded in" if mlp_scale is not None else ""
    report.add("", {"mlp.fc1.weight": mlp.fc1.weight, "mlp.fc1.bias": mlp.fc1.bias}, "inherited")
    report.add("", {"mlp.fc2.weight": mlp.fc2.weight, "mlp.fc2.bias": mlp.fc2.bias}, "inherited", fc2_note)
    new = {f"attn.shaped.{n}": p for n, p in attn.shaped.named_parameters()}
    new |= {"gain_attn": block.gain_attn, "gain_mlp": block.gain_mlp}
    if attn.value is not None:
        new |= {f"attn.value.{n}": p for n, p in attn.value.named_parameters()}
    report.add("", new, "new")
    if options.zero_query:  # q = 0 for every token makes softmax(·) = C, so A = α·I
        attn.q.weight.zero_()
        if attn.q.bias is not None:
            attn.q.bias.zero_()
    return block, report


@register_converter(PreLNBlock)
def _convert_pre_ln(block: PreLNBlock, options: SASPConversion) -> tuple[SASPBlock, ConversionReport]:
    qkv = block.attn.qkv
    dim = qkv.in_features
    w = qkv.weight.split(dim)
    b = qkv.bias.split(dim) if qkv.bias is not None else (None, None, None)
    scale = block.ls2.gamma if isinstance(block.ls2, LayerScale) and options.fold_layer_scale else None
    if isinstance(block.ls2, LayerScale) and not options.fold_layer_scale:
        raise ValueError("this block has a layer scale on its MLP branch; convert with fold_layer_scale=True")
    new, report = sasp_from_parts(
        norm=block.norm1, q=(w[0], b[0]), k=(w[1], b[1]), fc1=block.mlp.fc1, act=block.mlp.act, fc2=block.mlp.fc2,
        num_heads=block.num_heads, causal=block.causal, options=options, mlp_scale=scale,
    )  # fmt: skip
    report.add("", {"attn.qkv.weight[v]": w[2], "attn.qkv.bias[v]": b[2]}, "dropped", "W_V = I")
    report.add("", dict(block.attn.proj.named_parameters(prefix="attn.proj")), "dropped", "W_P = I")
    report.add("", dict(block.norm2.state_dict(prefix="norm2.")), "dropped", "one shared pre-norm")
    report.add("", dict(block.ls1.named_parameters(prefix="ls1")), "dropped", "α, β, γ carry the attention scale")
    if scale is not None:
        report.add("", {"ls2.gamma": scale}, "dropped", "folded into mlp.fc2")
    return new, report


_ACTIVATION_FUNCTIONS = {nn.functional.relu: nn.ReLU, nn.functional.gelu: nn.GELU}


@register_converter(nn.TransformerEncoderLayer)
def _convert_torch_layer(
    layer: nn.TransformerEncoderLayer, options: SASPConversion
) -> tuple[SASPBlock, ConversionReport]:
    if not layer.norm_first or not layer.self_attn.batch_first:
        raise ValueError(
            "only nn.TransformerEncoderLayer(norm_first=True, batch_first=True) converts to SAS-P: "
            f"got norm_first={layer.norm_first}, batch_first={layer.self_attn.batch_first}"
        )
    mha = layer.self_attn
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    act = layer.activation
    if not isinstance(act, nn.Module):
        if act not in _ACTIVATION_FUNCTIONS:
            raise TypeError(f"cannot convert activation function {act!r}; pass an nn.Module activation")
        act = _ACTIVATION_FUNCTIONS[act]()
    new, report = sasp_from_parts(
        norm=layer.norm1, q=(wq, bq), k=(wk, bk), fc1=layer.linear1, act=act, fc2=layer.linear2,
        num_heads=mha.num_heads, causal=False, options=options,
    )  # fmt: skip
    report.add("", {"self_attn.in_proj[v]": wv, "self_attn.in_proj_bias[v]": bv}, "dropped", "W_V = I")
    report.add("", dict(mha.out_proj.named_parameters(prefix="self_attn.out_proj")), "dropped", "W_P = I")
    report.add("", dict(layer.norm2.state_dict(prefix="norm2.")), "dropped", "one shared pre-norm")
    return new, report


class BlockStack(nn.Module):
    """A stack of token blocks with an optional final norm; takes ``nn.TransformerEncoder``'s arguments."""

    def __init__(self, blocks: Iterable[nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        causal: bool | None = None,
        *,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        causal, key_padding_mask = resolve_block_masks(
            False, key_padding_mask, causal, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
            is_causal=is_causal,
        )  # fmt: skip
        for block in self.blocks:
            x = block(x, key_padding_mask, causal)
        return self.norm(x)


@register_converter(nn.TransformerEncoder)
def _convert_torch_encoder(encoder: nn.TransformerEncoder, options: SASPConversion) -> tuple[BlockStack, ConversionReport]:
    # nn.TransformerEncoder inspects layers[0].self_attn in its forward, so the container is replaced too.
    report, blocks = ConversionReport(), []
    for i, layer in enumerate(encoder.layers):
        block, sub = convert_block(layer, options)
        blocks.append(block)
        report.extend(sub, f"blocks.{i}")
    return BlockStack(blocks, copy.deepcopy(encoder.norm)), report


def convert_block(block: nn.Module, options: SASPConversion | None = None) -> tuple[nn.Module, ConversionReport]:
    """Convert one block; raises :class:`TypeError` naming the type when no converter knows it."""
    converter = find_converter(block)
    if converter is None:
        raise TypeError(f"no SAS-P converter for block type {type(block).__qualname__}; known types: {', '.join(CONVERTERS.known())} "
                        "(convert any Pre-LN block with siclip.blocks.sasp_from_parts)")  # fmt: skip
    return converter(block, options or SASPConversion())


def convert_to_sasp(
    model: nn.Module,
    names: Iterable[str] | None = None,
    options: SASPConversion | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace blocks of ``model`` by SAS-P blocks, in place.

    Args:
        model: any module; if it is itself a convertible block, the converted block is returned.
        names: qualified names of the modules to convert (each must be convertible); by default
            every module of a registered type, outermost first.
        options: :class:`SASPConversion`.

    Returns:
        ``(model, report)``; the report's rows name each converted module.
    """
    options = options or SASPConversion()
    if names is None and find_converter(model) is not None:
        block, sub = convert_block(model, options)
        report = ConversionReport()
        report.extend(sub, type(model).__name__)
        return block, report
    if names is None:
        targets, seen = [], set()
        for name, module in model.named_modules():
            if name and find_converter(module) is not None and not any(name.startswith(p + ".") for p in seen):
                targets.append(name)
                seen.add(name)
        if not targets:
            raise ValueError(f"no convertible blocks in {type(model).__name__}; looked for {', '.join(CONVERTERS.known())}")
    else:
        targets = list(names)
    report = ConversionReport()
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block, sub = convert_block(model.get_submodule(name), options)
        setattr(parent, attr, block) if not attr.isdigit() else parent.__setitem__(int(attr), block)
        report.extend(sub, name)
    for module in model.modules():
        fixup = HOST_FIXUPS.find(module)
        if fixup is not None:
            fixup(module)
    return model, report
