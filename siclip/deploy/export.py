"""A siclip CLIP's two encoders as ONNX files, checked under ONNX Runtime against PyTorch.

**The exporter.** ``torch.export`` (non-strict) records each encoder of the reparameterised model with a symbolic
batch axis, and ``torch.onnx.export(dynamo=True)`` translates the program with onnxscript into one self-contained
file (weights inside, under 2 GB). With torch 2.13 this is the exporter that works: the TorchScript exporter
(``dynamo=False``, deprecated) also writes a file, but it runs Python once on the example batch and bakes every
branch on the batch size into the graph (the cache-sized chunks of the CPU attention path, which operand a
product scales), so its graph is right only at the batch it was traced with; the dynamo exporter refuses such a
branch instead of baking it. Weights used twice (blocks that share them) are one parameter in the program and
one initializer in the file.

**The attention it traces** is named, never inferred (:func:`siclip.blocks.backends.traced_attention`): every
attention block runs ``attention`` over the whole batch whatever backend it was built with, so no Triton custom
op, no xformers call and no batch-sized chunk reaches the graph:

- ``"sdpa"`` (default): PyTorch's ``scaled_dot_product_attention``, which opset 23 writes as ONNX's ``Attention``
  op (ONNX Runtime ≥ 1.23 runs it; opsets before 23 get MatMul/Softmax). Shaped attention adds its
  α·V − γ·C·V terms around it (C·V a mean over the visible keys).
- ``"math"``: the explicit products the CPU path of PyTorch runs: P = softmax(QKᵀ/√d + M), then shaped
  attention's whole matrix A = β·P + α·I − γ·C and one product A·V.

**The check.** The encoders run under ONNX Runtime and under PyTorch (eager, the model as it runs) on real
images (scikit-learn's two sample photographs, in the model's own view) and real captions (through its tokenizer),
batched and one at a time. The error of an output ``o`` against PyTorch's ``p``, rows ``r``, is

    err = max_r ‖o_r − p_r‖_∞ / ‖p_r‖_∞

and every encoder must stay within :data:`MAX_RELATIVE_ERROR` (float32), or the export fails naming the output.

**Where it goes** (:func:`siclip.storage.check_output`, before any work): a new or empty directory, or an earlier
export holding nothing but what an export writes; any other directory only with ``overwrite``; never one of the
model's own files or a folder holding them, the folder you are in, or a device. The directory is built under a
hidden sibling name and put in place atomically once every check passed (:func:`siclip.storage.building_directory`):
a kill at any instant leaves one complete export at ``out``. The tokenizer's files are stored in it under plain names
(a vocabulary file copied in; a transformers tokenizer's saved files written out; open_clip's BPE ships with
open_clip), so the directory needs nothing outside itself. The manifest records the opset the files hold.

**int8** (``quantize="int8"``): ONNX Runtime's dynamic quantisation (int8 weights; each activation quantised with the
range it has on that call) of the checked float32 files, written as ``int8/``, an exported directory of its own.

*Batch dependence.* A dynamically quantised activation's range is taken over the whole tensor of a call, so with
several samples in a batch one sample's int8 embedding depends on the others: on the digits model (siclip_tiny, 32
px, six epochs on scikit-learn's scans from the command line) an embedding entry moves by up to 0.07 between a batch
of 50 digits and one digit at a time, and a batch mixing the 100 digits with two photographs drops the digits' mean
cosine to float32 from 0.97 to 0.46. Metrics would change with the evaluation's chunk size. siclip therefore runs an
int8 encoder **one sample per call** (per-sample activation ranges: the manifest's ``"activation_ranges":
"per_sample"``, which :class:`siclip.deploy.runtime.OnnxClip` honours) and checks it the same way. A caller running
the file with ONNX Runtime directly gets per-batch ranges unless it does the same.

*Its bound.* Every int8 embedding of the check's inputs, one sample per call, must have a cosine of at least
:data:`MIN_INT8_COSINE` = 0.7 to the float32 file's, or the export fails naming the encoder. Measured, smallest cosine
per sample: random siclip_tiny, transformers, open_clip and converted CLIPs ≥ 0.99 (images and text); the digits
model's text 0.9998, its images 0.92 on its own digits and **0.787** on the check's two photographs (far from its
scans); the same model with its first convolution quantised too (zero-shot at chance) **0.59** on the photographs and
0.16 on average on its digits. 0.7 passes every sound export measured and refuses that broken one; the check's
default images are photographs, so a model for another domain sits lower than on its own data (pass ``images=`` to
check on those).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from siclip.blocks.backends import TRACEABLE, traced_attention
from siclip.data.tokenizer import tokenizer_spec
from siclip.data.transforms import preprocess_image
from siclip.models import CLIP, reparameterize_model

from siclip.errors import require
from siclip.schema import plain_file_name
from siclip.storage import building_directory, check_output, write_text_atomic

from .runtime import ENCODERS, FILES, FORMAT, MANIFEST, OPSETS, create_session, is_exported_dir, run_session, sha256, tokenizer_files

ATTENTION_KERNELS = TRACEABLE
DEFAULT_ATTENTION = "sdpa"
DEFAULT_OPSET = 23  # the first with an Attention op
MAX_RELATIVE_ERROR = 1e-4
MIN_INT8_COSINE = 0.7  # the int8 check's bound, per sample (module docstring: measured, and why)
QUANTIZATIONS = ("int8",)
# What dynamic quantisation rewrites. Not "Attention": its int8 form is ONNX Runtime's own QAttention, which reads
# the contrib Attention's inputs, not opset 23's (the quantiser would write an invalid graph).
INT8_OPS = ("MatMul", "Conv", "Gather")
BATCH_AXIS = "batch"  # the name of every encoder's dynamic first axis, inputs and outputs
NAMES = {"image": ("pixel_values", "image_embeds"), "text": ("input_ids", "text_embeds")}  # as transformers names them
SAMPLE_IMAGES = ("china.jpg", "flower.jpg")  # scikit-learn's sample photographs (427 × 640)
# Real captions of the kinds a CLIP reads: photographs, scans, scenes; some name what the sample images show.
SAMPLE_CAPTIONS = (
    "a photo of a chinese temple on a hill",
    "a pink flower with yellow stamens",
    "a handwritten digit seven",
    "two dogs playing in the snow",
    "a red car parked on a city street at night",
)


class ExportCheckError(ValueError):
    """ONNX Runtime's outputs do not match PyTorch's (or the runtime cannot run the file)."""


class Encoder(nn.Module):
    """One encoder of a CLIP as a module of its own: ``image`` maps pixels ``(batch, 3, S, S)``, ``text`` token ids
    ``(batch, L)``, to unit-norm ``(batch, D)`` embeddings (the model's ``encode_image`` / ``encode_text``; any CLIP
    with siclip's interface, :mod:`siclip.interop`)."""

    def __init__(self, model: nn.Module, encoder: str) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {list(ENCODERS)}, got {encoder!r}")
        self.model, self.encoder = model, encoder

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model.encode_image(inputs) if self.encoder == "image" else self.model.encode_text(inputs)


def sample_images() -> list[np.ndarray]:
    """scikit-learn's two sample photographs, ``(427, 640, 3)`` uint8 each."""
    load_sample_image = require("sklearn.datasets", "scikit-learn", "the export check (on scikit-learn's sample images)").load_sample_image
    return [load_sample_image(name) for name in SAMPLE_IMAGES]


def sample_captions() -> list[str]:
    return list(SAMPLE_CAPTIONS)


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max_r ‖o_r − p_r‖_∞ / ‖p_r‖_∞ over the rows ``r`` of two ``(batch, dim)`` outputs (rows of zeros count
    their absolute error)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ExportCheckError(f"output shape {ours.shape}, PyTorch's {reference.shape}")
    scale = np.abs(reference).max(axis=-1)
    return float((np.abs(ours - reference).max(axis=-1) / np.where(scale > 0, scale, 1.0)).max())


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines and its notes on optional libraries (torchvision's ops) kept off the user's
    terminal; its errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)  # pytree's deprecation notes, raised inside torch.export
            yield
    finally:
        registration.setLevel(level)


def export_encoder(module: nn.Module, example: Tensor, path: str | Path, *, attention: str = DEFAULT_ATTENTION,
                   opset: int = DEFAULT_OPSET, input_name: str = "input", output_name: str = "output") -> Path:  # fmt: skip
    """Write ``module`` (in eval mode, one tensor in, one out) as one ONNX file whose first axis is dynamic,
    tracing the attention kernel ``attention`` (one of :data:`ATTENTION_KERNELS`) on ``example``."""
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    if module.training:
        raise ValueError("export a module in eval mode (module.eval()): BatchNorm would normalise by batch statistics")
    onnxscript = require("onnxscript", "onnxscript", "exporting to ONNX")
    require("onnx", "onnx", "exporting to ONNX")
    path = Path(path)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), traced_attention(attention), _quiet_exporter():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[input_name], output_names=[output_name], optimize=True)  # fmt: skip
        # Every expression of weights alone becomes the weight it computes, whatever its size (a transposed W, β_FF·W,
        # α·I − γ·C): the file holds what runs, once per expression, so weights used twice stay one initializer, and
        # int8 quantisation, which rewrites products with a weight initializer, sees every weight.
        onnxscript.optimizer.optimize(onnx_program.model, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize)
        onnx_program.save(str(path), external_data=False)
    _name_batch_axis(path)
    return path


