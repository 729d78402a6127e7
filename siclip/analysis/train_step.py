"""The training step as a benchmark: images/s, peak memory and FLOPs of one optimisation step.

Variants (``benchmarks/gpu_train_step.py`` runs them on a GPU, the tests on a CPU with tiny models):

- ``siclip``: the full SiCLIP step. Student forward and backward (inherited modules frozen, SAS-P text
  blocks trainable), frozen teacher forward, all five loss terms (CLIP, FD, CRD, ICL, PM), AdamW step.
- ``siclip_cached``: the same with the teacher's embeddings read from the batch (a teacher cache).
- ``all_trainable``: the full step with every student module trainable (no inheritance freeze).
- ``image_last_stage``: the baseline, the teacher's image encoder alone, only its last stage trainable
  (the downsampling into stage 4, RepCPE, the attention blocks, the expansion conv and the head),
  trained with the CLIP loss against fixed text embeddings.

Every variant runs through :func:`siclip.train.step.forward_terms` and
:func:`~siclip.train.step.backward_and_step`, the calls the training loop makes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from siclip.data import model_pixels
from siclip.distill import CachedTeacher, FrozenTeacher, ObjectiveConfig, SiCLIPObjective
from siclip.losses import ClipLoss
from siclip.models import CLIP, build_siclip, create_model, fuse_frozen_towers
from siclip.models.fastvit import PatchEmbed
from siclip.models.stages import train_only
from siclip.train.step import backward_and_step, channels_last_on, create_optimizer, forward_terms, to_device
from siclip.train.task import TrainingTask

from .benchmark import _timed
from .figures import pyplot, save_figure

VARIANTS = ("siclip", "siclip_cached", "all_trainable", "image_last_stage")


@dataclass(frozen=True)
class StepConfig:
    variant: str = "siclip_cached"
    batch: int = 1536
    teacher: str = "mobileclip_s0"
    student: str = "siclip_s0"
    bf16: bool = True
    checkpointing: bool = False  # activation checkpointing of the trainable blocks
    channels_last: bool = True
    reparameterize_frozen: bool = False  # fuse the branches of frozen image towers (teacher, inherited student)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown step variant {self.variant!r}; choose one of {VARIANTS}")
        if self.batch < 2:
            raise ValueError(f"a contrastive step needs a batch of at least 2, got {self.batch}")


class ImageEncoderTask(nn.Module):
    """The baseline task: ``model``'s image encoder against the batch's fixed text embeddings, CLIP loss."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model, self.clip = model, ClipLoss()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        pixels = model_pixels(batch["image"], self.model.preprocess)
        loss = self.clip(self.model.encode_image(pixels), batch["teacher_text"], self.model.scale())
        return {"clip": loss, "total": loss}


def last_stage_prefixes(model: CLIP) -> tuple[str, ...]:
    """Parameter-name prefixes of MCi's last stage: from its downsampling on, the expansion conv and the head."""
    start = max(i for i, m in enumerate(model.visual.network) if isinstance(m, PatchEmbed))
    stage = tuple(f"visual.network.{i}." for i in range(start, len(model.visual.network)))
    return (*stage, "visual.conv_exp.", "visual.head.")


def build_step_task(config: StepConfig) -> nn.Module:
    """The task module of ``config.variant`` on the CPU (random weights: speed and memory do not depend on them)."""
    teacher = create_model(config.teacher)
    if config.variant == "image_last_stage":
        train_only(teacher, last_stage_prefixes(teacher))
        task: nn.Module = ImageEncoderTask(teacher)
        model = teacher
    else:
        siclip = create_model(config.student).config.siclip
        if config.variant == "all_trainable":
            siclip = replace(siclip, freeze="none")
        model, _ = build_siclip(teacher, siclip)
        objective = SiCLIPObjective(model.config.embed_dim, teacher.config.embed_dim, ObjectiveConfig())
        if config.variant == "siclip_cached":
            frozen: nn.Module = CachedTeacher(math.exp(teacher.logit_scale.item()))
        else:
            frozen = FrozenTeacher(teacher, reparameterize=config.reparameterize_frozen)
        if config.reparameterize_frozen:
            fuse_frozen_towers(model)
        task = TrainingTask(model, objective, frozen)
    model.set_grad_checkpointing(config.checkpointing)
    return task


