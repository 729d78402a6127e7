"""No code from a model folder, nothing fetched, nothing absurd allocated: what every foreign load checks first.

A model spec, a converted file's architecture record or a model-config JSON is data someone handed over. Before any
foreign library reads it, these checks refuse, in one line naming the file and the field, whatever would

| make the library run code | ``auto_map`` / ``custom_pipelines`` in any of the folder's JSON files (transformers would import the folder's own Python, after one ``y`` on stdin); a ``model_type`` transformers does not know |
| make the library fetch | a hub name where a folder or a registered name belongs (``hf-hub:…``, ``org/name``); an attention implementation other than ``eager``/``sdpa`` (``kernels-community/…`` is a hub kernel); open_clip's ``hf_model_name``/``hf_tokenizer_name`` (a transformers tower from the hub); timm's ``pretrained``, ``pretrained_cfg``, ``checkpoint_path`` |
| allocate without bound | an integer field above :data:`MAX_FIELD` or an image side above :data:`MAX_IMAGE_SIDE`; an architecture whose parameters and buffers, counted on PyTorch's ``meta`` device (no memory), exceed :data:`MAX_PARAMETERS` |
| fail deep inside with a traceback | a damaged safetensors file (its header is read and checked against the file's size), a pickled ``pytorch_model.bin`` (read weights-only, :func:`siclip.storage.load_weights`), saved weights whose shapes differ from the config's |

The libraries are also told, on every call, the same thing: ``trust_remote_code=False`` and ``local_files_only=True``
(transformers), ``pretrained=False`` (timm, open_clip). This module imports no foreign library.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from siclip.storage import CheckpointError, load_weights

MAX_PARAMETERS = 4_000_000_000  # ViT-bigG's CLIP has 2.5 B; 4 B float32 weights are 16 GB
MAX_FIELD = 1 << 20  # any integer of a model config (a vocabulary of a million tokens passes)
MAX_IMAGE_SIDE = 8192
MAX_JSON_BYTES = 64 << 20
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
CODE_KEYS = ("auto_map", "custom_pipelines")
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
IMAGE_SIDE_KEYS = ("image_size", "img_size", "image_resolution")
# The JSON files of a transformers folder that its loaders read (and that could name code).
FOLDER_JSON = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
               "special_tokens_map.json", "image_processor_config.json")  # fmt: skip
# One of these makes a tokenizer a transformers folder can load without fetching.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",), ("sentencepiece.bpe.model",),
                   ("tokenizer.model",))  # fmt: skip
_HUB = re.compile(r"^(hf-hub:|hf_hub:|hf:|timm/|https?://)|^[\w.-]+/[\w.-]+$")


class UnsafeModel(ValueError):
    """A model spec or record that would run code, fetch, or allocate beyond the bounds: refused, named (status 2)."""

    exit_status = 2


def looks_like_hub_name(text: str) -> bool:
    """``hf-hub:org/name``, ``org/name`` (when no such path exists here), a URL: names a library would fetch."""
    return bool(_HUB.search(text)) and not Path(text).exists()


def check_attention(value: Any, where: str) -> None:
    """An attention implementation a library runs from its own code: eager or sdpa (None: the library's default, sdpa)."""
    if value is not None and value not in ATTENTION_IMPLEMENTATIONS:
        fetched = " (a kernel from the Hugging Face hub, which siclip never fetches)" if isinstance(value, str) and "/" in value else ""
        raise UnsafeModel(f"{where}: attention implementation {value!r}{fetched}; siclip runs {' or '.join(ATTENTION_IMPLEMENTATIONS)}")


def scan_record(record: Any, where: str, *, bounded: bool = True, depth: int = 0, key_path: str = "") -> None:
    """Walk a config record (dicts, lists, plain values): no key naming code, attention implementations that
    run locally, and with ``bounded`` (a model's configuration, not a tokenizer's) integers within
    :data:`MAX_FIELD` (image sides within :data:`MAX_IMAGE_SIDE`)."""
    if depth > 32:
        raise UnsafeModel(f"{where}: nested deeper than 32 levels at {key_path}")
    if isinstance(record, dict):
        for key, value in record.items():
            name = f"{key_path}.{key}" if key_path else str(key)
            if key in CODE_KEYS and value:
                raise UnsafeModel(f"{where}: {name} names Python code of its own ({_short(value)}); siclip never runs code from a model "
                                  "folder or file: save the model with a class transformers ships")  # fmt: skip
            if key in ATTENTION_KEYS:
                check_attention(value, f"{where}: {name}")
                continue
            if bounded and isinstance(value, int) and not isinstance(value, bool):
                bound = MAX_IMAGE_SIDE if key in IMAGE_SIDE_KEYS else MAX_FIELD
                if not -bound <= value <= bound:
                    raise UnsafeModel(f"{where}: {name} = {value} is beyond any model siclip builds (at most {bound:,}); refused before "
                                      "allocating anything")  # fmt: skip
            if isinstance(value, float) and value != value:
                raise UnsafeModel(f"{where}: {name} is NaN")
            scan_record(value, where, bounded=bounded, depth=depth + 1, key_path=name)
    elif isinstance(record, (list, tuple)):
        for i, value in enumerate(record):
            scan_record(value, where, bounded=bounded, depth=depth + 1, key_path=f"{key_path}[{i}]")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def read_json(path: Path, where: str) -> Any:
    """A JSON file of a model folder or a config, bounded in size; ``ValueError`` naming it otherwise."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UnsafeModel(f"{where}: {path} is {size:,} bytes, not a model configuration (at most {MAX_JSON_BYTES:,})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{where}: {path} is not readable JSON ({type(err).__name__}: {str(err)[:160]})") from None


def check_model_folder(directory: str | Path, spec: str, *, known_types: Iterable[str], tokenizer: bool = True, weights: bool = True) -> dict:
    """The ``config.json`` of a transformers folder, after every check above (module docstring): no code named in
    its JSON files, a ``model_type`` among ``known_types``, bounded fields, with ``tokenizer`` its tokenizer
    files, with ``weights`` a readable weights file. Raises ``FileNotFoundError``/``ValueError`` naming the file."""
    path = Path(directory)
    if not path.is_dir():
        hub = " (siclip reads local folders only and downloads nothing)" if looks_like_hub_name(str(directory)) else ""
        raise FileNotFoundError(f"{spec}: directory {directory} not found{hub}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: {path} is not a transformers model directory (no config.json)")
    config = None
    for name in FOLDER_JSON:
        file = path / name
        if file.is_file():
            record = read_json(file, spec)
            if name == "config.json":
                if not isinstance(record, dict):
                    raise ValueError(f"{spec}: {file} holds a {type(record).__name__}, not a model configuration")
                config = record
            scan_record(record, f"{spec}: {name}", bounded=name == "config.json")
    model_type = config.get("model_type")
    known = set(known_types)
    if model_type not in known:
        raise UnsafeModel(f"{spec}: config.json has model_type {model_type!r}, which transformers does not ship; siclip never runs "
                          "code from a model folder")  # fmt: skip
    if tokenizer and not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise FileNotFoundError(f"{spec}: no tokenizer files in {path} (tokenizer.json, or vocab.json and merges.txt, …): the model's "
                                "tokenizer is needed to read captions; save it beside the model (tokenizer.save_pretrained(DIR))")  # fmt: skip
    if weights:
        weight_shapes(path, spec)
    return config


# ── weights files ────────────────────────────────────────────────────────────────────────────────────────────────


def safetensors_shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a safetensors file's header, after checking that the header is JSON and that its
    tensors' byte ranges lie inside the file and cover its data exactly (what the library checks, said in one line)."""
    size = path.stat().st_size

    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {path} ({size:,} bytes) is not a readable safetensors file ({problem}): it was truncated or "
                               "overwritten; save the model again")  # fmt: skip

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise damaged(f"its header claims {length:,} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(f"its header is not JSON: {str(err)[:80]}") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    data, ends, shapes = size - 8 - length, [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(n) for n in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise damaged(f"tensor {name!r} has no valid shape and data_offsets") from None
        if not 0 <= start <= end <= data or any(n < 0 for n in shape):
            raise damaged(f"tensor {name!r} lies outside the file's {data:,} data bytes")
        ends.append(end)
        shapes[name] = shape
    if max(ends, default=0) != data:
        raise damaged(f"its tensors cover {max(ends, default=0):,} of {data:,} data bytes")
    return shapes


def weight_shapes(directory: Path, spec: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the weights a transformers folder holds (safetensors, sharded or not, else
    ``pytorch_model.bin`` read weights-only); every file checked (module docstring)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        record = read_json(index, spec)
        files = sorted(set(record.get("weight_map", {}).values())) if isinstance(record, dict) else []
        if not files or not all(isinstance(f, str) and Path(f).name == f for f in files):
            raise ValueError(f"{spec}: {index} must map weights to file names in {directory}")
        shapes = {}
        for name in files:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{spec}: {index} names {name}, which is not in {directory}")
            shapes |= safetensors_shapes(directory / name, spec)
        return shapes
    if (directory / "model.safetensors").is_file():
        return safetensors_shapes(directory / "model.safetensors", spec)
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        state = load_weights(binary, what=f"{spec}: weights file", hint="save the model with save_pretrained (safetensors)", mmap=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{spec}: {binary} holds a {type(state).__name__}, not a state dict")
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise FileNotFoundError(f"{spec}: no weights in {directory} (model.safetensors or pytorch_model.bin): save the model with save_pretrained")


def check_shapes(model: nn.Module, saved: dict[str, tuple[int, ...]], where: str) -> None:
    """Every saved tensor the model has must have the model's shape (the config and the weights agree)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [(k, saved[k], expected[k]) for k in saved if k in expected and tuple(saved[k]) != expected[k]]
    if wrong:
        name, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"{where}: the saved weights do not fit the configuration: {name} is {list(got)} in the weights file but "
                         f"{list(want)} in the model its configuration describes{more}")  # fmt: skip


# ── architectures: counted before they are built ─────────────────────────────────────────────────────────────────


def build_on_meta(build: Callable[[], nn.Module], where: str) -> nn.Module:
    """``build()`` on PyTorch's meta device (shapes only, no memory), refused when its parameters and buffers exceed
    :data:`MAX_PARAMETERS`; a constructor that rejects the record is the record's problem (``ValueError``)."""
    try:
        with torch.device("meta"):
            model = build()
    except (UnsafeModel, ImportError):
        raise
    except Exception as err:  # noqa: BLE001 - a foreign constructor rejects a bad record with whatever it raises
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{where}: the architecture it describes cannot be built ({type(err).__name__}: {first})") from None
    count = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    if count > MAX_PARAMETERS:
        raise UnsafeModel(f"{where}: the architecture it describes holds {count:,} parameters and buffers ({4 * count / 2**30:,.0f} GiB in "
                          f"float32), beyond any CLIP (at most {MAX_PARAMETERS:,}); refused before allocating it")  # fmt: skip
    return model


def foreign_failure(where: str, err: BaseException) -> ValueError:
    """A foreign library's error while loading the user's files, as one line naming ``where``."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:240]
    return ValueError(f"{where}: cannot be loaded ({type(err).__name__}: {first})")
