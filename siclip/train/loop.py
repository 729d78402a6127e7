"""The training loop: AdamW, warm-up then cosine, clipping, autocast, atomic checkpoints, exact resume.

    summary = train(TrainConfig(model="siclip_tiny", teacher="runs/teacher/model.pt", out_dir="runs/s"))

Resuming (``resume=True``) restores model, objective, optimiser, scheduler, RNG states and the data
loader's position, so a run interrupted and resumed ends, on a CPU, with the same weights bit for bit
as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from siclip.data import AugmentConfig, EpochSampler, ImageTextDataset, ImageTextLoader
from siclip.data.tokenizer import tokenizer_spec
from siclip.distill import FrozenTeacher, SiCLIPObjective
from siclip.models import (
    build_siclip, count_parameters_by_group, create_model, fuse_frozen_towers, get_model_config, save_checkpoint,
)  # fmt: skip

from .config import TrainConfig
from .evaluation import evaluate_run, read_caption_file
from .inputs import RunInputs, prepare_run, settled_model_config, training_captions
from .state import MetricsLogger, load_training_checkpoint, rng_state, save_atomic, set_rng_state
from .step import backward_and_step, channels_last_on, create_optimizer, forward_terms, to_device
from .task import TrainingTask


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or Inf; the last good state was saved first."""


