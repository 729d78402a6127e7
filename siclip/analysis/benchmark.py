"""Micro-benchmarks of the blocks: forward + backward time and peak memory, Pre-LN against SAS-P.

One implementation serves the CPU demo table (``benchmarks/blocks_table.py``), the pytest-benchmark
suite and the GPU script (``benchmarks/gpu_blocks.py``). Timing follows the usual protocol: warm-up
steps first (compilation, allocator, autotuning), then the median of timed steps; on CUDA each step
is bracketed by events and synchronised.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from siclip.analysis.stats import Estimate, estimate
from siclip.blocks import PreLNBlock, SASPBlock, count_parameters, shaped_attention
from siclip.blocks.backends import triton_runs_on
from siclip.wording import count

BLOCKS: dict[str, Callable[..., nn.Module]] = {"pre_ln": PreLNBlock, "sasp": SASPBlock}
# What the block tables time: a name for each (block kind, shaped-attention backend). "sasp" combines α/β/γ
# with PyTorch ops, "sasp_triton" with the Triton kernels (CUDA, or the CPU under Triton's interpreter).
VARIANTS: dict[str, tuple[str, str | None]] = {
    "pre_ln": ("pre_ln", None),
    "sasp": ("sasp", "sdpa"),
    "sasp_triton": ("sasp", "triton"),
}


@dataclass(frozen=True)
class BlockShape:
    dim: int
    heads: int
    tokens: int
    batch: int

    def __str__(self) -> str:
        return f"d{self.dim} h{self.heads} t{self.tokens} b{self.batch}"


def make_block(kind: str, dim: int, heads: int, *, backend: str | None = None, **options) -> nn.Module:
    """A block of ``kind`` with the MLP both kinds share (GELU, biases), so only the design differs.
    ``backend`` picks SAS-P's shaped-attention backend (default ``"auto"``); ``options`` go to the block."""
    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; choose one of {sorted(BLOCKS)}")
    extra = {"mlp_bias": True, **options} if kind == "sasp" else dict(options)
    if backend is not None:
        extra["backend"] = backend
    return BLOCKS[kind](dim, heads, act="gelu", **extra)


def available_variants(device: str | torch.device) -> list[str]:
    """The :data:`VARIANTS` that run on ``device``: the Triton one only where its kernels do."""
    probe = torch.empty(0, device=device)
    return [name for name, (_, backend) in VARIANTS.items() if backend != "triton" or triton_runs_on(probe)[0]]


def _autocast(device: torch.device, dtype: torch.dtype):
    enabled = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def time_interleaved(
    steps: dict[str, Callable[[], object]], device: torch.device, *, rounds: int = 20, warmup: int = 5, settle_s: float = 0.0
) -> dict[str, dict]:
    """Median milliseconds (and CUDA peak GiB) of each named step, timed round-robin.

    Interleaving puts every variant under the same conditions (clock, cache, a neighbour's load),
    so the ratio of two medians is trustworthy on a noisy machine too. The order reverses every other
    round (A B, B A, …), so no variant always runs right after another one, warm or cooled by it. The peak memory of each
    variant comes from one extra call after a reset of the allocator's statistics. ``times_ms`` keeps
    every round's time, for :func:`paired_speedup`. ``settle_s`` idles before each timed call: steps of two CPU
    runtimes in one process (PyTorch's OpenMP threads, ONNX Runtime's pool) each leave their threads spinning for
    work after a call, which would take the cores from the next step's threads; after the pause they sleep.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            if settle_s:
                time.sleep(settle_s)
            times[name].append(_timed(steps[name], device))
    results = {}
    for name, step in steps.items():
        peak = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        results[name] = {"ms": statistics.median(times[name]), "peak_gib": peak, "times_ms": times[name]}
    return results


def paired_speedup(base_ms: list[float], other_ms: list[float], *, level: float = 0.95) -> Estimate:
    """How many times faster ``other`` runs than ``base``, from rounds timed round-robin.

    Round r gives the ratio base_r / other_r of two calls made moments apart, so a slow spell of the
    machine cancels within the round. The estimate is the geometric mean of those ratios,
    exp(mean_r log(base_r / other_r)), with a percentile bootstrap interval over rounds.
    """
    if len(base_ms) != len(other_ms) or len(base_ms) < 2:
        raise ValueError(f"need the same number (≥ 2) of rounds of each, got {len(base_ms)} and {len(other_ms)}")
    logs = np.log(np.asarray(base_ms, dtype=np.float64) / np.asarray(other_ms, dtype=np.float64))
    e = estimate(logs[None, :], level=level)
    return Estimate(math.exp(e.mean), float(np.exp(logs).std(ddof=1)), math.exp(e.low), math.exp(e.high), len(logs))


def forward_backward_step(module: nn.Module, x: Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One training-like step: forward under autocast, backward of a fixed random output gradient
    (dense, like a real upstream gradient; the gradient of a sum would be a stride-0 broadcast), gradients dropped."""
    device = x.device
    upstream: list[Tensor] = []

    def step() -> None:
        with _autocast(device, dtype):
            y = module(x)
        if not upstream:
            upstream.append(torch.randn_like(y))
        y.backward(upstream[0])
        for p in module.parameters():
            p.grad = None

    return step


