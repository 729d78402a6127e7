"""A model someone else wrote, converted to SAS-P and shared, saved as data and rebuilt from it.

The checkpoint (``format: siclip-converted-1``) holds no code: the spec the original came from, what rebuilds its
architecture without its weights (a transformers class and config, an open_clip model config, a timm name and
arguments), the names of the converted blocks, the conversion options, each stack's sharing plan and scope, the
model's preprocessing, and the state dict. :func:`load_converted` builds the architecture, converts and shares the same
blocks, and loads the weights strictly, so it reloads the same model (tested to 0 difference).

Origins (the spec's scheme): ``hf:DIR``, ``open_clip:ARCH:FILE``, ``timm:NAME:FILE``. Each library's module in
:mod:`siclip.interop` provides ``load_original(rest, spec)``, ``architecture_of(model)`` and
``build_architecture(record, where)``.

**A file handed over is data to check** before anything is built from it: every field against
:data:`CONVERTED_FIELDS` (:mod:`siclip.schema`: types, ranges, finite weights), then the architecture record by its
library's ``build_architecture`` (a class or name the library ships, no code or hub name, a size counted on the meta
device, :mod:`siclip.interop.safety`). A refusal is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from siclip.blocks import SASPConversion, SharingPlan, apply_sharing, convert_to_sasp
from siclip.blocks.backends import BACKENDS
from siclip.data.transforms import Preprocess
from siclip.errors import require
from siclip.schema import Field, FileRefused, check_fields, finite_tensors, in_range, list_of, one_of, preprocess_record
from siclip.storage import CheckpointError, load_weights, save_atomic

FORMAT = "siclip-converted-1"
ORIGINS = {"hf": ("transformers", "transformers"), "open_clip": ("open_clip", "open_clip_torch"), "timm": ("timm", "timm")}


def _library(spec: str) -> tuple[str, str]:
    """``(interop module name, rest of the spec)`` for an origin spec, the library imported (or a clear error)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ORIGINS:
        raise ValueError(f"{spec!r} names no model origin: use hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE")
    library, package = ORIGINS[scheme]
    require(library, package, f"model spec {spec!r}")
    return f"siclip.interop.{library}", rest


def _origin(value: str) -> str | None:
    scheme, sep, rest = value.partition(":")
    return None if sep and scheme in ORIGINS and rest else f"must be hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE, got {value[:80]!r}"


_OPTION_CHECKS = {"zero_query": (bool, None), "trainable_value": (bool, None), "fold_layer_scale": (bool, None), "fused_proj": (bool, None),
                  "beta_sa": ((int, float), in_range(0.0, 100.0)), "beta_ff": ((int, float), in_range(0.0, 100.0)),
                  "backend": (str, one_of(*BACKENDS))}  # fmt: skip


def _options(value: dict) -> str | None:
    """Conversion options: fields of :class:`~siclip.blocks.SASPConversion` only, each of its type and in range."""
    for key, option in value.items():
        if key not in _OPTION_CHECKS:
            return f"has {key!r}, not a conversion option ({sorted(_OPTION_CHECKS)})"
        types, check = _OPTION_CHECKS[key]
        if isinstance(option, bool) != (types is bool) or not isinstance(option, types):
            return f"{key} must be {'true or false' if types is bool else 'a ' + getattr(types, '__name__', 'number')}, got {option!r}"
        wrong = check(option) if check else None
        if wrong:
            return f"{key} {wrong}"
    return None


def _sharing(value: dict) -> str | None:
    """Per stack (its qualified name): groups of block indices and a scope."""
    for stack, plan in value.items():
        if not isinstance(plan, dict) or set(plan) != {"groups", "scope"}:
            return f"plan of {stack!r} must be an object with groups and scope"
        wrong = one_of("block", "attention")(plan["scope"]) or list_of(list, 10_000, list_of(int, 10_000, in_range(0, 9_999)))(plan["groups"])
        if wrong:
            return f"plan of {stack!r}: {wrong}"
    return None


