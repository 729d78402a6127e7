"""CPU inference under ONNX Runtime against eager PyTorch, and the stages that bound a speedup.

What ``benchmarks/cpu_inference.py --runtime onnx`` runs. Each model is reparameterised and each part of it is
exported (:func:`siclip.deploy.export_encoder`) and timed two ways, eager PyTorch and ONNX Runtime, all variants
of a part interleaved in the same rounds (:func:`siclip.analysis.benchmark.time_interleaved`): the ratio of any
two comes from calls made moments apart (:func:`~siclip.analysis.benchmark.paired_speedup`, geometric mean of
per-round ratios with a 95 % bootstrap interval).

The parts (:data:`PARTS`): the two encoders, and the one stage of each that differs between MobileCLIP-S0 and
SiCLIP-S0, so that the speedup the runtime allows the whole encoder can be measured rather than assumed. With a
stage speedup s and the stage's share p of the baseline's encoder time, both under the same runtime (Amdahl)::

    bound = 1 / ((1 − p) + p / s)

The image stage is stage 4 (RepCPE and the two attention blocks on the 8×8 map), the text stage the four
transformer blocks. A runtime whose fusions speed the rest of the encoder up more than the stage (ONNX Runtime's
convolutions, say) shrinks p and with it the bound.

:func:`subnormals` counts subnormal float32 values in a graph's weights and in every value it computes under
ONNX Runtime: a random initialisation folds 1e-5 layer scales into weights, and subnormal arithmetic is slow on x86.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from siclip.analysis.benchmark import paired_speedup, time_interleaved
from siclip.data.tokenizer import tokenizer_from_spec
from siclip.data.transforms import Preprocess, preprocess_image
from siclip.models import CLIP

from .export import DEFAULT_ATTENTION, DEFAULT_OPSET, Encoder, export_encoder, sample_captions, sample_images
from .runtime import create_session, read_manifest, run_session

PARTS = ("image", "image stage 4", "text", "text blocks")
RUNTIMES = ("eager", "onnx")
# Idle before each timed call. libgomp's threads spin about 300,000 iterations (milliseconds) for more work after a
# parallel region, ONNX Runtime's pool spins too: 50 ms lets both sleep before the other runtime's call starts.
SETTLE_S = 0.05


def part_module(model: CLIP, part: str) -> nn.Module:
    """The module timed as ``part`` of ``model`` (one of :data:`PARTS`), in eval mode."""
    if part in ("image", "text"):
        return Encoder(model, part).eval()
    if part == "image stage 4":
        return nn.Sequential(*model.visual.network[6:]).eval()  # RepCPE and the attention stage, on the last map
    if part == "text blocks":
        return nn.Sequential(*model.text.transformer).eval()
    raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")


def part_inputs(model: CLIP, part: str, batch: int, generator: torch.Generator) -> Tensor:
    """A batch of inputs for ``part``: pixels, the feature map stage 4 reads, ids ending in end-of-text, or hidden states."""
    size, text = model.config.image.image_size, model.config.text
    if part == "image":
        return torch.rand(batch, 3, size, size, generator=generator)
    if part == "image stage 4":
        stem = nn.Sequential(model.visual.patch_embed, *model.visual.network[:6]).eval()
        with torch.inference_mode():
            return stem(torch.rand(batch, 3, size, size, generator=generator))
    if part == "text":
        ids = torch.randint(1, text.vocab_size - 1, (batch, text.context_length), generator=generator)
        ids[:, min(20, text.context_length - 1)] = text.vocab_size - 1  # end of text: the largest id, pooled
        return ids
    if part == "text blocks":
        return torch.randn(batch, text.context_length, text.width, generator=generator)
    raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")


def export_parts(models: dict[str, CLIP], directory: str | Path, *, attention: str = DEFAULT_ATTENTION,
                 opset: int = DEFAULT_OPSET) -> dict[tuple[str, str], Path]:  # fmt: skip
    """Every part of every (reparameterised, eval-mode) model as an ONNX file in ``directory``, keyed (model, part)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    files = {}
    for name, model in models.items():
        for part in PARTS:
            path = directory / f"{name}_{part.replace(' ', '_')}.onnx"
            export_encoder(part_module(model, part), part_inputs(model, part, 2, generator), path, attention=attention, opset=opset)
            files[name, part] = path
    return files


def onnx_runner(session) -> Callable[[Tensor], np.ndarray]:
    """``session`` as a function of a CPU tensor (handed over without a copy)."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


@dataclass(frozen=True)
class Comparison:
    """Two models' part, each under both runtimes, timed in the same rounds: ``times_ms[(model, runtime)]``."""

    part: str
    batch: int
    times_ms: dict[tuple[str, str], list[float]]

    def per_s(self, model: str, runtime: str) -> float:
        return self.batch / (float(np.median(self.times_ms[model, runtime])) / 1e3)

    def speedup(self, base: tuple[str, str], other: tuple[str, str]):
        """How many times faster ``other`` runs than ``base`` (an :class:`~siclip.analysis.stats.Estimate`)."""
        return paired_speedup(self.times_ms[base], self.times_ms[other])


