"""open_clip in siclip: block converters, attention readers, the CLIP adapter and its preprocessing.

Imported by siclip's registries the first time they meet an open_clip object (never by siclip otherwise).

``ResidualAttentionBlock`` (text and visual towers): ``X + ls₁·MHA(ln_1 X)``, ``+ ls₂·MLP(ln_2 ·)``. Inherited: ln_1,
W_Q, W_K (the ``in_proj`` rows) and their biases, the MLP (c_fc, activation, c_proj), ls₂ folded into c_proj. Dropped:
W_V, W_P (``attn.out_proj``), ln_2, ls₁. The converted block keeps open_clip's call, ``block(q_x, k_x=None,
v_x=None, attn_mask=None)`` (the text tower's additive causal mask, and its padding masks, decoded), its layout
(``batch_first``) and ``get_weight_dtype``, which the host's forward asks for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn
from torch.nn import functional as F

from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer

from siclip.blocks import (
    AttentionRead, ConversionReport, SASPBlock, SASPConversion, read_softmax, register_attention_reader, register_block_causality,
    register_converter, register_host_fixup, sasp_from_parts,
)  # fmt: skip
from siclip.blocks.masking import decode_attention_mask
from siclip.blocks.token_dropout import TokenDropout, register_token_dropout, replace_slot
from siclip.data.transforms import INTERPOLATIONS, RESIZE_MODES, Preprocess
from siclip.interop import ADAPTERS
from siclip.interop.safety import UnsafeModel, build_on_meta, check_shapes, looks_like_hub_name, read_json, scan_record
from siclip.schema import MAX_CONTEXT, in_range, open_clip_tokenizer_kwargs
from siclip.models.loaded import LoadedClip
from siclip.storage import load_weights

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


class SASPOpenClipBlock(nn.Module):
    """A SAS-P block with open_clip's residual-block call and layout. ``causal``: whether its tower masks later tokens,
    which the host model tells it after conversion (:func:`_tell_blocks_their_tower`; None: read from each call's mask,
    which an exporter's trace cannot do)."""

    def __init__(self, block: SASPBlock, batch_first: bool = True, causal: bool | None = None) -> None:
        super().__init__()
        self.sasp, self.batch_first, self.causal = block, batch_first, causal

    def get_weight_dtype(self) -> torch.dtype:
        return self.sasp.mlp.fc1.weight.dtype

    def forward(self, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("a SAS-P block attends to its own input: cross-attention (k_x, v_x) was not converted")
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        causal, padding = decode_attention_mask(attn_mask, x.shape[0], x.shape[1], self.causal if attn_mask is not None else None)
        out = self.sasp(x, padding, causal)
        return out if self.batch_first else out.transpose(0, 1)


@register_converter(ResidualAttentionBlock)
def _convert_residual_block(block: nn.Module, options: SASPConversion) -> tuple[nn.Module, ConversionReport]:
    if hasattr(block, "ln_1_kv"):
        raise NotImplementedError("an open_clip cross-attention block: SAS-P replaces self-attention only")
    attn, mlp = block.attn, block.mlp
    if not attn._qkv_same_embed_dim:
        raise NotImplementedError("an nn.MultiheadAttention with separate key/value widths: SAS-P keeps the width")
    dim = attn.embed_dim
    w = attn.in_proj_weight.split(dim)
    b = attn.in_proj_bias.split(dim) if attn.in_proj_bias is not None else (None, None, None)
    ls1, ls2 = (getattr(block, name).gamma if hasattr(getattr(block, name), "gamma") else None for name in ("ls_1", "ls_2"))
    new, report = sasp_from_parts(norm=block.ln_1, q=(w[0], b[0]), k=(w[1], b[1]), fc1=mlp.c_fc, act=mlp.gelu, fc2=mlp.c_proj,
                                  num_heads=attn.num_heads, options=options, mlp_scale=ls2 if options.fold_layer_scale else None)  # fmt: skip
    out = ConversionReport()
    out.rows = [{**row, "parameter": f"sasp.{row['parameter']}"} for row in report.rows]
    out.add("", {"attn.in_proj_weight[v]": w[2], "attn.in_proj_bias[v]": b[2]}, "dropped", "W_V = I")
    out.add("", dict(attn.out_proj.named_parameters(prefix="attn.out_proj")), "dropped", "W_P = I")
    out.add("", dict(block.ln_2.state_dict(prefix="ln_2.")), "dropped", "one shared pre-norm")
    out.add("", {"ls_1.gamma": ls1}, "dropped", "α, β, γ carry the attention scale")
    out.add("", {"ls_2.gamma": ls2}, "dropped", "folded into mlp.fc2")
    return SASPOpenClipBlock(new, attn.batch_first), out


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────


def _tokens_and_mask(args: tuple, kwargs: dict, batch_first: bool) -> tuple[Tensor, Tensor | None]:
    x = args[0] if batch_first else args[0].transpose(0, 1)
    return x, (args[3] if len(args) > 3 else kwargs.get("attn_mask"))


@register_attention_reader(ResidualAttentionBlock)
def _read_residual_block(block: nn.Module, args: tuple, kwargs: dict) -> AttentionRead:
    attn = block.attn
    x, mask = _tokens_and_mask(args, kwargs, attn.batch_first)
    q, k, _ = nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if mask is not None and mask.dim() == 3:  # (batch·heads, T, T) as open_clip builds padding masks
        mask = mask.view(x.shape[0], -1, *mask.shape[-2:])
    return read_softmax(q, k, attn.num_heads, attn_mask=mask)


@register_attention_reader(SASPOpenClipBlock)
def _read_converted(block: SASPOpenClipBlock, args: tuple, kwargs: dict) -> AttentionRead:
    x, mask = _tokens_and_mask(args, kwargs, block.batch_first)
    causal, padding = decode_attention_mask(mask, x.shape[0], x.shape[1], block.causal if mask is not None else None)
    sasp = block.sasp
    h = sasp.norm(x)
    return read_softmax(sasp.attn.q(h), sasp.attn.k(h), sasp.num_heads, causal=causal, key_padding_mask=padding)


# A residual block serves the causal text tower and the visual one alike; the tower passes the mask on each call, so
# a block read on its own cannot tell (attention_probabilities then asks for causal=True or False).
register_block_causality(ResidualAttentionBlock)(lambda block: None)
register_block_causality(SASPOpenClipBlock)(lambda block: block.causal)


def _set_causal(blocks: nn.Module, causal: bool) -> None:
    for module in blocks.modules():
        if isinstance(module, SASPOpenClipBlock):
            module.causal = causal


@register_host_fixup(open_clip.CLIP)
def _tell_blocks_their_tower(model: nn.Module) -> None:
    """After conversion, each converted block learns its tower's causality (the text tower's attn_mask, None when it
    attends both ways; the visual tower never masks), so it needs no mask values to know it (an export traces)."""
    _set_causal(model.transformer, getattr(model, "attn_mask", None) is not None)
    _set_causal(model.visual, False)


@register_host_fixup(TextTransformer)
def _tell_text_blocks(tower: nn.Module) -> None:
    _set_causal(tower.transformer, getattr(tower, "attn_mask", None) is not None)


@register_host_fixup(VisionTransformer)
def _tell_visual_blocks(tower: nn.Module) -> None:
    _set_causal(tower, False)


# ── CLIP adapter: teachers and evaluation, preprocessing ─────────────────────────────────────────────────────────


class OpenClipTokenizer:
    """open_clip's tokenizer with siclip's interface (``tokenizer(texts) -> (n, context_length)`` ids); ``kwargs`` the
    arguments it was built with (an architecture's ``tokenizer_kwargs``), which :meth:`spec` records."""

    def __init__(self, tokenizer, name: str, kwargs: dict | None = None) -> None:
        self.tokenizer, self.name, self.kwargs = tokenizer, f"open_clip:{name}", dict(kwargs or {})
        self.context_length = tokenizer.context_length
        self.vocab_size = getattr(tokenizer, "vocab_size", None) or len(tokenizer.encoder)
        self.sot_token_id, self.eot_token_id = tokenizer.sot_token_id, tokenizer.eot_token_id

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, context_length=context_length or self.context_length)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def spec(self) -> dict:
        """What rebuilds it (:func:`tokenizer_from_spec`): open_clip's CLIP BPE ``SimpleTokenizer``, its context length and
        arguments; the BPE ships with open_clip, so no file is needed."""
        if type(self.tokenizer).__name__ != "SimpleTokenizer":
            raise ValueError(f"an open_clip {type(self.tokenizer).__name__} cannot be saved as data (siclip saves open_clip's SimpleTokenizer)")
        return {"name": "open_clip", "tokenizer": "SimpleTokenizer", "context_length": self.context_length, "kwargs": self.kwargs}


def tokenizer_from_spec(spec: dict, where: str = "checkpoint") -> OpenClipTokenizer:
    """The tokenizer :meth:`OpenClipTokenizer.spec` described."""
    if spec.get("tokenizer", "SimpleTokenizer") != "SimpleTokenizer" or not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"{where}: the saved open_clip tokenizer must be a SimpleTokenizer with its keyword arguments, got {spec}")
    return _simple_tokenizer(spec.get("context_length") or 77, spec.get("kwargs", {}), where)


