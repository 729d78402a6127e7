"""A model someone else wrote, converted to SAS-P and shared, saved as data and rebuilt from it.

The checkpoint (``format: siclip-converted-1``) holds no code: the spec the original came from (its paths made
absolute when stored), what rebuilds its architecture without its weights (a transformers class and config, an
open_clip model config, a timm name and arguments), the names of the converted blocks, the conversion options, each
stack's sharing plan and scope, the model's preprocessing, its tokenizer (``tokenizer``: the tokenizer's spec as plain
data, :func:`siclip.data.tokenizer.tokenizer_spec`; a transformers tokenizer's files held as text), and the state
dict. :func:`load_converted` builds the architecture, converts and shares the same blocks, and loads the weights
strictly, so it reloads the same model (tested to 0 difference); nothing outside the file is read, so moving or
deleting the original's folder does not matter. (Files written before ``tokenizer`` existed read a transformers
tokenizer from the original's folder, as they did.)

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
from siclip.schema import (
    CONVERTED_TOKENIZERS, Field, FileRefused, by_name, check_fields, finite_tensors, in_range, list_of, one_of, or_none, preprocess_record,
)  # fmt: skip
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
    "preprocess": Field((dict, type(None)), or_none(preprocess_record), required=False),
    "tokenizer": Field((dict, type(None)), or_none(by_name(CONVERTED_TOKENIZERS)), required=False),
    "state_dict": Field(dict, _state_dict),
}


def load_original(spec: str) -> nn.Module:
    """The model an origin spec names, with its weights (nothing downloaded)."""
    module, rest = _library(spec)
    return importlib.import_module(module).load_original(rest, spec)


def resolve_origin(spec: str) -> str:
    """``spec`` with its paths absolute (a directory, a weights file, a JSON config), as a converted file stores it:
    what it names stays named wherever the file or the working directory moves."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in ORIGINS:
        return spec
    if scheme == "hf":
        return f"hf:{Path(rest).resolve()}"
    name, sep, weights = rest.rpartition(":")
    if not sep:
        return spec
    name = str(Path(name).resolve()) if name.endswith(".json") else name
    return f"{scheme}:{name}:{Path(weights).resolve()}"


@dataclass
class ConvertedRecipe:
    origin: str  # hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE
    architecture: dict  # the library's record of the original architecture (no weights)
    blocks: list[str]  # qualified names of the converted blocks
    options: dict = field(default_factory=lambda: dataclasses.asdict(SASPConversion()))
    sharing: dict = field(default_factory=dict)  # stack name -> {"groups": [[i, …], …], "scope": "block" | "attention"}
    preprocess: dict | None = None
    tokenizer: dict | None = None  # the tokenizer's spec, plain data (None: an image model, or a file from before)

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
    """``model`` and its recipe, as data, written atomically (:func:`siclip.storage.save_atomic`): the origin's paths
    stored absolute (:func:`resolve_origin`), and the original's tokenizer and preprocessing filled in when the recipe
    lacks them (read from the origin now, while it is there; a recipe whose transformers folder does not exist, a model
    built in memory, is saved as it is), so the file needs nothing else later."""
    complete = dataclasses.replace(recipe, origin=resolve_origin(recipe.origin))
    scheme, _, rest = complete.origin.partition(":")
    if scheme == "hf" and not Path(rest).is_dir():
        return save_atomic({"format": FORMAT, **dataclasses.asdict(complete), "state_dict": model.state_dict()}, path)
    if complete.tokenizer is None:
        from siclip.data.tokenizer import tokenizer_spec

        tokenizer = original_tokenizer(complete.origin, model)
        complete.tokenizer = tokenizer_spec(tokenizer) if tokenizer is not None else None
    if complete.preprocess is None:
        preprocess = original_preprocess(complete.origin, model)
        complete.preprocess = preprocess.to_dict() if preprocess is not None else None
    return save_atomic({"format": FORMAT, **dataclasses.asdict(complete), "state_dict": model.state_dict()}, path)


