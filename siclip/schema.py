"""Files a user hands over, checked field by field before anything uses them: one table of fields per file kind.

    CONVERTED_FIELDS = {                                   # beside the format it describes (siclip.interop.converted)
        "format": Field(str, one_of("siclip-converted-1")),
        "blocks": Field(list, list_of(str, 100_000)),
        "preprocess": Field((dict, type(None)), preprocess_record, required=False),
        ...
    }
    check_fields(payload, CONVERTED_FIELDS, "runs/conv.pt")   # FileRefused: "runs/conv.pt: field 'blocks' …"

A :class:`Field` is the types its value may have, a check that returns what is wrong with a value (or None), and
whether it may be absent; a new field of a format is one more line of its table. Checks compose: :func:`nested`
checks an object against a table of its own, :func:`by_name` against the table its ``name`` picks, :func:`list_of`
each item. The tables in use:

| file | table | where |
|---|---|---|
| a converted model (``siclip-converted-1``) | ``CONVERTED_FIELDS`` | :mod:`siclip.interop.converted` |
| an exported directory's ``siclip_onnx.json`` | ``MANIFEST_FIELDS``, ``ENCODER_FIELDS`` | :mod:`siclip.deploy.runtime` |
| a tokenizer described in either, by its ``name`` | ``TOKENIZER_FIELDS`` (siclip's), ``HF_TOKENIZER_FIELDS`` (a converted file's transformers tokenizer: its files as text), ``HF_EXPORTED_TOKENIZER_FIELDS`` (an exported one: its files in the directory), ``OPEN_CLIP_TOKENIZER_FIELDS`` | here |
| a preprocessing described in either | :func:`preprocess_record` | here |

Bounds (:data:`MAX_CONTEXT`, :data:`MAX_EMBED_DIM`, :data:`MAX_LOGIT_SCALE`, :data:`MAX_IMAGE_SIDE`) keep a hostile
file from asking for an allocation no model needs. Foreign-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from siclip.errors import UserError

MAX_CONTEXT = 1 << 14  # tokens of a text encoder's input (CLIP 77, long-context CLIPs 248…512)
MAX_EMBED_DIM = 1 << 16
MAX_IMAGE_SIDE = 8192
MAX_LOGIT_SCALE = 15.0  # the stored log scale s; exp(s) ≤ 3.3 M (CLIP clamps s at ln 100 ≈ 4.6)
MAX_WORDS = 1 << 21

Check = Callable[[Any], "str | None"]


class FileRefused(UserError, ValueError):
    """A file handed over whose fields do not hold what its format says; the message names the file and the field."""


@dataclass(frozen=True)
class Field:
    """One field of a file: the ``types`` its value may have, a ``check`` returning the problem (None when fine),
    and whether it may be absent."""

    types: type | tuple[type, ...]
    check: Check | None = None
    required: bool = True


def _type_names(types) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             type(None): "null"}  # fmt: skip
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types if not (t is int and float in types))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def problem_of(record: Any, table: dict[str, Field], key_path: str = "") -> str | None:
    """What is wrong with ``record`` under ``table`` (the first problem, naming the field), or None."""
    if not isinstance(record, dict):
        return f"{key_path or 'the file'} must be an object, got {type(record).__name__}"
    for key, field in table.items():
        name = f"{key_path}.{key}" if key_path else key
        if key not in record:
            if field.required:
                return f"field {name!r} is missing"
            continue
        value = record[key]
        types = field.types if isinstance(field.types, tuple) else (field.types,)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            return f"field {name!r} must be {_type_names(field.types)}, got {_short(value)}"
        if field.check is not None:
            wrong = field.check(value) if not getattr(field.check, "nested", False) else field.check(value, name)
            if wrong:
                return wrong if getattr(field.check, "nested", False) else f"field {name!r} {wrong}"
    return None


def check_fields(record: Any, table: dict[str, Field], where: str) -> dict:
    """``record`` when every field of ``table`` holds what it says, else :class:`FileRefused` "``where``: field …"."""
    wrong = problem_of(record, table)
    if wrong:
        raise FileRefused(f"{where}: {wrong}")
    return record


# ── checks ───────────────────────────────────────────────────────────────────────────────────────────────────────


def one_of(*values) -> Check:
    return lambda v: None if v in values else f"must be {' or '.join(repr(x) for x in values)}, got {_short(v)}"


def in_range(low: float, high: float) -> Check:
    """A finite number in [low, high]."""

    def check(value) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value}"
        return None if low <= value <= high else f"must be in [{low:g}, {high:g}], got {_short(value)}"

    return check


def list_of(types, most: int, item: Check | None = None) -> Check:
    """A list of at most ``most`` items of ``types``, each passing ``item``."""

    def check(values: list) -> str | None:
        if len(values) > most:
            return f"holds {len(values):,} items (at most {most:,})"
        for i, value in enumerate(values):
            if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)) or not isinstance(value, types):
                return f"item {i} must be {_type_names(types)}, got {_short(value)}"
            wrong = item(value) if item is not None else None
            if wrong:
                return f"item {i} {wrong}"
        return None

    return check


def nested(table: dict[str, Field]) -> Check:
    """An object checked against a table of its own (its problems name the whole key path)."""

    def check(value: dict, name: str) -> str | None:
        return problem_of(value, table, name)

    check.nested = True
    return check


def all_of(*checks: Check) -> Check:
    def check(value) -> str | None:
        return next((wrong for c in checks if (wrong := c(value))), None)

    return check


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def plain_file_name(value: str) -> str | None:
    """A file name inside the file's own folder: no directory part, no ``..``, nothing hidden."""
    return None if _FILE_NAME.match(value) and ".." not in value else f"must be a plain file name inside the folder, got {_short(value)}"