def _tokenizer_problem(context_length, kwargs) -> str | None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or in_range(1, MAX_CONTEXT)(context_length):
        return f"the tokenizer's context_length must be an integer in [1, {MAX_CONTEXT}], got {context_length!r}"
    if not isinstance(kwargs, dict):
        return f"the tokenizer's arguments must be an object, got {type(kwargs).__name__}"
    wrong = open_clip_tokenizer_kwargs(kwargs)
    return f"the tokenizer's arguments {wrong}" if wrong else None


def _simple_tokenizer(context_length: int, kwargs: dict, where: str = "open_clip model config") -> OpenClipTokenizer:
    """open_clip's CLIP BPE tokenizer with the arguments a config or a saved spec gives, those checked first
    (:func:`siclip.schema.open_clip_tokenizer_kwargs`: never a ``bpe_path`` read from anywhere, never a reduction that
    downloads NLTK data)."""
    from open_clip.tokenizer import SimpleTokenizer

    wrong = _tokenizer_problem(context_length, kwargs)
    if wrong:
        raise UnsafeModel(f"{where}: {wrong}")
    return OpenClipTokenizer(SimpleTokenizer(context_length=context_length, **kwargs), "SimpleTokenizer", kwargs)


def tokenizer_of_config(config: dict) -> OpenClipTokenizer:
    """The tokenizer open_clip's ``get_tokenizer`` builds for a CLIP-BPE architecture's model config."""
    text = config.get("text_cfg", {})
    return _simple_tokenizer(text.get("context_length", 77), text.get("tokenizer_kwargs", {}))