def _state_dict(value: dict) -> str | None:
    import torch

    wrong = next((k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if wrong is not None:
        return f"must map names to tensors ({wrong!r} does not)"
    return finite_tensors(value.items())


# The converted file, field by field (siclip.schema); a new field is one more line.
CONVERTED_FIELDS = {
    "format": Field(str, one_of(FORMAT)),
    "origin": Field(str, _origin),
    "architecture": Field(dict),  # checked by its library's build_architecture
    "blocks": Field(list, list_of(str, 100_000)),
    "options": Field(dict, _options),
    "sharing": Field(dict, _sharing),
    "preprocess": Field((dict, type(None)), lambda v: preprocess_record(v) if v is not None else None, required=False),
    "state_dict": Field(dict, _state_dict),
}


def load_original(spec: str) -> nn.Module:
    """The model an origin spec names, with its weights (nothing downloaded)."""
    module, rest = _library(spec)
    return importlib.import_module(module).load_original(rest, spec)


@dataclass
class ConvertedRecipe:
    origin: str  # hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE
    architecture: dict  # the library's record of the original architecture (no weights)
    blocks: list[str]  # qualified names of the converted blocks
    options: dict = field(default_factory=lambda: dataclasses.asdict(SASPConversion()))
    sharing: dict = field(default_factory=dict)  # stack name -> {"groups": [[i, …], …], "scope": "block" | "attention"}
    preprocess: dict | None = None

    def conversion(self) -> SASPConversion:
        return SASPConversion(**self.options)


def convert(model: nn.Module, recipe: ConvertedRecipe):
    """Convert ``recipe.blocks`` of ``model`` and apply its sharing plans, in place; returns the conversion report."""
    model, report = convert_to_sasp(model, names=recipe.blocks, options=recipe.conversion())
    for stack, plan in recipe.sharing.items():
        blocks = model.get_submodule(stack)
        apply_sharing(blocks, SharingPlan(tuple(tuple(g) for g in plan["groups"])), scope=plan["scope"])
    return report


def rebuild(recipe: ConvertedRecipe, where: str = "converted model") -> nn.Module:
    """The converted model's architecture with fresh weights (the record checked by its library; a block or plan
    that does not fit it is the file's problem, named after ``where``)."""
    module, _ = _library(recipe.origin)
    model = importlib.import_module(module).build_architecture(recipe.architecture, f"{where}: architecture")
    try:
        convert(model, recipe)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileRefused(f"{where}: its blocks or sharing plans do not fit its architecture ({type(err).__name__}: {first})") from None
    return model


def save_converted(model: nn.Module, recipe: ConvertedRecipe, path: str | Path) -> Path:
    """``model`` and its recipe, as data, written atomically (:func:`siclip.storage.save_atomic`)."""
    return save_atomic({"format": FORMAT, **dataclasses.asdict(recipe), "state_dict": model.state_dict()}, path)


CONVERTED_HINT = "pass a file written by experiments/convert_model.py"


def is_converted(payload) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_converted(path: str | Path, payload: dict | None = None) -> tuple[nn.Module, ConvertedRecipe]:
    """``(model, recipe)`` from :func:`save_converted`'s file (``weights_only`` loading, strict state dict)."""
    path = Path(path)
    if payload is None:
        payload = load_weights(path, what="converted model", hint=CONVERTED_HINT)
    if not is_converted(payload):
        raise CheckpointError(f"{path} is not a converted model (format {FORMAT!r}); {CONVERTED_HINT}")
    check_fields(payload, CONVERTED_FIELDS, str(path))
    fields = {f.name for f in dataclasses.fields(ConvertedRecipe)}
    recipe = ConvertedRecipe(**{k: v for k, v in payload.items() if k in fields})
    model = rebuild(recipe, str(path))
    dtypes = {t.dtype for t in payload["state_dict"].values() if t.is_floating_point()}
    if len(dtypes) == 1:  # built in float32; weights saved in another precision keep it
        model.to(dtypes.pop())
    expected = model.state_dict()
    wrong = next((k for k, v in payload["state_dict"].items() if k in expected and v.shape != expected[k].shape), None)
    if wrong is not None:
        raise FileRefused(f"{path}: the saved weights do not fit the rebuilt model: {wrong} is {list(payload['state_dict'][wrong].shape)}, "
                          f"the architecture makes it {list(expected[wrong].shape)}")  # fmt: skip
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise FileRefused(f"{path}: the saved weights do not fit the rebuilt model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model.eval(), recipe


def preprocess_of(recipe: ConvertedRecipe) -> Preprocess | None:
    return Preprocess.from_dict(recipe.preprocess) if recipe.preprocess is not None else None


def calibration_run(spec: str, model: nn.Module, captions: list[str] | None, images: list | None):
    """``run(m)``, which runs a model of ``model``'s architecture (loaded from ``spec``; converted or not) on calibration
    captions and/or images (uint8 arrays), each through the original's tokenizer and preprocessing: what divergences
    and FLOPs are measured on, and what checks that a saved model reloads the same."""
    module, rest = _library(spec)
    return importlib.import_module(module).calibration_run(model, rest, captions, images)


def architecture_of(spec: str, model: nn.Module) -> dict:
    """What rebuilds ``model``'s architecture (loaded from ``spec``) without its weights."""
    module, _ = _library(spec)
    return importlib.import_module(module).architecture_of(model)


def original_preprocess(spec: str, model: nn.Module) -> Preprocess | None:
    """The preprocessing of the model ``spec`` names, when it reads images (None for a text model)."""
    module, rest = _library(spec)
    return importlib.import_module(module).original_preprocess(model, rest)


class ConvertedClip(nn.Module):
    """A converted CLIP (transformers or open_clip) as a siclip student: ``forward(pixels, ids) -> (image features,
    text features, exp(logit scale))`` like siclip's CLIP, the CLIP interface of :mod:`siclip.interop`, and the
    recipe it was converted with, so training saves it in the same format (:meth:`save`)."""

    def __init__(self, clip: nn.Module, recipe: ConvertedRecipe) -> None:
        super().__init__()
        self.clip, self.recipe = clip, recipe

    @property
    def preprocess(self) -> Preprocess:
        return self.clip.preprocess

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def name(self) -> str:
        return f"SAS-P {self.clip.name}"

    def encode_image(self, pixels):
        return self.clip.encode_image(pixels)

    def encode_text(self, ids):
        return self.clip.encode_text(ids)

    def scale(self):
        return self.clip.scale()

    def forward(self, pixels, ids):
        return self.encode_image(pixels), self.encode_text(ids), self.scale()

    def train_only_converted(self) -> None:
        """Weight inheritance as the paper trains it: every inherited module frozen, the SAS-P blocks trained."""
        prefixes = tuple(f"clip.model.{name}." for name in self.recipe.blocks)
        for name, parameter in self.named_parameters(remove_duplicate=False):
            parameter.requires_grad_(name.startswith(prefixes))

    def save(self, path: str | Path) -> Path:
        return save_converted(self.clip.model, self.recipe, path)


def is_converted_file(path: str | Path) -> bool:
    """Whether ``path`` is a file :func:`save_converted` wrote (the header alone is read)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        payload = load_weights(path, mmap=True)
    except CheckpointError:  # not loadable as data: not ours either way (the caller reports it)
        return False
    return is_converted(payload)


def check_converted_file(path: str | Path) -> None:
    """Nothing when ``path`` is a converted file, else the reason it is not one (:class:`CheckpointError` naming it):
    what a command says of a converted file it refused, rather than that the name is unknown."""
    payload = load_weights(path, what="converted model", hint=CONVERTED_HINT, mmap=True)
    if not is_converted(payload):
        raise CheckpointError(f"{path} is not a converted model (format {FORMAT!r}); {CONVERTED_HINT}")


def load_converted_clip(path: str | Path):
    """A converted CLIP file as :class:`~siclip.interop.LoadedClip` (a :class:`ConvertedClip` and the original's
    tokenizer, which its origin provides: the transformers directory, the open_clip architecture)."""
    from . import LoadedClip

    model, recipe = load_converted(path)
    module, rest = _library(recipe.origin)
    loaded = importlib.import_module(module).adapt_converted(model, rest, recipe.origin, preprocess_of(recipe))
    return LoadedClip(ConvertedClip(loaded.model, recipe), loaded.tokenizer, str(path))
