"""Any model spec, loaded to be measured or converted: the module whose blocks are read, and a function that runs a
module of its architecture on the user's calibration captions and images.

| spec | what is measured |
|---|---|
| a registered name (``mobileclip_tiny``…) | that siclip CLIP, untrained: a look at its architecture |
| a siclip checkpoint (``model.pt``, one trained on your data with its own tokenizer), Apple's ``mobileclip_s0.pt`` | the siclip CLIP, its text through its own tokenizer |
| ``hf:DIR``, ``open_clip:ARCH:FILE``, ``timm:NAME:FILE`` | the original model (any transformers model a block reader knows: CLIP, SigLIP, ViT, GPT-2…) |
| a converted file (``siclip convert``) | the converted model, through the tokenizer and preprocessing the file holds |

The calibration inputs themselves come from :mod:`siclip.data.calibration`; the divergences from
:func:`siclip.analysis.divergence.divergence_report`, which takes the module and ``lambda: run(module)``. Text runs
inside :func:`siclip.blocks.real_tokens`, so padding is never read as a query. An exported ONNX directory has no
blocks to read and is refused before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from siclip.data.transforms import Preprocess

ORIGIN_SCHEMES = ("hf", "open_clip", "timm")
MEASURABLE_HELP = ("a registered model name, a siclip checkpoint or Apple's mobileclip_s0.pt (a file), hf:DIR, open_clip:ARCH:FILE, "
                   "timm:NAME:FILE (a timm name or a JSON of name and kwargs, and a weights file), or a converted file")  # fmt: skip


def spec_kind(spec: str) -> str:
    """``"origin"`` (hf:, open_clip:, timm:), ``"registered"`` (a registered siclip model name) or ``"file"`` (a siclip
    checkpoint, Apple's file or a converted file: which one, the file's header says when it is loaded)."""
    from siclip.models import list_models

    head, sep, _ = spec.partition(":")
    if sep and head in ORIGIN_SCHEMES:
        return "origin"
    if spec in list_models():
        return "registered"
    return "file"


def check_measurable_spec(spec: str) -> str:
    """``spec`` when what it names is there and has blocks to read (checked before anything loads); else
    ``FileNotFoundError`` or ``ValueError`` naming it."""
    from . import check_model_spec

    kind = spec_kind(spec)
    if kind == "registered":
        return spec
    if kind == "origin" and spec.startswith("timm:"):
        name, sep, weights = spec.removeprefix("timm:").rpartition(":")
        if not sep or not name:
            raise ValueError(f"{spec}: expected timm:NAME:FILE (a timm model name or a JSON of name and kwargs, and a weights file)")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{spec}: weights file {weights} not found")
        return spec
    if kind == "file" and Path(spec).is_dir():
        raise ValueError(f"{spec} is a directory: an exported ONNX model has no blocks to read or convert; pass the checkpoint it was "
                         f"exported from ({MEASURABLE_HELP})")  # fmt: skip
    if kind == "file" and not Path(spec).exists():
        raise FileNotFoundError(f"model file not found: {spec} (expected {MEASURABLE_HELP})")
    return check_model_spec(spec)


@dataclass
class Calibrated:
    """A model spec loaded for measuring: ``module`` holds the blocks, ``run(m)`` calls a module of its architecture
    on the calibration inputs (text inside :func:`siclip.blocks.real_tokens`); ``kind`` is ``"origin"``,
    ``"siclip"`` or ``"converted"``; ``recipe`` a converted file's; ``tokenizer_spec`` what rebuilds its tokenizer."""

    spec: str
    kind: str
    module: nn.Module
    run: Callable[[nn.Module], Any]
    tokenizer: Any
    preprocess: Preprocess | None
    recipe: Any = None
    tokenizer_spec: dict | None = None


def clip_run(tokenizer, preprocess: Preprocess, captions: list[str] | None, images: list | None) -> Callable[[nn.Module], Any]:
    """``run(m)`` for any CLIP with siclip's interface (``encode_text``, ``encode_image``): the captions through
    ``tokenizer`` (only their tokens read as queries), the images in the view ``preprocess`` gives."""
    import torch

    from siclip.blocks import real_tokens
    from siclip.data.tokenizer import real_token_mask
    from siclip.data.transforms import preprocess_image

    if not captions or not images:
        raise ValueError("a CLIP's divergences need both calibration captions and calibration images")
    ids = tokenizer(captions)
    tokens = real_token_mask(ids, tokenizer)
    pixels = torch.stack([preprocess_image(image, preprocess) for image in images])

    def run(m: nn.Module):
        with real_tokens(tokens):
            text = m.encode_text(ids)
        return text, m.encode_image(pixels)

    return run


def load_for_calibration(spec: str, captions: list[str] | None, images: list | None, *, apple_model: str = "mobileclip_s0") -> Calibrated:
    """The model ``spec`` names (see the module docstring) with ``run`` over ``captions`` and ``images`` (uint8 arrays)."""
    from siclip.data.tokenizer import tokenizer_for, tokenizer_spec

    from .converted import calibration_run, is_converted_file, load_converted, load_original, original_tokenizer, original_preprocess
    from .converted import preprocess_of, tokenizer_of

    kind = spec_kind(spec)
    if kind == "origin":
        model = load_original(spec)
        tokenizer = original_tokenizer(spec, model) if captions else None
        preprocess = original_preprocess(spec, model) if images else None
        run = calibration_run(spec, model, captions, images, tokenizer=tokenizer, preprocess=preprocess)
        return Calibrated(spec, "origin", model, run, tokenizer, preprocess)
    if kind == "file" and is_converted_file(spec):
        model, recipe = load_converted(spec)
        tokenizer = tokenizer_of(recipe, model, spec) if captions else None
        preprocess = preprocess_of(recipe, model, spec) if images else None
        run = calibration_run(recipe.origin, model, captions, images, tokenizer=tokenizer, preprocess=preprocess)
        return Calibrated(spec, "converted", model, run, tokenizer, preprocess, recipe=recipe)
    from siclip.models import create_model, load_model

    if kind == "registered":
        model, saved = create_model(spec), None
    else:
        model, saved = load_model(spec, model=apple_model)
    model.eval()
    tokenizer = tokenizer_for(model.config.text, saved, spec)
    return Calibrated(spec, "siclip", model, clip_run(tokenizer, model.preprocess, captions, images), tokenizer, model.preprocess,
                      tokenizer_spec=tokenizer_spec(tokenizer))  # fmt: skip
