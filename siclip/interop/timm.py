"""timm in siclip: block converters and attention readers for its Vision Transformer blocks, and any timm image model
as a CLIP's image tower.

Imported by siclip's registries the first time they meet a timm object or a ``timm`` image tower (never by siclip
otherwise).

- ``Block`` (pre-norm, sequential): ``X + ls₁·Attn(norm1 X)``, ``+ ls₂·Mlp(norm2 ·)``. Inherited: norm1, W_Q, W_K (the
  ``qkv`` rows) and their biases, the Mlp, ls₂ folded into fc2. Dropped: W_V, W_P (``attn.proj``), norm2, ls₁.
- ``ParallelScalingBlock`` (already parallel, one norm, ViT-22B): ``X + ls·(W_P·Attn(in_norm X) + W₂·act(W₁ in_norm X))``.
  Inherited: in_norm, the query, key and MLP rows of ``in_proj`` (and ``mlp_bias``), the MLP's output projection,
  ls folded into it. Dropped: the value rows, the attention's output projection, ls on the attention branch.

Both convert to a module keeping timm's call, ``block(x, attn_mask=None, is_causal=False)`` (``attn_mask`` boolean,
True = attend, or additive), so ``VisionTransformer.forward`` runs unchanged. Blocks with query/key norms, scale
norms, gated or grouped attention are refused: SAS-P has no place for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from timm.layers import LayerScale
from timm.models import get_pretrained_cfg
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, ParallelScalingBlock, VisionTransformer

from siclip.blocks import (
    AttentionRead, ConversionReport, SASPBlock, SASPConversion, read_softmax, register_attention_reader, register_block_causality,
    register_converter, sasp_from_parts,
)  # fmt: skip
from siclip.blocks.masking import decode_attention_mask
from siclip.blocks.token_dropout import TokenDropout, register_token_dropout, replace_slot
from siclip.data.transforms import Preprocess
from siclip.interop.safety import UnsafeModel, build_on_meta, scan_record
from siclip.models.towers import TimmTowerConfig, register_image_family
from siclip.storage import load_weights

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


class SASPTimmBlock(nn.Module):
    """A SAS-P block with timm's block signature: ``block(x, attn_mask=None, is_causal=False)``."""

    def __init__(self, block: SASPBlock) -> None:
        super().__init__()
        self.sasp = block

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        causal, padding = decode_attention_mask(attn_mask, x.shape[0], x.shape[1], True if is_causal else None)
        return self.sasp(x, padding, causal)


def _refuse_extras(block: nn.Module, attn: nn.Module) -> None:
    extras = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity)]
    extras += ["gate"] if getattr(attn, "gate", None) is not None else []
    extras += ["mlp.norm"] if not isinstance(getattr(getattr(block, "mlp", None), "norm", nn.Identity()), nn.Identity) else []
    if extras:
        raise NotImplementedError(f"a timm {type(block).__name__} with {extras}: SAS-P has no place for query/key or scale norms or gates")


def _scale(module: nn.Module) -> Tensor | None:
    return module.gamma if isinstance(module, LayerScale) else None


def _finish(new: SASPBlock, report: ConversionReport, dropped: dict) -> tuple[nn.Module, ConversionReport]:
    out = ConversionReport()
    out.rows = [{**row, "parameter": f"sasp.{row['parameter']}"} for row in report.rows]
    for (name, note), tensor in dropped.items():
        out.add("", {name: tensor}, "dropped", note)
    return SASPTimmBlock(new), out