def _name_batch_axis(path: Path, name: str = BATCH_AXIS) -> None:
    """Rename the exporter's symbol for the first input's first axis (``s85``…) to ``name`` everywhere in the graph
    (inputs, outputs, intermediate shapes, expressions such as ``16*s85``), so the file says what the axis is."""
    import re

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol or symbol == name:
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(name, dim.dim_param)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


@dataclass
class ExportedFiles:
    """Where an export went: the float32 directory, its manifest, and the int8 directory when asked for."""

    directory: Path
    manifest: dict
    int8: Path | None = None
    int8_manifest: dict | None = None


def _inputs(model: CLIP, tokenizer, images: Sequence[np.ndarray] | None, captions: Sequence[str] | None) -> dict[str, Tensor]:
    """The check's batches: the images in the model's own view, the captions through its tokenizer."""
    images = sample_images() if images is None else list(images)
    captions = sample_captions() if captions is None else list(captions)
    if len(images) < 2 or len(captions) < 2:
        raise ValueError("the export check needs at least two images and two captions (a batch, and each alone)")
    pixels = torch.stack([preprocess_image(image, model.preprocess) for image in images])
    ids = tokenizer(captions).long()
    return {"image": pixels, "text": ids}


def _check(session, module: nn.Module, inputs: Tensor, encoder: str, file: Path) -> float:
    """The largest relative error of ``session`` against ``module`` over the batch and each of its first two rows;
    errors name ``file``, where the encoder would have been written."""
    worst = 0.0
    for rows in (slice(None), slice(0, 1), slice(1, 2)):
        batch = inputs[rows]
        with torch.inference_mode():
            reference = module(batch).float().numpy()
        try:
            ours = run_session(session, batch.numpy())
        except Exception as err:
            raise ExportCheckError(f"{file}: ONNX Runtime cannot run the {encoder} encoder on a batch of {len(batch)} "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None  # fmt: skip
        error = max_relative_error(ours, reference)
        if not error <= MAX_RELATIVE_ERROR:  # a NaN fails too
            raise ExportCheckError(f"{file}: ONNX Runtime's {encoder} embeddings differ from PyTorch's by a max relative error of "
                                   f"{error:.3g} (> {MAX_RELATIVE_ERROR:g}) on a batch of {len(batch)}")  # fmt: skip
        worst = max(worst, error)
    return worst


def run_per_sample(session, array: np.ndarray) -> np.ndarray:
    """``session``'s first output on each row of ``array`` alone, stacked: per-sample activation ranges for a dynamically
    quantised graph (the module docstring)."""
    return np.concatenate([run_session(session, array[i : i + 1]) for i in range(len(array))])


def _cosines(session, reference: np.ndarray, inputs: Tensor) -> float:
    """The smallest cosine between ``session``'s embeddings of ``inputs``, one sample per call, and ``reference``
    (unit-norm rows)."""
    ours = run_per_sample(session, inputs.numpy()).astype(np.float64)
    ours /= np.linalg.norm(ours, axis=-1, keepdims=True)
    return float((ours * reference).sum(-1).min())


def _versions() -> dict:
    onnx = require("onnx", "onnx", "exporting to ONNX")
    onnxruntime = require("onnxruntime", "onnxruntime", "checking an export")

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def _file_entry(directory: Path, encoder: str, input_shape: list) -> dict:
    file = directory / FILES[encoder]
    return {"file": FILES[encoder], "input": NAMES[encoder][0], "output": NAMES[encoder][1], "input_shape": input_shape,
            "bytes": file.stat().st_size, "sha256": sha256(file)}  # fmt: skip


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantisation of ``source`` into ``target``: int8 weights (per tensor, symmetric) for
    its MatMul, Conv and Gather (embedding) nodes (:data:`INT8_OPS`), activations quantised per call, except the
    products that read the graph's input: the image encoder's first convolution, on the pixels, stays float32 (432
    weights in MCi's stem; quantised, it took the digits model's zero-shot top-1 from 70 % to chance)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    first = [n.name for n in graph.node if n.op_type in ("Conv", "MatMul") and graph.input[0].name in n.input]
    with _quiet_exporter():
        logging.disable(logging.WARNING)  # its notes about shape inference on a model it preprocesses itself
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS), nodes_to_exclude=first)
        finally:
            logging.disable(logging.NOTSET)