def synthetic_batch(config: StepConfig, model_config, seed: int = 0) -> dict:
    """Random uint8 images (as the loader hands them over), token ids (EOT, the largest id, at a random position) and teacher embeddings."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size, ctx, dim = model_config.image.image_size, model_config.text.context_length, model_config.embed_dim
    vocab = model_config.text.vocab_size
    images = torch.randint(0, 256, (config.batch, 3, size, size), generator=g, dtype=torch.uint8)
    ids = torch.randint(1, vocab - 1, (config.batch, ctx), generator=g)
    ids[torch.arange(config.batch), torch.randint(2, ctx, (config.batch,), generator=g)] = vocab - 1
    return {
        "image": images,
        "text": ids,
        "teacher_image": F.normalize(torch.randn(config.batch, dim, generator=g), dim=-1),
        "teacher_text": F.normalize(torch.randn(config.batch, dim, generator=g), dim=-1),
        "size": config.batch,
    }


def _model_of(task: nn.Module) -> CLIP:
    return task.model if isinstance(task, ImageEncoderTask) else task.student


def prepare_step(config: StepConfig, device: str | torch.device) -> tuple[Callable[[], Tensor], nn.Module, dict]:
    """``(step, task, batch)``: ``step()`` runs one optimisation step of ``task`` on ``batch`` and returns the loss."""
    device = torch.device(device)
    task = build_step_task(config).to(device)
    channels_last = channels_last_on(device, config.channels_last)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    task.train()
    batch = to_device(synthetic_batch(config, _model_of(task).config), device, channels_last=channels_last)
    optimizer = create_optimizer(task, lr=1e-4, weight_decay=0.1)
    params = [p for p in task.parameters() if p.requires_grad]
    bf16 = config.bf16 and device.type == "cuda"

    def step() -> Tensor:
        terms = forward_terms(task, batch, bf16=bf16)
        backward_and_step(terms["total"], optimizer, params, grad_clip=config.grad_clip)
        return terms["total"].detach()

    return step, task, batch


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs (2 × multiply-adds of matrix products, convolutions and attention) of one call of ``step``,
    forward and backward, as ``torch.utils.flop_counter`` counts them: frozen prefixes count their forward
    only, checkpointed blocks their recomputation too."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def transient_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn()`` runs (CPU), from the profiler's events.

    Memory held before the call (weights, optimiser state) is not counted: this is the step's own
    high-water mark, the quantity the order of teacher and student changes. On CUDA use
    ``torch.cuda.max_memory_allocated`` instead (:func:`measure_step`).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure_step(
    config: StepConfig, device: str | torch.device, *, steps: int = 20, warmup: int = 3, flops: bool = True, keep_going: bool = False
) -> dict:
    """Median step time, images/s and peak memory of ``config``; ``{"oom": True}`` when the GPU runs out.

    ``keep_going`` records any other failure in the row's ``error`` instead of raising (for sweeps).

    Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (CUDA only); FLOPs come from
    one extra step under :func:`step_flops`.
    """
    device = torch.device(device)
    row: dict = {**asdict(config), "device": str(device)}
    step = task = batch = None
    try:
        step, task, batch = prepare_step(config, device)
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = [_timed(step, device) for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        ms = statistics.median(times)
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        row |= {"ms": ms, "images_per_s": config.batch / (ms / 1e3), "peak_gib": peak, "oom": False, "trainable_params": trainable}
        if flops:
            row["tflops_per_step"] = step_flops(step) / 1e12
            row["tflops_per_s"] = row["tflops_per_step"] / (ms / 1e3)
    except torch.OutOfMemoryError:
        row |= {"oom": True}
    except Exception as error:  # a sweep records the failure and goes on to the next configuration
        if not keep_going:
            raise
        row |= {"oom": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        del step, task, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def matmul_rate(device: str | torch.device, *, size: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """Measured TFLOP/s of a ``size³`` matrix product on random data: the ceiling utilisation is quoted against."""
    device = torch.device(device)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = [_timed(lambda: a @ b, device) for _ in range(repeats)]
    return 2 * size**3 / (statistics.median(times) / 1e3) / 1e12


def plot_step_scaling(
    rows: list[dict], path: str | Path, *, budget_gib: float = 24.0, target_gib: float = 20.0, title: str | None = None
) -> Path:
    """Peak memory and images/s against batch size, one line per variant (and checkpointing setting)."""
    plt = pyplot()
    fig, (ax_mem, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.8))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if "images_per_s" in row:
            label = row["variant"] + (" + ckpt" if row.get("checkpointing") else "") + (" + reparam" if row.get("reparameterize_frozen") else "")
            series.setdefault(label, []).append(row)
    for label, points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["batch"])
        batches = [r["batch"] for r in points]
        ax_mem.plot(batches, [r["peak_gib"] for r in points], marker="o", label=label)
        ax_rate.plot(batches, [r["images_per_s"] for r in points], marker="o", label=label)
    ax_mem.axhline(budget_gib, color="k", linestyle="--", linewidth=1, label=f"{budget_gib:g} GiB card")
    ax_mem.axhline(target_gib, color="tab:red", linestyle=":", linewidth=1, label=f"{target_gib:g} GiB target")
    ax_mem.set(xlabel="batch size", ylabel="peak GPU memory (GiB)", title="Memory")
    ax_rate.set(xlabel="batch size", ylabel="images / s", title="Throughput")
    for ax in (ax_mem, ax_rate):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    handles, labels = ax_mem.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return save_figure(fig, path, dpi=130)
