"""open_clip in siclip: block converters, attention readers, the CLIP adapter and its preprocessing.

Imported by siclip's registries the first time they meet an open_clip object (never by siclip otherwise).
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

from siclip.data.transforms import INTERPOLATIONS, RESIZE_MODES, Preprocess
from siclip.interop import ADAPTERS, LoadedClip

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────


# ── CLIP adapter: teachers and evaluation, preprocessing ─────────────────────────────────────────────────────────


class OpenClipTokenizer:
    """open_clip's tokenizer with siclip's interface (``tokenizer(texts) -> (n, context_length)`` ids)."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tokenizer, self.name = tokenizer, f"open_clip:{name}"
        self.context_length = tokenizer.context_length
        self.vocab_size = getattr(tokenizer, "vocab_size", None) or len(tokenizer.encoder)
        self.sot_token_id, self.eot_token_id = tokenizer.sot_token_id, tokenizer.eot_token_id

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, context_length=context_length or self.context_length)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


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


def _architecture(arch: str, spec: str) -> tuple[str, dict]:
    """``(name, model config)`` of a registered architecture or of a model-config JSON file (registered here)."""
    path = Path(arch)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: model config {path} not found")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{spec}: {path} is not JSON ({err})") from None
        open_clip.add_model_config(path)
        arch = path.stem
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"{spec}: unknown open_clip architecture {arch!r} (a registered name, e.g. ViT-B-32, or a model-config JSON path)")
    return arch, config


def load_spec(rest: str, spec: str) -> LoadedClip:
    """``open_clip:ARCH:FILE``: architecture ``ARCH`` built with the weights in ``FILE`` (loaded as data, strictly)."""
    arch, sep, weights = rest.rpartition(":")
    if not sep or not arch:
        raise ValueError(f"{spec}: expected open_clip:ARCH:FILE (an architecture or model-config JSON, and a weights file)")
    arch, config = _architecture(arch, spec)
    text = config.get("text_cfg", {})
    if text.get("hf_tokenizer_name") or "siglip" in arch.lower():
        raise ValueError(f"{spec}: this architecture's tokenizer comes from the Hugging Face hub, which siclip does not download; "
                         "save the model with transformers and pass hf:DIR, or use a CLIP-BPE architecture")  # fmt: skip
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{spec}: weights file {weights} not found")
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: they are, just below
    try:
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, load_weights=False)
    finally:
        logging.disable(logging.NOTSET)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, a truncated or foreign file
        raise ValueError(f"{spec}: {weights} is not a loadable weights file ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{spec}: {weights} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved checkpoints
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{spec}: {weights} does not fit {arch}: missing {list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
    return adapt(model, OpenClipTokenizer(open_clip.get_tokenizer(arch), arch), spec=spec)