def _sharing_groups(model) -> list[list[int]]:
    """Which text block positions use one module (the plan the student ended up with)."""
    blocks, groups = list(model.text.transformer), []
    for i, block in enumerate(blocks):
        if i and block is blocks[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_data(config: TrainConfig, inputs: RunInputs, image_size: int, rank: int, world: int) -> ImageTextLoader:
    data = config.data
    dataset = ImageTextDataset(inputs.source, inputs.tokenizer, augment_config=AugmentConfig(image_size, normalize=not data.normalize_on_device), p_synthetic=data.p_synthetic, seed=config.seed)
    return ImageTextLoader(dataset, data.batch_size, num_workers=data.workers, seed=config.seed, rank=rank, world_size=world)


def build_task(config: TrainConfig, inputs: RunInputs | None = None) -> TrainingTask:
    """Student (inheriting from the teacher when one is given and the model is a SiCLIP), objective, teacher.

    ``inputs`` (source, teacher, tokenizer) come from :func:`~siclip.train.inputs.prepare_run`, which runs here when not given.
    """
    model_config = get_model_config(config.model, **config.model_overrides)
    inputs = inputs if inputs is not None else prepare_run(config, model_config)
    model_config = settled_model_config(model_config, inputs.tokenizer, inputs.teacher)
    teacher_model = inputs.teacher
    if teacher_model is not None and model_config.siclip is not None:
        divergence = None
        if model_config.siclip.sharing in ("threshold", "optimal"):  # measured on the teacher's text blocks
            divergence = calibration_divergence(teacher_model, config, inputs)
        student, _ = build_siclip(teacher_model, model_config.siclip, divergence=divergence)
    else:
        if model_config.siclip is not None and model_config.siclip.sharing in ("threshold", "optimal"):
            raise ValueError(f"sharing {model_config.siclip.sharing!r} is chosen from a teacher's divergences: give a teacher")
        student = create_model(model_config)
    if config.fuse_frozen_towers:
        fuse_frozen_towers(student)
    if config.grad_checkpointing:
        student.set_grad_checkpointing(True)
    needs_teacher = teacher_model is not None and config.objective.needs_teacher
    teacher = FrozenTeacher(teacher_model, reparameterize=config.fuse_frozen_towers) if needs_teacher else None
    teacher_dim = teacher_model.config.embed_dim if teacher_model is not None else None
    objective = SiCLIPObjective(student.config.embed_dim, teacher_dim, config.objective)
    return TrainingTask(student, objective, teacher)


def calibration_divergence(model, config: TrainConfig, inputs: RunInputs):
    """Attention JS divergences between the text blocks of ``model`` on calibration captions: the lines of
    ``config.calibration_captions_file``, else captions of the training data (its first batches' order)."""
    from siclip.analysis.divergence import text_divergences

    if config.calibration_captions_file is not None:
        texts = read_caption_file(config.calibration_captions_file)
    else:
        indices = EpochSampler(len(inputs.source), seed=config.seed).order(0)[: config.calibration_captions]
        texts = [t for i in indices for t in training_captions(inputs.source, [i], config.data.p_synthetic)[:1]]
    if not texts:
        raise ValueError(f"no calibration captions in {config.calibration_captions_file or config.data.source}")
    ids = inputs.tokenizer(texts[: config.calibration_captions]).to(next(model.parameters()).device)
    return text_divergences(model.eval(), ids)["attention"].cpu().numpy()


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def train(config: TrainConfig, *, resume: bool = False, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train; returns the run summary (also written to ``out_dir/summary.json``).

    ``max_steps`` stops early after that many optimiser steps in total (a deliberate interruption).
    """
    if config.accumulation != 1:
        raise ValueError(
            "gradient accumulation would split each batch's contrastive negatives across micro-batches and change "
            "the loss; use a smaller batch, or several GPUs (features are gathered across ranks)"
        )
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = _device(config)
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(config.seed)

    inputs = prepare_run(config, get_model_config(config.model, **config.model_overrides), rank=rank, resume=resume)
    task = build_task(config, inputs).to(device)
    channels_last = channels_last_on(device, config.channels_last)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    student = task.student
    loader, tokenizer = build_data(config, inputs, student.config.image.image_size, rank, world), inputs.tokenizer
    optimizer = create_optimizer(task, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
    total_steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, config.warmup_steps, total_steps))
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    model = torch.nn.parallel.DistributedDataParallel(task) if distributed else task
    model = torch.compile(model) if config.compile else model

    step = 0
    if resume and checkpoint_path.exists():
        state = load_training_checkpoint(checkpoint_path)
        task.load_trainable_state(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step = state["step"]

    def save_state() -> None:
        if rank == 0:
            save_atomic({"task": task.trainable_state(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "loader": loader.state_dict(), "rng": rng_state(), "step": step,
                         "config": dataclasses.asdict(config)}, checkpoint_path)  # fmt: skip

    logger = MetricsLogger(out_dir, enabled=rank == 0)
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.model}", disable=not progress or rank != 0)
    last: dict[str, float] = {}
    started = time.perf_counter()
    task.train()
    while step < stop:
        for batch in loader:
            t0 = time.perf_counter()
            batch = to_device(batch, device, channels_last=channels_last)
            terms = forward_terms(model, batch, bf16=use_bf16)
            bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
            if bad:
                save_state()  # nothing has been updated by this batch: the saved state is the last good one
                raise NonFiniteLoss(f"loss term(s) {bad} became non-finite at step {step}; last good state saved to {checkpoint_path}")
            grad_norm = backward_and_step(terms["total"], optimizer, task.parameters(), grad_clip=config.grad_clip)
            scheduler.step()
            step += 1
            last = {name: value.item() for name, value in terms.items()}
            rate = batch["size"] * world / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3g}" for k, v in last.items()}, "img/s": f"{rate:.0f}"})
            if step % config.log_every == 0 or step == stop:
                logger.log(step, {**last, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "samples_per_s": rate})
            if step % config.checkpoint_every == 0 or step == stop:
                save_state()
            if step >= stop:
                break
    bar.close()
    summary = {"model": config.model, "steps": step, "total_steps": total_steps, "seconds": time.perf_counter() - started,
               "final_loss": last, "parameters": count_parameters_by_group(student),
               "sharing": [list(g) for g in _sharing_groups(student)], "config": dataclasses.asdict(config)}  # fmt: skip
    if step >= total_steps and rank == 0:
        save_checkpoint(student, out_dir / "model.pt", tokenizer=tokenizer_spec(tokenizer))
        if config.evaluate:
            summary["eval"] = evaluate_run(student, tokenizer, config)
    logger.summary(summary)
    if owns_group:  # every rank reaches this point before the group (and its connections) goes
        dist.barrier()
        dist.destroy_process_group()
    return summary
