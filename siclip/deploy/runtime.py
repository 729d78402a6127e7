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
others; :mod:`siclip.deploy.export`). Nothing in the manifest is executed: it is plain data,
checked field by field, and each file's SHA-256 is checked before a session opens it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from siclip.data.tokenizer import tokenizer_from_spec
from siclip.data.transforms import Preprocess
from siclip.errors import require
from siclip.models.loaded import LoadedClip

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


def read_manifest(directory: str | Path, *, check_files: bool = True) -> dict:
    """The manifest of an exported directory, every field checked (``ValueError`` naming the file and the field);
    with ``check_files``, each encoder file must exist with the size and SHA-256 the manifest records."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an exported model directory (no {MANIFEST}; experiments/export.py writes one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON manifest ({err})") from None

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise fail(f"format {found!r}, expected {FORMAT!r}")
    for key, kind, what in (("name", str, "a string"), ("embed_dim", int, "an integer"), ("logit_scale", (int, float), "a number"),
                            ("preprocess", dict, "an object"), ("tokenizer", dict, "an object"), ("precision", str, "a string")):  # fmt: skip
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise fail(f"field {key!r} must be {what}, got {manifest.get(key)!r}")
    if manifest["precision"] not in PRECISIONS:
        raise fail(f"precision {manifest['precision']!r}, expected one of {PRECISIONS}")
    if not math.isfinite(manifest["logit_scale"]):
        raise fail(f"logit_scale {manifest['logit_scale']} is not finite")
    try:
        preprocess = Preprocess.from_dict(manifest["preprocess"])
    except (TypeError, ValueError) as err:
        raise fail(f"preprocess: {err}") from None
    if preprocess.size is None:
        raise fail("preprocess has no size (the image encoder's input size)")
    for encoder in ENCODERS:
        entry = manifest.get(encoder)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("file", "input", "output", "sha256")):
            raise fail(f"{encoder!r} must name its file, input, output and sha256")
        file = directory / entry["file"]
        if Path(entry["file"]).name != entry["file"]:
            raise fail(f"{encoder} file {entry['file']!r} must be a plain file name in the directory")
        if check_files:
            if not file.is_file():
                raise FileNotFoundError(f"{path}: the {encoder} encoder {file} is missing")
            if file.stat().st_size != entry.get("bytes") or sha256(file) != entry["sha256"]:
                raise fail(f"{file} is not the file exported with this manifest (size or SHA-256 differs): export again")
    return manifest


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
    tokenizer = tokenizer_from_spec(manifest["tokenizer"], where=str(Path(directory) / MANIFEST))
    return LoadedClip(OnnxClip(directory, manifest, threads=threads), tokenizer, spec or str(directory), manifest["tokenizer"])