@register_converter(Block)
def _convert_block(block: Block, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise NotImplementedError(f"a timm Block with a {type(attn).__name__}: the converter takes timm's standard Attention")
    _refuse_extras(block, attn)
    dim = block.norm1.weight.shape[0]
    if attn.attn_dim != dim:
        raise NotImplementedError(f"a timm Block whose attention width {attn.attn_dim} is not its width {dim}: SAS-P keeps the width")
    w = attn.qkv.weight.split(dim)
    b = attn.qkv.bias.split(dim) if attn.qkv.bias is not None else (None, None, None)
    scale = _scale(block.ls2) if options.fold_layer_scale else None
    if _scale(block.ls2) is not None and not options.fold_layer_scale:
        raise ValueError("this block has a layer scale on its MLP branch; convert with fold_layer_scale=True")
    new, report = sasp_from_parts(norm=block.norm1, q=(w[0], b[0]), k=(w[1], b[1]), fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2,
                                  num_heads=attn.num_heads, options=options, mlp_scale=scale)  # fmt: skip
    dropped = {("attn.qkv.weight[v]", "W_V = I"): w[2], ("attn.qkv.bias[v]", "W_V = I"): b[2],
               ("attn.proj.weight", "W_P = I"): attn.proj.weight, ("attn.proj.bias", "W_P = I"): attn.proj.bias,
               ("norm2.weight", "one shared pre-norm"): block.norm2.weight, ("norm2.bias", "one shared pre-norm"): block.norm2.bias,
               ("ls1.gamma", "α, β, γ carry the attention scale"): _scale(block.ls1),
               ("ls2.gamma", "folded into mlp.fc2"): scale}  # fmt: skip
    return _finish(new, report, dropped)


@register_converter(ParallelScalingBlock)
@torch.no_grad()
def _convert_parallel(block: ParallelScalingBlock, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    _refuse_extras(block, block)
    if block.out_proj is not None:
        raise NotImplementedError("a ParallelScalingBlock with a fused output projection: build it with fuse_out_proj=False")
    hidden, dim = block.in_split[0], block.in_split[1]
    w = block.in_proj.weight.split(block.in_split)
    b = block.in_proj.bias.split(block.in_split) if block.in_proj.bias is not None else (block.mlp_bias, None, None, None)
    fc1 = nn.Linear(dim, hidden, bias=b[0] is not None).to(w[0].device, w[0].dtype)
    fc1.weight.copy_(w[0])
    if b[0] is not None:
        fc1.bias.copy_(b[0])
    scale = _scale(block.ls)
    new, report = sasp_from_parts(norm=block.in_norm, q=(w[1], b[1]), k=(w[2], b[2]), fc1=fc1, act=block.mlp_act, fc2=block.mlp_out_proj,
                                  num_heads=block.num_heads, options=options, mlp_scale=scale if options.fold_layer_scale else None)  # fmt: skip
    dropped = {("in_proj.weight[v]", "W_V = I"): w[3], ("in_proj.bias[v]", "W_V = I"): b[3],
               ("attn_out_proj.weight", "W_P = I"): block.attn_out_proj.weight, ("attn_out_proj.bias", "W_P = I"): block.attn_out_proj.bias,
               ("ls.gamma", "folded into mlp.fc2; α, β, γ carry the attention scale"): scale}  # fmt: skip
    return _finish(new, report, dropped)


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────


def _call(args: tuple, kwargs: dict) -> tuple[Tensor | None, bool]:
    mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
    return mask, bool(args[2] if len(args) > 2 else kwargs.get("is_causal", False))


def _heads(q: Tensor, k: Tensor, q_norm: nn.Module, k_norm: nn.Module, heads: int) -> tuple[Tensor, Tensor]:
    """The queries and keys after the block's per-head norms (identities unless qk_norm), back in (b, t, h·d)."""
    b, t, _ = q.shape
    q = q_norm(q.view(b, t, heads, -1)).reshape(b, t, -1)
    k = k_norm(k.view(b, t, heads, -1)).reshape(b, t, -1)
    return q, k


@register_attention_reader(Block)
def _read_block(block: Block, args: tuple, kwargs: dict) -> AttentionRead:
    attn, (mask, causal) = block.attn, _call(args, kwargs)
    q, k, _ = attn.qkv(block.norm1(args[0])).chunk(3, dim=-1)
    q, k = _heads(q, k, attn.q_norm, attn.k_norm, attn.num_heads)
    return read_softmax(q, k, attn.num_heads, scale=attn.scale, causal=causal, attn_mask=None if causal else mask)


@register_attention_reader(ParallelScalingBlock)
def _read_parallel(block: ParallelScalingBlock, args: tuple, kwargs: dict) -> AttentionRead:
    mask, causal = _call(args, kwargs)
    _, q, k, _ = block.in_proj(block.in_norm(args[0])).split(block.in_split, dim=-1)
    q, k = _heads(q, k, block.q_norm, block.k_norm, block.num_heads)
    return read_softmax(q, k, block.num_heads, scale=block.scale, causal=causal, attn_mask=None if causal else mask)


@register_attention_reader(SASPTimmBlock)
def _read_converted(block: SASPTimmBlock, args: tuple, kwargs: dict) -> AttentionRead:
    x, (mask, is_causal) = args[0], _call(args, kwargs)
    causal, padding = decode_attention_mask(mask, x.shape[0], x.shape[1], True if is_causal else None)
    sasp = block.sasp
    h = sasp.norm(x)
    return read_softmax(sasp.attn.q(h), sasp.attn.k(h), sasp.num_heads, causal=causal, key_padding_mask=padding)


for _vision_block in (Block, ParallelScalingBlock, SASPTimmBlock):
    register_block_causality(_vision_block)(lambda block: False)  # timm's Vision Transformers attend both ways unless a call says is_causal


# ── original models and their architecture (siclip.interop.converted) ────────────────────────────────────────────


# timm arguments that fetch or read files (weights from the hub or a URL, a checkpoint path): never taken from a record.
FETCHING_ARGUMENTS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "cache_dir")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?$")  # an architecture, optionally with a pretrained tag


def check_architecture(name, kwargs, where: str) -> None:
    """A timm architecture this timm registers (never a hub name, which timm would fetch), built with plain,
    bounded arguments, none of which fetch or read a file."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UnsafeModel(f"{where}: {name!r} is not a timm architecture name (hub names such as hf-hub:org/model are fetched; siclip "
                          "downloads nothing)")  # fmt: skip
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"{where}: timm has no architecture {name!r}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: kwargs must be an object of timm arguments, got {type(kwargs).__name__}")
    fetching = sorted(k for k in kwargs if k in FETCHING_ARGUMENTS or "url" in k or "hub" in k)
    if fetching:
        raise UnsafeModel(f"{where}: the arguments {fetching} would make timm fetch or read weights; siclip builds the architecture and "
                          "loads the weights file you name")  # fmt: skip
    scan_record(kwargs, where)


def load_original(rest: str, spec: str) -> nn.Module:
    """``timm:NAME:FILE``: timm's architecture ``NAME`` (built without downloading) with the weights in ``FILE``; ``NAME``
    may be a JSON file ``{"name": …, "kwargs": {…}}`` for an architecture built with arguments (sizes, heads)."""
    name, sep, weights = rest.rpartition(":")
    if not sep or not name:
        raise ValueError(f"{spec}: expected timm:NAME:FILE (a timm model name or a JSON of name and kwargs, and a weights file)")
    kwargs = {}
    if name.endswith(".json"):
        try:
            record = json.loads(Path(name).read_text())
            name, kwargs = record["name"], dict(record.get("kwargs", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{spec}: {name} must be a JSON object with a name and kwargs ({type(err).__name__}: {err})") from None
    check_architecture(name, kwargs, spec)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{spec}: weights file {weights} not found")
    state = load_weights(weights, what=f"{spec}: weights file", hint=f"pass the weights of timm's {name} (a state dict)")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{spec}: {weights} holds a {type(state).__name__}, not a state dict")
    kwargs.setdefault("num_classes", 0 if "head.weight" not in state else int(state["head.weight"].shape[0]))
    build_on_meta(lambda: timm.create_model(name, pretrained=False, **kwargs), spec)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{spec}: {str(err).strip().splitlines()[0][:300]}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{spec}: {weights} does not fit {name} {kwargs} ({str(err).splitlines()[1].strip()[:300]}); give the "
                         "arguments it was built with: timm:CONFIG.json:FILE with {\"name\": …, \"kwargs\": {…}}") from None  # fmt: skip
    model._siclip_architecture = {"name": name, "kwargs": kwargs}
    return model.eval()


def architecture_of(model: nn.Module) -> dict:
    """The name and arguments the model was built with (recorded by :func:`load_original`)."""
    record = getattr(model, "_siclip_architecture", None)
    if record is None:
        raise ValueError("this timm model was not loaded from a spec (timm:NAME:FILE), so its arguments are unknown")
    return record


def build_architecture(record: dict, where: str = "architecture record") -> nn.Module:
    """The model a record of :func:`architecture_of` describes (checked: :func:`check_architecture`, size on the meta device)."""
    name, kwargs = record.get("name"), record.get("kwargs", {})
    check_architecture(name, kwargs, where)
    build_on_meta(lambda: timm.create_model(name, pretrained=False, **kwargs), where)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model._siclip_architecture = record
    return model.eval()


def preprocess_of(model: nn.Module) -> Preprocess:
    """The model's ``pretrained_cfg`` (input size, crop fraction, interpolation, mean, std) as siclip's Preprocess."""
    cfg = model.pretrained_cfg
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the size the model was built for (img_size=…)
    size = built[-1] if built else cfg.get("input_size", (3, 224, 224))[-1]
    crop = cfg.get("crop_pct", 1.0) or 1.0
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocess(size=size, resize=int(size / crop), interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
                      mean=tuple(cfg.get("mean", (0.5,) * 3)), std=tuple(cfg.get("std", (0.5,) * 3)))  # fmt: skip


def original_tokenizer(model: nn.Module, rest: str) -> None:
    return None  # an image model


def calibration_run(model: nn.Module, tokenizer, preprocess: Preprocess, captions: list[str] | None, images: list | None):
    """``run(m)``: a timm image model of ``model``'s architecture on ``images`` in its own view (``preprocess``)."""
    from siclip.data.transforms import preprocess_image

    if not images:
        raise ValueError("a timm image model reads images: give calibration images")
    pixels = torch.stack([preprocess_image(im, preprocess) for im in images])
    return lambda m: m(pixels)


def original_preprocess(model: nn.Module, rest: str) -> Preprocess:
    return preprocess_of(model)


# ── FLIP token masking (siclip.blocks.token_dropout) ─────────────────────────────────────────────────────────────


@register_token_dropout(VisionTransformer)
def _vit_token_dropout(model: VisionTransformer, ratio: float) -> TokenDropout:
    """timm's ViT drops tokens in ``patch_drop`` (after ``_pos_embed``, before ``norm_pre`` and the blocks), keeping its
    ``num_prefix_tokens`` (class and register tokens)."""
    return replace_slot(model, "patch_drop", ratio, model.num_prefix_tokens)
# ── any timm image model as a CLIP's image tower (siclip.models.towers, family "timm") ──────────────────────────────


def _create_trunk(config: TimmTowerConfig) -> nn.Module:
    """timm's ``config.model_name`` with no classifier (``num_classes=0``: its pooled features), nothing downloaded; built
    for ``config.image_size`` when its constructor takes ``img_size`` (ViTs), else as it is (convolutional models)."""
    kwargs = {"num_classes": 0, **({"global_pool": config.pool} if config.pool is not None else {}), **config.kwargs}
    try:
        return timm.create_model(config.model_name, pretrained=False, **({"img_size": config.image_size} | kwargs))
    except TypeError as err:
        if "img_size" not in str(err) or "img_size" in config.kwargs:
            raise ValueError(f"timm image tower {config.model_name!r} {config.kwargs}: {err}") from None
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"timm image tower: {err}") from None
    return timm.create_model(config.model_name, pretrained=False, **kwargs)


