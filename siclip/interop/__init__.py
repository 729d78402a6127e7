"""siclip and the models people already hold: one module per foreign library, each imported only when needed.

- :mod:`siclip.interop.transformers` — Hugging Face transformers (CLIP, SigLIP, ViT, GPT-2)
- :mod:`siclip.interop.timm` — timm (Vision Transformer blocks)
- :mod:`siclip.interop.open_clip` — open_clip (text and visual towers, whole CLIPs)

Each module imports its library at the top and registers what siclip knows about it into siclip's registries
(:class:`siclip.blocks.registry.TypeRegistry`): block converters, attention readers, CLIP adapters and their
preprocessing. A registry imports the module the first time it meets an object of that library
(:func:`siclip.blocks.registry.import_interop_for`), so siclip never requires, and never itself imports, a foreign
library. This file stays free of foreign imports.

**Any CLIP, one interface** (what a teacher, the evaluation and the teacher cache use)::

    model.encode_image(pixels)   # (B, 3, S, S) in the model's own view (model.preprocess) → (B, D), unit norm
    model.encode_text(ids)       # (B, L) ids of its tokenizer → (B, D), unit norm
    model.scale()                # exp(logit scale)
    model.preprocess             # siclip.data.Preprocess, with its size
    model.embed_dim, model.name

siclip's own ``CLIP`` has it; :func:`as_clip` wraps a foreign model object in an adapter that has it, and
:func:`load_clip` builds one with its tokenizer from a *model spec*:

| spec | model |
|---|---|
| ``PATH`` (a file) | a siclip checkpoint, or a state dict in Apple's ``mobileclip_s0.pt`` layout |
| ``hf:DIR`` | a transformers ``CLIPModel`` / ``SiglipModel`` saved in ``DIR`` (``from_pretrained``, local only) |
| ``open_clip:ARCH:FILE`` | open_clip architecture ``ARCH`` (a registered name, or a model-config JSON path) with the weights in ``FILE`` |
| ``PATH`` (a converted file) | a transformers or open_clip CLIP converted to SAS-P (``siclip convert``) |
| ``DIR`` (a directory) | the ONNX encoders ``siclip export`` wrote there, under ONNX Runtime (:mod:`siclip.deploy`) |
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from siclip.blocks.registry import TypeRegistry
from siclip.errors import require
from siclip.models.loaded import LoadedClip

from ._torchvision_standin import install as _lend_torchvision_standin

_lend_torchvision_standin()  # timm and open_clip import where torchvision cannot (it warns once when it is used)

# ``adapter(model, tokenizer=None) -> LoadedClip`` per model type (filled by the interop modules).
ADAPTERS: TypeRegistry[Callable[..., "LoadedClip"]] = TypeRegistry("CLIP adapter")

# Spec scheme → (the library's import name, its pip package); ``siclip.interop.<library>.load_spec`` loads it.
SCHEMES = {"hf": ("transformers", "transformers"), "open_clip": ("open_clip", "open_clip_torch")}
SPEC_HELP = ("a siclip checkpoint or Apple's mobileclip_s0.pt (a file path), hf:DIR (a transformers CLIPModel or SiglipModel "
             "directory), open_clip:ARCH:FILE (an open_clip architecture or model-config JSON, and a weights file), or a "
             "directory of ONNX encoders written by siclip export")  # fmt: skip


def _scheme(spec: str) -> tuple[str, str] | None:
    head, sep, rest = spec.partition(":")
    return (head, rest) if sep and head in SCHEMES else None


def check_model_spec(spec: str | Path) -> str:
    """``spec`` when what it names is there (checked before anything loads): a file for a path, an exported model
    for a directory, a directory for ``hf:DIR``, an architecture and a weights file for ``open_clip:ARCH:FILE``; else ``FileNotFoundError`` or
    ``ValueError`` naming it."""
    spec = str(spec)
    scheme = _scheme(spec)
    if scheme is None:
        if Path(spec).is_dir():
            from siclip.deploy.runtime import MANIFEST, is_exported_dir

            if not is_exported_dir(spec):
                raise FileNotFoundError(f"{spec} is a directory without {MANIFEST}: not an exported model (expected {SPEC_HELP})")
        elif not Path(spec).is_file():
            raise FileNotFoundError(f"model file not found: {spec} (expected {SPEC_HELP})")
    elif scheme[0] == "hf":
        if not Path(scheme[1]).is_dir():
            raise FileNotFoundError(f"{spec}: directory {scheme[1]} not found (hf:DIR names a saved transformers model's directory)")
    else:
        arch, sep, weights = scheme[1].rpartition(":")
        if not sep or not arch:
            raise ValueError(f"{spec}: expected open_clip:ARCH:FILE (an architecture or model-config JSON, and a weights file)")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{spec}: weights file {weights} not found")
    return spec


def spec_files(spec: str | Path) -> list[str]:
    """The files and folders a model spec reads (a command never writes over them): the file or folder of a path,
    ``DIR`` of ``hf:DIR``, the config JSON and weights of ``open_clip:ARCH:FILE`` and ``timm:NAME:FILE``."""
    spec = str(spec)
    head, sep, rest = spec.partition(":")
    if not sep or head not in (*SCHEMES, "timm"):
        return [spec]
    if head == "hf":
        return [rest]
    name, _, weights = rest.rpartition(":")
    return [p for p in (weights, name if name.endswith(".json") else "") if p]


def load_clip(spec: str | Path, *, apple_model: str = "mobileclip_s0") -> LoadedClip:
    """The CLIP a model spec names, with its tokenizer (see the module docstring); nothing is downloaded.

    ``apple_model``: the registered configuration a file in Apple's layout is built as."""
    spec = str(spec)
    scheme = _scheme(spec)
    if scheme is not None:
        library, package = SCHEMES[scheme[0]]
        require(library, package, f"model spec {spec!r}")
        return importlib.import_module(f"siclip.interop.{library}").load_spec(scheme[1], spec)
    if Path(spec).is_dir():
        from siclip.deploy.runtime import load_exported

        return load_exported(spec, spec=spec)  # a directory without the manifest is refused there, by name
    from siclip.data.tokenizer import tokenizer_for, tokenizer_spec
    from siclip.models import load_model

    from .converted import is_converted_file, load_converted_clip

    if is_converted_file(spec):
        return load_converted_clip(spec)
    model, saved = load_model(spec, model=apple_model)
    tokenizer = tokenizer_for(model.config.text, saved, spec)
    return LoadedClip(model.eval(), tokenizer, spec, tokenizer_spec(tokenizer))


def as_clip(model, tokenizer=None) -> LoadedClip:
    """Any built CLIP object (a siclip ``CLIP``, a transformers ``CLIPModel``/``SiglipModel``, an open_clip
    ``CLIP``…) with the interface above; ``tokenizer`` overrides the one the adapter would choose."""
    from siclip.models import CLIP

    if isinstance(model, CLIP):
        if tokenizer is None:
            from siclip.data.tokenizer import tokenizer_for

            tokenizer = tokenizer_for(model.config.text)
        return LoadedClip(model, tokenizer, f"<{type(model).__name__} object>")
    adapter = ADAPTERS.find(model)
    if adapter is None:
        raise TypeError(f"no CLIP adapter for {type(model).__qualname__}; known: {', '.join(ADAPTERS.known()) or 'none'} "
                        "(and siclip's own CLIP)")  # fmt: skip
    return adapter(model, tokenizer)
