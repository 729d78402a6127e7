"""An exported directory under ONNX Runtime, as a CLIP with siclip's interface (:mod:`siclip.interop`).

The directory holds ``image.onnx``, ``text.onnx`` and :data:`MANIFEST`, which says everything else inference needs::

    {"format": "siclip-onnx-1", "name", "embed_dim", "logit_scale" (s; logits = exp(s)·f_img·f_txtᵀ),
     "precision": "float32" | "int8", "preprocess": Preprocess.to_dict(), "tokenizer": tokenizer_spec(...),
     "image": {"file", "input", "output", "input_shape", "bytes", "sha256"}, "text": {...},
     "attention", "opset", "source", "check": {...}, "versions": {...}}

Each encoder maps its input, ``pixels`` ``(batch, 3, S, S)`` float32 in the model's view or ``ids`` ``(batch, L)``
int64, to unit-norm ``(batch, embed_dim)`` embeddings; the first axis is named ``batch`` in the files. An int8
directory whose manifest says ``"activation_ranges": "per_sample"`` is run one sample per call (dynamic quantisation
takes each activation's range over the whole call, so a batched call would make a sample's embedding depend on the
others; :mod:`siclip.deploy.export`). Nothing in the manifest is executed: it is plain data, checked field by field
against :data:`MANIFEST_FIELDS` (:mod:`siclip.schema`; bounded sizes, a finite and sane logit scale, the encoders'
fixed file names, files inside the directory and no symbolic links), each file's SHA-256 is checked before a session
opens it, and each session's inputs and outputs against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from siclip.data.tokenizer import tokenizer_from_spec
from siclip.data.transforms import Preprocess
from siclip.errors import require
from siclip.models.loaded import LoadedClip
from siclip.schema import (
    EXPORTED_TOKENIZERS, MAX_CONTEXT, Check, MAX_EMBED_DIM, MAX_LOGIT_SCALE, Field, FileRefused, by_name, check_fields, in_range, inside, list_of,
    nested, one_of, preprocess_record,
)  # fmt: skip

MANIFEST = "siclip_onnx.json"
FORMAT = "siclip-onnx-1"
ENCODERS = {"image": (torch.float32, np.float32), "text": (torch.int64, np.int64)}
PRECISIONS = ("float32", "int8")


def is_exported_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding :data:`MANIFEST`."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# The exported directory's files, by encoder: fixed names, so a manifest cannot swap or point elsewhere.
FILES = {"image": "image.onnx", "text": "text.onnx"}
OPSETS = (18, 23)  # the exporter writes opsets 18 (its lowest) to 23 (the Attention op); ONNX Runtime 1.23 runs them
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _encoder_fields(encoder: str) -> dict[str, Field]:
    rank = 4 if encoder == "image" else 2
    return {
        "file": Field(str, one_of(FILES[encoder])),
        "input": Field(str),
        "output": Field(str),
        "input_shape": Field(list, list_of((int, type(None)), rank, lambda n: in_range(1, MAX_CONTEXT)(n) if n is not None else None)),
        "bytes": Field(int, in_range(1, 1 << 40)),
        "sha256": Field(str, lambda v: None if _SHA256.match(v) else "must be 64 hexadecimal digits"),
    }


def _per_encoder(check: Check) -> Check:
    """``{"image": number, "text": number}``, each finite and passing ``check``."""

    def per_encoder(value: dict) -> str | None:
        for encoder, number in value.items():
            if encoder not in ENCODERS or isinstance(number, bool) or not isinstance(number, (int, float)):
                return f"must map image and text to numbers, got {encoder!r}: {number!r}"
            wrong = check(number)
            if wrong:
                return f"{encoder} {wrong}"
        return None

    return per_encoder


# What the export checked (siclip.deploy.export): a float32 directory's errors against PyTorch, an int8 one's cosines
# to the float32 embeddings, one sample per call; each under its bound.
CHECK_FIELDS = {
    "inputs": Field(str, lambda v: None if len(v) <= 1000 else "is longer than 1000 characters", required=False),
    "max_relative_error": Field(dict, _per_encoder(in_range(0, 1e30)), required=False),
    "min_cosine_to_float32": Field(dict, _per_encoder(in_range(-1.0, 1.0 + 1e-6)), required=False),
    "bound": Field((int, float), in_range(0, 1), required=False),
    "calls": Field(str, one_of("one sample per call"), required=False),
}

# siclip_onnx.json, field by field (siclip.schema); a new field is one more line.
MANIFEST_FIELDS = {
    "format": Field(str, one_of(FORMAT)),
    "name": Field(str, lambda v: None if len(v) <= 300 else "is longer than 300 characters"),
    "embed_dim": Field(int, in_range(1, MAX_EMBED_DIM)),
    "logit_scale": Field((int, float), in_range(-MAX_LOGIT_SCALE, MAX_LOGIT_SCALE)),
    "precision": Field(str, one_of(*PRECISIONS)),
    "preprocess": Field(dict, preprocess_record),
    "tokenizer": Field(dict, by_name(EXPORTED_TOKENIZERS)),  # siclip's, transformers' (its files in the directory), open_clip's
    "image": Field(dict, nested(_encoder_fields("image"))),
    "text": Field(dict, nested(_encoder_fields("text"))),
    "attention": Field(str, required=False),
    "opset": Field(int, in_range(*OPSETS), required=False),
    "source": Field(str, required=False),
    "check": Field(dict, nested(CHECK_FIELDS), required=False),
    "quantization": Field(str, lambda v: None if len(v) <= 300 else "is longer than 300 characters", required=False),
    "activation_ranges": Field(str, one_of("per_sample"), required=False),  # int8: run one sample per call
    "versions": Field(dict, required=False),
}


def read_manifest(directory: str | Path, *, check_files: bool = True) -> dict:
    """The manifest of an exported directory, every field checked against :data:`MANIFEST_FIELDS` and against each
    other (input shapes, preprocessing, context length), every file it names a regular file inside the directory
    (no symbolic link): :class:`~siclip.schema.FileRefused` naming the file and the field. With ``check_files``,
    each encoder file must have the size and SHA-256 the manifest records."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an exported model directory (no {MANIFEST}; siclip export writes one)")
    inside(directory, MANIFEST, "manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise FileRefused(f"{path}: {path.stat().st_size:,} bytes, not a manifest (at most {MAX_MANIFEST_BYTES:,})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FileRefused(f"{path}: not a readable JSON manifest ({err})") from None
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise FileRefused(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    check_fields(manifest, MANIFEST_FIELDS, str(path))
    size = manifest["preprocess"]["size"]
    context = manifest["tokenizer"].get("context_length")
    shapes = {"image": [None, 3, size, size], "text": [None, context or manifest["text"]["input_shape"][1]]}
    for encoder, shape in shapes.items():
        if manifest[encoder]["input_shape"] != shape:
            raise FileRefused(f"{path}: {encoder}.input_shape {manifest[encoder]['input_shape']} does not match the preprocessing and "
                              f"tokenizer it records ({shape})")  # fmt: skip
    for name in tokenizer_files(manifest["tokenizer"]):
        if name in (MANIFEST, *FILES.values()):
            raise FileRefused(f"{path}: the tokenizer names {name}, a file of the export itself")
        inside(directory, name, "tokenizer file")
    for encoder in ENCODERS:
        entry = manifest[encoder]
        file = inside(directory, entry["file"], f"{encoder} encoder") if check_files else directory / entry["file"]
        if check_files and (file.stat().st_size != entry["bytes"] or sha256(file) != entry["sha256"]):
            raise FileRefused(f"{file} is not the file exported with this manifest (size or SHA-256 differs): export again")
    return manifest


def tokenizer_files(spec: dict) -> list[str]:
    """The files of an exported directory its tokenizer spec names (plain names inside it): a vocabulary, or a
    transformers tokenizer's saved files."""
    if spec.get("name") == "hf":
        return list(spec.get("files", []))
    vocab = spec.get("vocab_path")
    return [vocab] if isinstance(vocab, str) else []


def tokenizer_of(directory: str | Path, manifest: dict):
    """The tokenizer the manifest describes, the files it names read from inside the directory (a transformers
    tokenizer's files handed over as its spec holds them: text, or base64 for a binary one)."""
    import base64

    directory, spec = Path(directory), dict(manifest["tokenizer"])
    if spec.get("name") == "hf":
        files, binary = {}, {}
        for name in tokenizer_files(spec):
            data = inside(directory, name, "tokenizer file").read_bytes()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                binary[name] = base64.b64encode(data).decode("ascii")
        spec.update(files=files, binary_files=binary)
    elif spec.get("vocab_path") is not None:
        spec["vocab_path"] = str(inside(directory, spec["vocab_path"], "tokenizer vocabulary"))
    return tokenizer_from_spec(spec, where=str(directory / MANIFEST))


def check_session(session, encoder: str, manifest: dict, path: Path) -> None:
    """The ONNX graph takes what the manifest says (one input of its rank and type) and gives ``(batch, embed_dim)``."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = {"image": ("tensor(float)", 4), "text": ("tensor(int64)", 2)}[encoder]
    if len(inputs) != 1 or (inputs[0].type, len(inputs[0].shape)) != want or len(outputs) < 1:
        got = [(i.name, i.type, i.shape) for i in inputs]
        raise FileRefused(f"{path}: the {encoder} encoder takes {got}, not one {want[0]} input of rank {want[1]}: the manifest names the "
                          "wrong file")  # fmt: skip
    dim = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(dim, int) and dim != manifest["embed_dim"]:
        raise FileRefused(f"{path}: the {encoder} encoder gives {dim}-wide embeddings, the manifest says embed_dim {manifest['embed_dim']}")


def create_session(path: str | Path, *, threads: int | None = None, sequential: bool = True):
    """An ONNX Runtime CPU session for ``path``: ``threads`` intra-op threads (ONNX Runtime's default, one per
    core, when None), one inter-op thread, nodes run in order (``sequential``), every graph optimisation on."""
    ort = require("onnxruntime", "onnxruntime", "running an exported model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    options.log_severity_level = 4  # fatal only: its notes are not the user's business, and its errors raise (and are reported)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for a truncated or foreign file
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None


def run_session(session, array: np.ndarray) -> np.ndarray:
    """The first output of ``session`` on its one input."""
    return session.run(None, {session.get_inputs()[0].name: array})[0]


class OnnxClip(nn.Module):
    """The two ONNX encoders of an exported directory with siclip's CLIP interface.

    ``encode_image(pixels)`` and ``encode_text(ids)`` take tensors on any device, run on the CPU under ONNX Runtime
    and return float32 embeddings on the input's device. The module holds one float32 buffer and no parameters:
    code that reads a model's device and dtype from its tensors (``siclip.eval``) sends float32 images."""

    def __init__(self, directory: str | Path, manifest: dict | None = None, *, threads: int | None = None) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory) if manifest is None else manifest
        m = self.manifest
        self.sessions = {e: create_session(self.directory / m[e]["file"], threads=threads) for e in ENCODERS}
        for encoder, session in self.sessions.items():
            check_session(session, encoder, m, self.directory / m[encoder]["file"])
        self.preprocess = Preprocess.from_dict(m["preprocess"])
        self.embed_dim = int(m["embed_dim"])
        self.per_sample = m.get("activation_ranges") == "per_sample"  # int8: each sample its own activation ranges
        self.name = f"{m['name']} (ONNX{'' if m['precision'] == 'float32' else ' ' + m['precision']})"
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float32), persistent=False)

    def _run(self, encoder: str, inputs: Tensor) -> Tensor:
        torch_dtype, numpy_dtype = ENCODERS[encoder]
        array = inputs.detach().to("cpu", torch_dtype).numpy().astype(numpy_dtype, copy=False)
        session = self.sessions[encoder]
        if self.per_sample:
            out = np.concatenate([run_session(session, array[i : i + 1]) for i in range(len(array))])
        else:
            out = run_session(session, array)
        return torch.from_numpy(out).to(inputs.device)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self._run("image", pixels)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self._run("text", ids)

    def scale(self) -> Tensor:
        return torch.tensor(math.exp(self.manifest["logit_scale"]))

    def extra_repr(self) -> str:
        return f"directory={str(self.directory)!r}, precision={self.manifest['precision']!r}"


def load_exported(directory: str | Path, *, spec: str | None = None, threads: int | None = None):
    """``LoadedClip`` of an exported directory: :class:`OnnxClip` with the tokenizer its manifest describes, running
    on ``threads`` intra-op threads (default: as many as PyTorch uses, ``torch.get_num_threads()``, which follows
    ``OMP_NUM_THREADS``: one setting for both runtimes)."""
    threads = torch.get_num_threads() if threads is None else threads
    manifest = read_manifest(directory)
    tokenizer = tokenizer_of(directory, manifest)
    return LoadedClip(OnnxClip(directory, manifest, threads=threads), tokenizer, spec or str(directory), manifest["tokenizer"])