def compare_blocks(
    shapes: Iterable[BlockShape],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    steps: int = 20,
    warmup: int = 5,
    progress: bool = True,
    variants: Iterable[str] | None = None,
) -> list[dict]:
    """Pre-LN and SAS-P forward + backward on each shape, run the same way; one row per shape.

    ``variants`` (default: :func:`available_variants`) name entries of :data:`VARIANTS`; each SAS-P
    variant gets a ``speedup`` column, Pre-LN time / its time (``speedup`` for ``sasp``, ``speedup_triton``
    for ``sasp_triton``).
    """
    device = torch.device(device)
    variants = available_variants(device) if variants is None else list(variants)
    if variants[0] != "pre_ln" or any(v not in VARIANTS for v in variants):
        raise ValueError(f"variants must start with 'pre_ln' and name entries of {sorted(VARIANTS)}, got {variants}")
    rows = []
    shapes = list(shapes)
    for shape in tqdm(shapes, desc=f"blocks ({device.type}, {'compiled' if compile else 'eager'})", disable=not progress):
        if compile:
            torch._dynamo.reset()  # a fresh cache per shape: no recompile limits, no stale guards
        x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
        row = {**asdict(shape), "mode": "compile" if compile else "eager", "dtype": str(dtype).removeprefix("torch.")}
        blocks = {}
        for name in variants:
            kind, backend = VARIANTS[name]
            blocks[name] = make_block(kind, shape.dim, shape.heads, backend=backend).to(device)
        runs = {name: torch.compile(b) if compile else b for name, b in blocks.items()}
        steps_by_kind = {name: forward_backward_step(run, x, dtype) for name, run in runs.items()}
        results = time_interleaved(steps_by_kind, device, rounds=steps, warmup=warmup)
        for name, result in results.items():
            row |= {f"{name}_ms": result["ms"], f"{name}_gib": result["peak_gib"], f"{name}_params": count_parameters(blocks[name])}
        del blocks, runs, steps_by_kind
        for name in variants[1:]:
            row["speedup" + name.removeprefix("sasp")] = row["pre_ln_ms"] / row[f"{name}_ms"]
        row["param_saving"] = 1 - row[f"{variants[1]}_params"] / row["pre_ln_params"]
        rows.append(row)
    return rows


def compare_attention(
    token_counts: Iterable[int],
    *,
    heads: int = 8,
    head_dim: int = 64,
    batch_tokens: int = 8192,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 20,
    warmup: int = 5,
    progress: bool = True,
) -> list[dict]:
    """Shaped attention against plain SDPA and an explicit softmax(QKᵀ)V, forward + backward.

    ``batch = batch_tokens // tokens``, so every row moves the same number of tokens and a
    memory linear in tokens shows as a flat ``peak_gib`` column. ``shaped`` combines α/β/γ with PyTorch
    ops; ``shaped_triton`` (where the kernels run) with the Triton kernels.
    """
    device = torch.device(device)
    gains = [torch.ones(heads, device=device, requires_grad=True) for _ in range(3)]  # trainable, as in a block
    variants: dict[str, Callable] = {
        "sdpa": lambda q, k, v: nn.functional.scaled_dot_product_attention(q, k, v),
        "shaped": lambda q, k, v: shaped_attention(q, k, v, *gains, backend="sdpa"),
        "explicit": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, -1) @ v,
    }
    if "sasp_triton" in available_variants(device):
        variants["shaped_triton"] = lambda q, k, v: shaped_attention(q, k, v, *gains, backend="triton")
    rows = []
    for tokens in tqdm(list(token_counts), desc=f"attention ({device.type})", disable=not progress):
        batch = max(1, batch_tokens // tokens)
        qkv = [torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        upstream = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype)
        row = {"tokens": tokens, "batch": batch, "heads": heads, "head_dim": head_dim}

        def step(fn, qkv=qkv, upstream=upstream) -> None:
            fn(*qkv).backward(upstream)
            for t in (*qkv, *gains):
                t.grad = None

        results = time_interleaved(
            {name: functools.partial(step, fn) for name, fn in variants.items()}, device, rounds=steps, warmup=warmup
        )
        for name, result in results.items():
            row |= {f"{name}_ms": result["ms"], f"{name}_gib": result["peak_gib"]}
        for name in variants:
            if name.startswith("shaped"):
                row[f"{name}_vs_sdpa"] = row[f"{name}_ms"] / row["sdpa_ms"]
        rows.append(row)
    return rows


def _cell(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def to_markdown(rows: list[dict]) -> str:
    """A GitHub-markdown table of ``rows`` (the keys of the first row are the columns)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {count(torch.get_num_threads(), 'thread')}"


def loader_throughput(loader, *, batches: int | None = None, warmup: int = 2) -> dict:
    """Samples per second a loader delivers (decode + augment + collate), after ``warmup`` batches."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    count, t0 = 0, time.perf_counter()
    for n, batch in enumerate(iterator):
        count += batch["size"]
        if batches is not None and n + 1 >= batches:
            break
    seconds = time.perf_counter() - t0
    return {"samples": count, "seconds": seconds, "samples_per_s": count / seconds}


@torch.inference_mode()
def encoder_timings(
    encoders: dict[str, Callable[[Tensor], Tensor]], inputs: Tensor, *, rounds: int = 5, warmup: int = 1
) -> dict[str, dict]:
    """:func:`time_interleaved` results of each encoder on ``inputs`` (a batch), in inference mode, with
    ``per_s`` (items per second) added."""
    results = time_interleaved({n: functools.partial(f, inputs) for n, f in encoders.items()}, inputs.device, rounds=rounds, warmup=warmup)
    return {name: {**r, "per_s": inputs.shape[0] / (r["ms"] / 1e3)} for name, r in results.items()}


def encoder_throughput(
    encoders: dict[str, Callable[[Tensor], Tensor]], inputs: Tensor, *, rounds: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Items per second of each encoder on ``inputs`` (a batch), timed round-robin (CPU or CUDA)."""
    return {name: r["per_s"] for name, r in encoder_timings(encoders, inputs, rounds=rounds, warmup=warmup).items()}