def inside(directory: str | Path, name: str, what: str) -> Path:
    """``directory / name`` when it is a regular file inside ``directory`` (no symbolic link, in or out); else
    :class:`FileRefused` naming it."""
    directory = Path(directory)
    path = directory / name
    if plain_file_name(name):
        raise FileRefused(f"{directory}: {what} {name!r} {plain_file_name(name)}")
    if path.is_symlink():
        raise FileRefused(f"{path} is a symbolic link ({what}): a model folder's files must be its own")
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: the {what} {path} is missing")
    if path.resolve().parent != directory.resolve():
        raise FileRefused(f"{path} lies outside {directory} ({what})")
    return path


def preprocess_record(value: dict) -> str | None:
    """A :class:`siclip.data.Preprocess` as ``to_dict`` writes it, with a size (the image encoder's input) in bounds."""
    from siclip.data.transforms import Preprocess

    try:
        preprocess = Preprocess.from_dict(value)
    except (TypeError, ValueError) as err:
        return f"is not a preprocessing ({str(err)[:160]})"
    if preprocess.size is None:
        return "has no size (the image encoder's input size)"
    sides = [s for s in (preprocess.size, preprocess.resize) if s is not None]
    if any(not 1 <= s <= MAX_IMAGE_SIDE for s in sides):
        return f"asks for {max(sides)} pixels a side (at most {MAX_IMAGE_SIDE})"
    if not all(math.isfinite(x) for x in (*preprocess.mean, *preprocess.std)):
        return "has a non-finite mean or std"
    return None


# A tokenizer described as data (siclip.data.tokenizer.tokenizer_spec); vocab_path is a file inside the folder.
TOKENIZER_FIELDS = {
    "name": Field(str, one_of("embedded", "clip", "words")),
    "context_length": Field(int, in_range(1, MAX_CONTEXT), required=False),
    "words": Field(list, list_of(str, MAX_WORDS), required=False),
    "vocab_path": Field(str, plain_file_name, required=False),
}


def or_none(check: Check) -> Check:
    """``check`` for a value that may also be null (nested checks stay nested)."""
    if getattr(check, "nested", False):

        def wrapped(value, name: str) -> str | None:
            return check(value, name) if value is not None else None

        wrapped.nested = True
        return wrapped
    return lambda v: check(v) if v is not None else None


def identifier(value: str) -> str | None:
    return None if value.isidentifier() else f"must be a Python class name, got {_short(value)}"


CODE_SUFFIXES = (".py", ".pyc", ".pyd", ".so")


def data_file_name(value: str) -> str | None:
    """A plain file name (:func:`plain_file_name`) of data, not code: a tokenizer's files hold none, so a Python file
    among them could only be there for an ``auto_map`` to import."""
    wrong = plain_file_name(value)
    if wrong is None and value.lower().endswith(CODE_SUFFIXES):
        wrong = f"names code ({_short(value)}); a tokenizer's files are data"
    return wrong