def written_by_export(directory: Path) -> bool:
    """Whether ``directory`` is an earlier export holding nothing but what an export writes (the encoders, the
    manifest, the tokenizer files it names, ``int8/`` of the same): what a new export replaces without ``overwrite``."""
    if not is_exported_dir(directory):
        return False

    def only_ours(folder: Path) -> bool:
        try:
            tokenizer = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("tokenizer", {})
            allowed = {MANIFEST, *FILES.values(), *tokenizer_files(tokenizer)}
        except (OSError, ValueError, AttributeError, TypeError):
            return False
        return all(p.name in allowed and p.is_file() and not p.is_symlink() for p in folder.iterdir() if p.name != "int8")

    int8 = directory / "int8"
    if int8.exists() and not (int8.is_dir() and not int8.is_symlink() and is_exported_dir(int8) and only_ours(int8)):
        return False
    return only_ours(directory)


def check_opset(opset: int) -> int:
    """An opset the exporter writes and ONNX Runtime runs (:data:`~siclip.deploy.runtime.OPSETS`), else ``ValueError``."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset {opset!r} is outside the range exported and run here ({OPSETS[0]} to {OPSETS[1]}; {DEFAULT_OPSET} has the Attention op)")
    return opset


def file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares (what the exporter wrote, whatever was asked)."""
    onnx = require("onnx", "onnx", "reading an ONNX file's opset")

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _store_tokenizer(spec: dict, folder: Path) -> dict:
    """``spec`` as an exported directory holds it, its files inside ``folder`` under plain names: a vocabulary file it
    names copied in; a transformers tokenizer's files (text, or base64 for a binary one) written out and listed by
    name (``files``); open_clip's BPE ships with open_clip, so its spec is data alone."""
    reserved = (MANIFEST, *FILES.values(), "int8")
    if spec.get("name") == "hf":
        contents = {**{n: t.encode("utf-8") for n, t in spec["files"].items()},
                    **{n: base64.b64decode(b) for n, b in spec.get("binary_files", {}).items()}}  # fmt: skip
        clash = next((n for n in contents if plain_file_name(n) or n in reserved), None)
        if clash is not None:
            raise ValueError(f"the tokenizer's file {clash!r} cannot be stored in an exported directory (a name of its own files, or not plain)")
        for name, data in contents.items():
            (folder / name).write_bytes(data)
        return {**{k: v for k, v in spec.items() if k not in ("files", "binary_files")}, "files": sorted(contents)}
    if spec.get("vocab_path") is None:
        return spec
    source = Path(spec["vocab_path"])
    name = source.name if not plain_file_name(source.name) and source.name not in reserved else "vocab" + "".join(source.suffixes)
    shutil.copyfile(source, folder / name)
    return {**spec, "vocab_path": name}