class TimmImageTower(nn.Module):
    """``(batch, 3, S, S)`` in the model's own normalisation → ``(batch, embed_dim)``: the timm model's pooled features
    ``trunk(x)`` (``num_classes=0``), then ``proj``, a linear map to the embedding (open_clip's ``TimmModel`` with
    ``proj="linear"``)."""

    def __init__(self, config: TimmTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.trunk = _create_trunk(config)
        width = getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features  # the pooled (pre-logits) width
        self.proj = nn.Linear(width, embed_dim, bias=config.proj_bias)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable or getattr(self.trunk, "grad_checkpointing", False):
            self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> Tensor:
        features = self.trunk(images)
        if features.dim() != 2:
            raise ValueError(f"timm model {self.config.model_name!r} gives features of shape {tuple(features.shape)} with num_classes=0, "
                             "not (batch, features): choose a pool (TimmTowerConfig.pool, e.g. 'avg')")  # fmt: skip
        return self.proj(features)


def tower_preprocess(config: TimmTowerConfig) -> Preprocess:
    """The pixels timm's ``pretrained_cfg`` of the model gives (mean, std, interpolation), size-free as a model config's."""
    if not timm.is_model(config.model_name):
        raise ValueError(f"timm image tower: unknown timm model {config.model_name!r} (timm.list_models() names them)")
    cfg = get_pretrained_cfg(config.model_name)
    if cfg is None:  # a model with no pretrained configuration: timm's defaults (ImageNet's mean and std, bicubic)
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return Preprocess(interpolation="bicubic", mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bicubic"
    return Preprocess(interpolation=interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std))


register_image_family("timm", TimmTowerConfig, TimmImageTower, tower_preprocess)
