"""Hugging Face transformers in siclip: block converters, attention readers, the CLIP adapter and its preprocessing.

Imported by siclip's registries the first time they meet a transformers object (never by siclip otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from torch import Tensor, nn
from torch.nn import functional as F

from siclip.data.transforms import CLIP_MEAN, CLIP_STD, Preprocess
from siclip.interop import ADAPTERS, LoadedClip

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────


# ── CLIP adapter: teachers and evaluation, preprocessing ─────────────────────────────────────────────────────────
CLIP_MODELS = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them


def _features(output) -> Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features; 4.x a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class HFTokenizer:
    """A transformers tokenizer with siclip's interface: ``tokenizer(texts) -> (n, context_length)`` ids, padded to
    the context length as the model was trained (``padding="max_length"``), plus ``encode`` for content ids."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self.name = f"hf:{type(tokenizer).__name__}"
        self.vocab_size = len(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.eot_token_id = tokenizer.eos_token_id
        self.sot_token_id = tokenizer.bos_token_id
        self.unk_token_id = tokenizer.unk_token_id
        self.uses_attention_mask = "attention_mask" in tokenizer.model_input_names

    def __call__(self, texts, context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=context_length or self.context_length,
                              return_tensors="pt")["input_ids"]  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in text.split() if self.unk_token_id in self.encode(w)]

    def attention_mask(self, ids: Tensor) -> Tensor | None:
        """The mask the tokenizer returns with ``ids``: real tokens 1, padding 0 (None when the model takes none).
        When padding reuses the end-of-text token (CLIP's), a sequence ends at its first end-of-text token."""
        if not self.uses_attention_mask:
            return None
        if self.pad_token_id is None or self.pad_token_id == self.eot_token_id:
            ends = (ids == self.eot_token_id).int()
            after = (ends.cumsum(-1) - ends) > 0  # strictly after the first end-of-text token
            return (~after).long()
        return (ids != self.pad_token_id).long()


class HFClip(nn.Module):
    """A transformers ``CLIPModel`` or ``SiglipModel`` with siclip's CLIP interface (``siclip.interop``)."""

    def __init__(self, model: nn.Module, tokenizer: HFTokenizer, preprocess: Preprocess, name: str) -> None:
        super().__init__()
        self.model, self.tokenizer, self.preprocess, self.name = model, tokenizer, preprocess, name
        config = model.config
        self.embed_dim = getattr(config, "projection_dim", None) or config.vision_config.hidden_size

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        mask = self.tokenizer.attention_mask(ids)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)

    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().reshape(())


def default_preprocess(model: nn.Module) -> Preprocess:
    """The image processor's defaults for ``model`` when no ``preprocessor_config.json`` says otherwise: CLIP's
    (bicubic short side, centre crop, OpenAI's mean and std), SigLIP's (bicubic squash to the input size, mean = std = ½)."""
    size = model.config.vision_config.image_size
    if model.config.model_type == "siglip":
        return Preprocess(size=size, resize_mode="squash", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    return Preprocess(size=size, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)


def preprocess_from_file(path: Path) -> Preprocess:
    """A ``preprocessor_config.json`` (``CLIPImageProcessor``, ``SiglipImageProcessor``) as siclip's Preprocess."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable image processor configuration ({err})") from None
    size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if cfg.get("do_rescale", True) and abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ValueError(f"{path}: rescale_factor {cfg['rescale_factor']} (siclip's views scale pixels by 1/255)")
    if cfg.get("resample", 3) not in _RESAMPLE:
        raise ValueError(f"{path}: resample {cfg.get('resample')} (siclip resizes with bilinear (2) or bicubic (3))")
    if "shortest_edge" in size:
        resize, mode = size["shortest_edge"], "shortest"
    elif size.get("height") == size.get("width") and size.get("height"):
        resize, mode = size["height"], "squash"
    else:
        raise ValueError(f"{path}: size {size} (siclip takes a shortest edge or a square)")
    if cfg.get("do_center_crop", mode == "shortest"):
        if crop.get("height") != crop.get("width") or not crop.get("height"):
            raise ValueError(f"{path}: crop_size {crop} (siclip takes square crops)")
        out = crop["height"]
    else:
        out = resize
    normalize = cfg.get("do_normalize", True)
    return Preprocess(size=out, resize=resize, resize_mode=mode, interpolation=_RESAMPLE[cfg.get("resample", 3)],
                      mean=tuple(cfg.get("image_mean", CLIP_MEAN)) if normalize else (0.0,) * 3,
                      std=tuple(cfg.get("image_std", CLIP_STD)) if normalize else (1.0,) * 3)  # fmt: skip


def _context_length(model: nn.Module) -> int:
    return model.config.text_config.max_position_embeddings


def adapt(model: nn.Module, tokenizer=None, preprocess: Preprocess | None = None, spec: str | None = None) -> LoadedClip:
    """``model`` (``CLIPModel``/``SiglipModel``) with siclip's interface; ``tokenizer`` a transformers tokenizer."""
    if tokenizer is None:
        raise ValueError(f"a {type(model).__name__} needs its tokenizer: as_clip(model, tokenizer=AutoTokenizer.from_pretrained(DIR))")
    wrapped = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer, _context_length(model))
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    clip = HFClip(model.eval(), wrapped, preprocess or default_preprocess(model), str(name))
    return LoadedClip(clip, wrapped, spec or f"<{type(model).__name__} object>")


for _cls in CLIP_MODELS.values():
    ADAPTERS.register(_cls)(adapt)


def load_spec(directory: str, spec: str) -> LoadedClip:
    """``hf:DIR``: the model, tokenizer and image processor configuration saved in ``DIR`` (nothing downloaded)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: {path} is not a transformers model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in CLIP_MODELS:
        raise ValueError(f"{spec}: a {config.model_type!r} model; siclip takes CLIP and SigLIP models ({sorted(CLIP_MODELS)}) as CLIPs")
    model = CLIP_MODELS[config.model_type].from_pretrained(path, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{spec}: no usable tokenizer saved in {path} ({str(err).splitlines()[0]}); save it beside the model "
                                "(tokenizer.save_pretrained(DIR))") from None  # fmt: skip
    processor = path / "preprocessor_config.json"
    if not processor.is_file():
        raise FileNotFoundError(f"{spec}: no preprocessor_config.json in {path}: siclip reads the model's preprocessing from it "
                                "(save the image processor beside the model: processor.save_pretrained(DIR))")  # fmt: skip
    return adapt(model, tokenizer, preprocess_from_file(processor), spec)