class OpenClip(nn.Module):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` with siclip's CLIP interface (``siclip.interop``)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, name: str) -> None:
        super().__init__()
        self.model, self.preprocess, self.name = model, preprocess, name
        self.embed_dim = int(model.visual.output_dim)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        return F.normalize(self.model.encode_text(ids), dim=-1)

    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().reshape(())


def preprocess_of(model: nn.Module) -> Preprocess:
    """The model's ``preprocess_cfg`` (size, mean, std, interpolation, resize mode) as siclip's Preprocess."""
    # A model built from a config carries its preprocess_cfg; one built directly (open_clip.CLIP(...)) has open_clip's defaults.
    cfg = {**asdict(PreprocessCfg()), "size": model.visual.image_size, **open_clip.get_model_preprocess_cfg(model)}
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip model with a non-square input {tuple(size)}: siclip's views are square")
        size = size[0]
    interpolation, mode = cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest")
    if interpolation not in INTERPOLATIONS or mode not in RESIZE_MODES:
        raise ValueError(f"open_clip preprocessing with interpolation {interpolation!r} and resize_mode {mode!r}: siclip takes "
                         f"{sorted(INTERPOLATIONS)} and {list(RESIZE_MODES)}")  # fmt: skip
    return Preprocess(size=int(size), resize_mode=mode, interpolation=interpolation, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def adapt(model: nn.Module, tokenizer=None, preprocess: Preprocess | None = None, spec: str | None = None) -> LoadedClip:
    """``model`` with siclip's interface; ``tokenizer`` an open_clip tokenizer (needed: a built model does not name
    its architecture)."""
    if tokenizer is None:
        raise ValueError(f"an open_clip {type(model).__name__} needs its tokenizer: as_clip(model, tokenizer=open_clip.get_tokenizer(ARCH))")
    wrapped = tokenizer if isinstance(tokenizer, OpenClipTokenizer) else OpenClipTokenizer(tokenizer, type(model).__name__)
    clip = OpenClip(model.eval(), preprocess or preprocess_of(model), wrapped.name)
    return LoadedClip(clip, wrapped, spec or f"<open_clip {type(model).__name__} object>")


for _cls in (open_clip.CLIP, open_clip.CustomTextCLIP):
    ADAPTERS.register(_cls)(adapt)


def check_config(config: dict, where: str) -> None:
    """An open_clip model config that builds here without fetching or running anything: bounded fields
    (:func:`~siclip.interop.safety.scan_record`), no transformers text tower or tokenizer (open_clip would read them
    from the Hugging Face hub), no timm tower with pretrained weights or a hub name."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the model config must be an object, got {type(config).__name__}")
    scan_record(config, where)
    text, vision = config.get("text_cfg", {}), config.get("vision_cfg", {})
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError(f"{where}: text_cfg and vision_cfg must be objects")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            raise UnsafeModel(f"{where}: text_cfg.{key} = {text[key]!r}: this architecture's text {'tower' if key == 'hf_model_name' else 'tokenizer'} "
                              "comes from the Hugging Face hub, which siclip does not download; save the model with transformers and pass "
                              "hf:DIR, or use a CLIP-BPE architecture")  # fmt: skip
    wrong = _tokenizer_problem(text.get("context_length", 77), text.get("tokenizer_kwargs", {}))
    if wrong:
        raise UnsafeModel(f"{where}: text_cfg: {wrong}")
    if vision.get("timm_model_pretrained"):
        raise UnsafeModel(f"{where}: vision_cfg.timm_model_pretrained asks timm to download weights; siclip downloads nothing")
    name = vision.get("timm_model_name")
    if name is not None and (not isinstance(name, str) or looks_like_hub_name(name) or ":" in name):
        raise UnsafeModel(f"{where}: vision_cfg.timm_model_name {name!r} is not a timm architecture name (a hub name would be fetched)")


def _architecture(arch: str, spec: str) -> tuple[str, dict]:
    """``(name, model config)`` of a registered architecture or of a model-config JSON file (registered here), checked
    (:func:`check_config`)."""
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise UnsafeModel(f"{spec}: {arch!r} names a model on the Hugging Face hub; siclip downloads nothing: pass a registered "
                          "architecture or a model-config JSON")  # fmt: skip
    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: model config {path} not found")
        check_config(read_json(path, spec), f"{spec}: {path}")
        open_clip.add_model_config(path)
        arch = path.stem
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"{spec}: unknown open_clip architecture {arch!r} (a registered name, e.g. ViT-B-32, or a model-config JSON path)")
    if "siglip" in arch.lower():
        raise ValueError(f"{spec}: this architecture's tokenizer comes from the Hugging Face hub, which siclip does not download; "
                         "save the model with transformers and pass hf:DIR, or use a CLIP-BPE architecture")  # fmt: skip
    check_config(config, spec)
    return arch, config


def _model_class(config: dict) -> type:
    """The class open_clip's ``create_model`` builds for ``config``: CoCa where it names a multimodal decoder."""
    if "multimodal_cfg" in config:
        return open_clip.CoCa
    return open_clip.CustomTextCLIP if config.get("custom_text", False) or "hf_model_name" in config.get("text_cfg", {}) else open_clip.CLIP


def _constructor_args(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "custom_text"}


def load_spec(rest: str, spec: str) -> LoadedClip:
    """``open_clip:ARCH:FILE``: architecture ``ARCH`` built with the weights in ``FILE`` (loaded as data, strictly)."""
    model, _ = _load(rest, spec)
    return adapt(model, original_tokenizer(model, rest), spec=spec)


def load_original(rest: str, spec: str) -> nn.Module:
    return _load(rest, spec)[0]


def architecture_of(model: nn.Module) -> dict:
    """What rebuilds the model: the name and model config it was created from (recorded by :func:`_load`)."""
    record = getattr(model, "_siclip_architecture", None)
    if record is None:
        raise ValueError("this open_clip model was not loaded from a spec (open_clip:ARCH:FILE), so its config is unknown")
    return record


def build_architecture(record: dict, where: str = "architecture record") -> nn.Module:
    """The model a record of :func:`architecture_of` describes (checked: :func:`check_config`, size on the meta device)."""
    if not isinstance(record.get("name"), str):
        raise ValueError(f"{where}: name must be the architecture's name (a string), got {record.get('name')!r}")
    config = record.get("config")
    check_config(config, where)
    model_class, args = _model_class(config), _constructor_args(config)
    build_on_meta(lambda: model_class(**args), where)
    model = model_class(**args)
    model._siclip_architecture = record
    return model.eval()


def _load(rest: str, spec: str) -> tuple[nn.Module, str]:
    arch, sep, weights = rest.rpartition(":")
    if not sep or not arch:
        raise ValueError(f"{spec}: expected open_clip:ARCH:FILE (an architecture or model-config JSON, and a weights file)")
    arch, config = _architecture(arch, spec)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{spec}: weights file {weights} not found")
    meta = build_on_meta(lambda: _model_class(config)(**_constructor_args(config)), spec)
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: they are, just below
    try:
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    state = load_weights(weights, what=f"{spec}: weights file", hint=f"pass the weights of open_clip's {arch} (a state dict)")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{spec}: {weights} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved checkpoints
    check_shapes(meta, {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, f"{spec}: {weights}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{spec}: {weights} does not fit {arch}: missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    model._siclip_architecture = {"name": arch, "config": config}
    return model.eval(), arch


def original_tokenizer(model: nn.Module, rest: str) -> OpenClipTokenizer:
    """The tokenizer of the architecture the model was loaded as (its model config's)."""
    return tokenizer_of_config(architecture_of(model)["config"])


def calibration_run(model: nn.Module, tokenizer: OpenClipTokenizer, preprocess: Preprocess, captions: list[str] | None,
                    images: list | None):  # fmt: skip
    """``run(m)``: both towers of an open_clip CLIP of ``model``'s architecture on ``captions`` and ``images``; the text
    tower inside :func:`siclip.blocks.real_tokens` (positions up to each caption's end-of-text token: open_clip's text
    tower masks nothing but later tokens, so padding is known from the ids alone)."""
    from siclip.blocks import real_tokens
    from siclip.data.tokenizer import real_token_mask
    from siclip.data.transforms import preprocess_image

    if not captions or not images:
        raise ValueError("a CLIP's divergences need both calibration captions and calibration images")
    ids, pixels = tokenizer(captions), torch.stack([preprocess_image(im, preprocess) for im in images])
    tokens = real_token_mask(ids, tokenizer)

    def run(m: nn.Module):
        with real_tokens(tokens):
            text = nn.functional.normalize(m.encode_text(ids), dim=-1)
        return text, nn.functional.normalize(m.encode_image(pixels), dim=-1)

    return run


def original_preprocess(model: nn.Module, rest: str) -> Preprocess:
    return preprocess_of(model)


def adapt_converted(model: nn.Module, tokenizer: OpenClipTokenizer, preprocess: Preprocess | None, spec: str) -> LoadedClip:
    """A converted open_clip CLIP with the tokenizer and preprocessing its file holds."""
    return adapt(model, tokenizer, preprocess, spec)


# ── FLIP token masking (siclip.blocks.token_dropout) ─────────────────────────────────────────────────────────────


@register_token_dropout(VisionTransformer)
def _vit_token_dropout(model: VisionTransformer, ratio: float) -> TokenDropout:
    """open_clip's ViT drops tokens in ``patch_dropout`` (after the positional embedding, before ``ln_pre``), always
    keeping its class token, as its own ``PatchDropout`` does."""
    return replace_slot(model, "patch_dropout", ratio, 1)