CONVERTED_HINT = "pass a file written by siclip convert"


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


def _older_origin(recipe: ConvertedRecipe, where: str, what: str) -> str:
    """The origin a file from before it held its ``what`` reads it from: a transformers folder must be named by an
    absolute path (files now store it so), or which folder is read would depend on the folder you run in (issue 32,
    row 6: another tokenizer, silently)."""
    scheme, _, rest = recipe.origin.partition(":")
    if scheme == "hf" and not Path(rest).is_absolute():
        raise FileRefused(f"{where} holds no {what} (it was converted before converted files carried theirs) and its origin "
                          f"{recipe.origin} is a relative path, read from whatever folder you run in: convert the original again to "
                          "write a self-contained file")  # fmt: skip
    return recipe.origin


def preprocess_of(recipe: ConvertedRecipe, model: nn.Module | None = None, where: str = "converted model") -> Preprocess | None:
    """The preprocessing a converted file holds; with ``model``, a file from before it held one reads its original's."""
    if recipe.preprocess is not None:
        return Preprocess.from_dict(recipe.preprocess)
    return original_preprocess(_older_origin(recipe, where, "preprocessing"), model) if model is not None else None


def tokenizer_of(recipe: ConvertedRecipe, model: nn.Module, where: str):
    """The tokenizer a converted file holds; a file from before it held one reads its original's (its library's
    :func:`original_tokenizer`: a transformers model's folder, an open_clip architecture's config)."""
    from siclip.data.tokenizer import tokenizer_from_spec

    if recipe.tokenizer is not None:
        return tokenizer_from_spec(recipe.tokenizer, where)
    origin = _older_origin(recipe, where, "tokenizer")
    try:
        return original_tokenizer(origin, model)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{where} holds no tokenizer (it was converted before converted files carried theirs) and reads the "
                                f"tokenizer of its original, {recipe.origin}, which cannot be loaded ({str(err).splitlines()[0]}); "
                                "convert the original again to write a self-contained file") from None  # fmt: skip


def original_tokenizer(spec: str, model: nn.Module):
    """The tokenizer of the model ``spec`` names, when it reads text (None for an image model)."""
    module, rest = _library(spec)
    return importlib.import_module(module).original_tokenizer(model, rest)


def calibration_run(spec: str, model: nn.Module, captions: list[str] | None, images: list | None, *, tokenizer=None, preprocess=None):
    """``run(m)``, which runs a model of ``model``'s architecture (loaded from ``spec``; converted or not) on calibration
    captions and/or images (uint8 arrays), each through its tokenizer and preprocessing (default: the original's;
    a converted file passes its own): what divergences and FLOPs are measured on, and what checks that a saved model
    reloads the same. Text runs inside :func:`siclip.blocks.real_tokens`, so divergences read tokens, not padding."""
    module, rest = _library(spec)
    library = importlib.import_module(module)
    tokenizer = library.original_tokenizer(model, rest) if tokenizer is None and captions else tokenizer
    preprocess = library.original_preprocess(model, rest) if preprocess is None and images else preprocess
    return library.calibration_run(model, tokenizer, preprocess, captions, images)


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
    """A converted CLIP file as :class:`~siclip.interop.LoadedClip`: a :class:`ConvertedClip` with the tokenizer and
    preprocessing the file holds (:func:`tokenizer_of`)."""
    from . import LoadedClip

    model, recipe = load_converted(path)
    module, _ = _library(recipe.origin)
    library = importlib.import_module(module)
    if not hasattr(library, "adapt_converted"):
        raise ValueError(f"{path}: a converted {type(model).__name__} from {recipe.origin} is not a CLIP (an image or text model alone)")
    tokenizer = tokenizer_of(recipe, model, str(path))
    preprocess = preprocess_of(recipe, model, str(path))
    loaded = library.adapt_converted(model, tokenizer, preprocess, recipe.origin)
    return LoadedClip(ConvertedClip(loaded.model, recipe), loaded.tokenizer, str(path))