def file_contents(most_bytes: int, *, base64: bool = False) -> Check:
    """``{file name: content}``: plain names of data files (nothing outside the folder they are written to, no code),
    text (or base64 text), at most ``most_bytes`` in all."""
    import base64 as b64
    import binascii

    def check(files: dict) -> str | None:
        total = 0
        for name, content in files.items():
            wrong = data_file_name(name) if isinstance(name, str) else "is not a file name"
            if wrong:
                return f"file {_short(name)} {wrong}"
            if not isinstance(content, str):
                return f"holds {type(content).__name__} for {name}, not text"
            total += len(content)
            if total > most_bytes:
                return f"holds more than {most_bytes:,} bytes of files"
            if base64:
                try:
                    b64.b64decode(content, validate=True)
                except (binascii.Error, ValueError):
                    return f"holds {name} as something other than base64"
        return None

    return check


MAX_TOKENIZER_BYTES = 64 << 20
OPEN_CLIP_CLEAN = ("lower", "whitespace", "canonicalize")
OPEN_CLIP_REDUCTION = ("", "simple", "random", "shuffle")  # not "syntax": open_clip downloads NLTK data for it


def open_clip_tokenizer_kwargs(kwargs: dict) -> str | None:
    """The arguments of open_clip's ``SimpleTokenizer`` that a file may set: its cleaning, its reduction and extra
    special tokens; never ``bpe_path`` (a file read from anywhere) or a reduction that downloads."""
    allowed = {"clean": one_of(*OPEN_CLIP_CLEAN), "reduction_mask": one_of(*OPEN_CLIP_REDUCTION),
               "additional_special_tokens": lambda v: list_of(str, 1024)(v) if isinstance(v, list) else f"must be a list, got {_short(v)}"}  # fmt: skip
    for key, value in kwargs.items():
        if key not in allowed:
            return f"has {key!r}, not an argument siclip passes to open_clip's tokenizer ({sorted(allowed)})"
        wrong = allowed[key](value) if isinstance(value, (str, list)) else f"must be a string or list, got {_short(value)}"
        if wrong:
            return f"{key} {wrong}"
    return None


# A transformers tokenizer as a converted file holds it (HFTokenizer.spec): its saved files, as text or base64.
HF_TOKENIZER_FIELDS = {
    "name": Field(str, one_of("hf")),
    "class": Field(str, identifier, required=False),
    "context_length": Field((int, type(None)), or_none(in_range(1, MAX_CONTEXT)), required=False),
    "files": Field(dict, all_of(lambda v: None if v else "holds no files", file_contents(MAX_TOKENIZER_BYTES))),
    "binary_files": Field(dict, file_contents(MAX_TOKENIZER_BYTES, base64=True), required=False),
}
# The same in an exported directory: its files lie in the directory under these plain names.
HF_EXPORTED_TOKENIZER_FIELDS = {
    **HF_TOKENIZER_FIELDS,
    "files": Field(list, all_of(lambda v: None if v else "names no files", list_of(str, 64, data_file_name))),
}
del HF_EXPORTED_TOKENIZER_FIELDS["binary_files"]
# open_clip's CLIP BPE tokenizer (it ships with open_clip: no file).
OPEN_CLIP_TOKENIZER_FIELDS = {
    "name": Field(str, one_of("open_clip")),
    "tokenizer": Field(str, one_of("SimpleTokenizer")),
    "context_length": Field(int, in_range(1, MAX_CONTEXT)),
    "kwargs": Field(dict, open_clip_tokenizer_kwargs, required=False),
}
_SICLIP_TOKENIZERS = {name: TOKENIZER_FIELDS for name in ("embedded", "clip", "words")}
# By the spec's "name": the tokenizer of an exported directory, and of a converted file (another library's model).
EXPORTED_TOKENIZERS = {**_SICLIP_TOKENIZERS, "hf": HF_EXPORTED_TOKENIZER_FIELDS, "open_clip": OPEN_CLIP_TOKENIZER_FIELDS}
CONVERTED_TOKENIZERS = {"hf": HF_TOKENIZER_FIELDS, "open_clip": OPEN_CLIP_TOKENIZER_FIELDS}


def by_name(tables: dict[str, dict[str, Field]]) -> Check:
    """An object checked against the table its ``"name"`` picks (a tokenizer spec: siclip's, transformers', open_clip's)."""

    def check(value: dict, name: str) -> str | None:
        kind = value.get("name")
        if not isinstance(kind, str) or kind not in tables:
            return f"field {name + '.name'!r} must be {' or '.join(repr(k) for k in tables)}, got {_short(kind)}"
        return problem_of(value, tables[kind], name)

    check.nested = True
    return check


def finite_tensors(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """The first floating tensor holding NaN or Inf, as a problem; None when all are finite."""
    import torch

    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return f"holds NaN or Inf in {name}"
    return None