def export_clip(model: CLIP, tokenizer, out_dir: str | Path, *, attention: str = DEFAULT_ATTENTION, opset: int = DEFAULT_OPSET,
                quantize: str | None = None, source: str = "", images: Sequence[np.ndarray] | None = None,
                captions: Sequence[str] | None = None, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> ExportedFiles:  # fmt: skip
    """Export ``model``'s reparameterised encoders to ``out_dir`` (see the module docstring), checked under ONNX Runtime.

    ``tokenizer``: the model's (its spec goes into the manifest; the check's captions go through it). ``images``,
    ``captions``: the check's inputs (default: scikit-learn's sample images and :data:`SAMPLE_CAPTIONS`).
    ``source`` is recorded as where the model came from. ``overwrite``: replace a directory holding other files;
    ``inputs``: the files the model came from, never written over. Raises :class:`ExportCheckError` when a check
    fails, :class:`~siclip.storage.OutputRefused` (before any work) for a destination it may not write."""
    if not isinstance(model, nn.Module) or not all(hasattr(model, a) for a in ("encode_image", "encode_text", "scale", "preprocess")):
        raise TypeError(f"export_clip exports a CLIP module with siclip's interface (encode_image, encode_text, scale, preprocess: a siclip "
                        f"CLIP, or load_clip(spec).model for a converted file, hf:DIR, open_clip:ARCH:FILE), got {type(model).__name__}")  # fmt: skip
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    check_opset(opset)
    out = Path(out_dir)
    check_output(out, ours=written_by_export, overwrite=overwrite, inputs=inputs)  # before the work, not after it
    fused = copy.deepcopy(model).float().eval()
    if isinstance(fused, CLIP):
        fused = reparameterize_model(fused)  # inference form: BatchNorm and branches folded
    modules = {encoder: Encoder(fused, encoder).eval() for encoder in ENCODERS}
    batches = _inputs(fused, tokenizer, images, captions)
    with building_directory(out) as built:
        errors, shapes = {}, {}
        for encoder, module in modules.items():
            file = built / FILES[encoder]
            export_encoder(module, batches[encoder], file, attention=attention, opset=opset,
                           input_name=NAMES[encoder][0], output_name=NAMES[encoder][1])  # fmt: skip
            errors[encoder] = _check(create_session(file), module, batches[encoder], encoder, out / FILES[encoder])
            shapes[encoder] = [None, *batches[encoder].shape[1:]]
        manifest = {
            "format": FORMAT, "name": str(model.name), "embed_dim": int(model.embed_dim), "logit_scale": math.log(float(model.scale().detach())),
            "precision": "float32", "preprocess": fused.preprocess.to_dict(), "tokenizer": _store_tokenizer(tokenizer_spec(tokenizer), built),
            **{encoder: _file_entry(built, encoder, shapes[encoder]) for encoder in ENCODERS},
            "attention": attention, "opset": file_opset(built / FILES["image"]), "source": str(source),
            "check": {"inputs": f"scikit-learn sample images {list(SAMPLE_IMAGES)} and {len(batches['text'])} captions"
                      if images is None and captions is None else "the caller's images and captions",
                      "max_relative_error": errors, "bound": MAX_RELATIVE_ERROR},
            "versions": _versions(),
        }  # fmt: skip
        _write_json(built / MANIFEST, manifest)
        int8_manifest = None
        if quantize == "int8":
            int8_manifest = _quantized(built, manifest, batches)
    return ExportedFiles(out, manifest, out / "int8" if int8_manifest else None, int8_manifest)


def _quantized(built: Path, manifest: dict, inputs: dict[str, Tensor]) -> dict:
    """Write ``built/int8/``: the float32 files quantised, with their own manifest and cosine check."""
    target = built / "int8"
    target.mkdir()
    cosines = {}
    for encoder in ENCODERS:
        quantize_int8(built / FILES[encoder], target / FILES[encoder])
        reference = run_session(create_session(built / FILES[encoder]), inputs[encoder].numpy()).astype(np.float64)
        reference /= np.linalg.norm(reference, axis=-1, keepdims=True)
        cosines[encoder] = _cosines(create_session(target / FILES[encoder]), reference, inputs[encoder])
        if not math.isfinite(cosines[encoder]):
            raise ExportCheckError(f"{target / FILES[encoder]}: the int8 {encoder} encoder gives non-finite embeddings")
        if cosines[encoder] < MIN_INT8_COSINE:
            raise ExportCheckError(f"{target / FILES[encoder]}: the int8 {encoder} embeddings reach a cosine of only {cosines[encoder]:.4f} to "
                                   f"the float32 ones (bound {MIN_INT8_COSINE}, one sample per call): this model does not survive "
                                   "dynamic int8 quantisation; export it without --quantize")  # fmt: skip
    for name in tokenizer_files(manifest["tokenizer"]):  # the int8 directory needs nothing outside itself either
        shutil.copyfile(built / name, target / name)
    int8 = {**manifest, "precision": "int8",
            **{encoder: {**_file_entry(target, encoder, manifest[encoder]["input_shape"])} for encoder in ENCODERS},
            "quantization": "onnxruntime dynamic, int8 weights (QInt8, per tensor), activations quantised per call",
            "activation_ranges": "per_sample",
            "check": {"inputs": manifest["check"]["inputs"], "min_cosine_to_float32": cosines, "bound": MIN_INT8_COSINE,
                      "calls": "one sample per call"}}  # fmt: skip
    _write_json(target / MANIFEST, int8)
    return int8