def compare_parts(models: dict[str, CLIP], files: dict[tuple[str, str], Path], batch: int, rounds: int, *, threads: int,
                  parts=PARTS, warmup: int = 2, settle_s: float = SETTLE_S) -> dict[str, Comparison]:  # fmt: skip
    """Each part of each model under eager PyTorch and ONNX Runtime (``threads`` intra-op threads, one inter-op,
    sequential), all four timed interleaved per part on the same batch, each call after ``settle_s`` idle
    (:func:`~siclip.analysis.benchmark.time_interleaved`: neither runtime's spinning threads slow the other's call)."""
    generator = torch.Generator().manual_seed(1)
    out = {}
    for part in parts:
        first = next(iter(models.values()))
        inputs = part_inputs(first, part, batch, generator)
        steps = {}
        for name, model in models.items():
            steps[name, "eager"] = functools.partial(part_module(model, part), inputs)
            steps[name, "onnx"] = functools.partial(onnx_runner(create_session(files[name, part], threads=threads)), inputs)
        with torch.inference_mode():
            results = time_interleaved(steps, torch.device("cpu"), rounds=rounds, warmup=warmup, settle_s=settle_s)
        out[part] = Comparison(part, batch, {key: r["times_ms"] for key, r in results.items()})
    return out


def amdahl_bound(share: float, stage_speedup: float) -> float:
    """1 / ((1 − p) + p / s): the whole encoder's speedup when only a stage of share p runs s times faster."""
    return 1.0 / ((1.0 - share) + share / stage_speedup)


def stage_share(whole: Comparison, stage: Comparison, model: str, runtime: str) -> float:
    """The stage's share p of the whole encoder's time for ``model`` under ``runtime`` (ratio of median times)."""
    if whole.batch != stage.batch:
        raise ValueError(f"a stage's share needs both timed at one batch size, got {stage.batch} and {whole.batch}")
    return float(np.median(stage.times_ms[model, runtime]) / np.median(whole.times_ms[model, runtime]))


def subnormals(path: str | Path, inputs: Tensor) -> dict[str, int]:
    """Subnormal float32 values (0 < |x| < 2⁻¹²⁶) in the graph's weights and in every value ONNX Runtime computes
    for ``inputs`` (each node output made a graph output, graph optimisations off so the values are the graph's)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    def count(array: np.ndarray) -> int:
        array = np.asarray(array)
        return int(np.count_nonzero((np.abs(array) < np.finfo(np.float32).tiny) & (array != 0))) if array.dtype == np.float32 else 0

    model = onnx.load(str(path))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    del model.graph.output[:]
    for node in model.graph.node:
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in node.output if name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    floats = [v for v in values if isinstance(v, np.ndarray) and v.dtype == np.float32]
    return {"weights": sum(count(w) for w in weights), "weight_values": sum(w.size for w in weights if w.dtype == np.float32),
            "activations": sum(count(v) for v in floats), "activation_values": sum(v.size for v in floats)}  # fmt: skip


def exported_throughput(directory: str | Path, batch: int, rounds: int, *, threads: int, reference: CLIP | None = None,
                        warmup: int = 2, settle_s: float = SETTLE_S) -> dict[str, dict]:  # fmt: skip
    """Images/s and texts/s of an exported directory at ``batch`` (real images and captions, repeated), and with
    ``reference`` (its source model) the ratio to eager PyTorch, interleaved: ``{encoder: {"onnx /s", ...}}``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    view = Preprocess.from_dict(manifest["preprocess"])
    pixels = torch.stack([preprocess_image(image, view) for image in sample_images()])
    ids = tokenizer_from_spec(manifest["tokenizer"])(sample_captions()).long()
    out = {}
    for encoder, inputs in (("image", pixels), ("text", ids)):
        inputs = inputs.repeat((batch + len(inputs) - 1) // len(inputs), *[1] * (inputs.dim() - 1))[:batch].contiguous()
        steps = {"onnx": functools.partial(run_session, create_session(directory / manifest[encoder]["file"], threads=threads),
                                           inputs.numpy())}  # fmt: skip
        if reference is not None:
            steps["eager"] = functools.partial(Encoder(reference, encoder).eval(), inputs)
        with torch.inference_mode():
            results = time_interleaved(steps, torch.device("cpu"), rounds=rounds, warmup=warmup, settle_s=settle_s)
        times = {k: r["times_ms"] for k, r in results.items()}
        row = {"onnx /s": batch / (float(np.median(times["onnx"])) / 1e3)}
        if reference is not None:
            row["eager /s"] = batch / (float(np.median(times["eager"])) / 1e3)
            row["onnx / eager"] = paired_speedup(times["eager"], times["onnx"])
        out[encoder] = row
    return out
