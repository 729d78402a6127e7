"""The training loop: AdamW, warm-up then cosine, clipping, autocast, atomic checkpoints, exact resume.

    summary = train(TrainConfig(model="siclip_tiny", teacher="runs/teacher/model.pt", out_dir="runs/s"))

Resuming (``resume=True``) restores model, objective, optimiser, scheduler, RNG states and the data
loader's position, so a run interrupted and resumed ends, on a CPU, with the same weights bit for bit
as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from siclip.blocks.token_dropout import enable_token_dropout
from siclip.data import EpochSampler, ImageTextDataset, ImageTextLoader, augment_policy
from siclip.data.augment import kornia_library
from siclip.data.calibration import read_caption_file  # the user's calibration captions: a reader of user inputs, in siclip.data
from siclip.data.tokenizer import tokenizer_spec
from siclip.distill import FrozenTeacher, SiCLIPObjective
from siclip.errors import user_input
from siclip.losses import NonFiniteInput, PairMatchingLoss
from siclip.models import (
    CLIP, build_siclip, count_parameters_by_group, create_model, fuse_frozen_towers, get_model_config, list_models,
    save_checkpoint,
)  # fmt: skip

from .config import TrainConfig, applied_settings, data_read, save_config
from .evaluation import evaluate_run, nothing_evaluated
from .budget import first_batches, measure_step_flops, phase_flops, phased_budget_steps
from .guard import NonFiniteLoss, PeerLost, StopSignals, TrainingInterrupted, flatten_tensors, nonfinite_names
from .inputs import RunInputs, prepare_run, save_tokenizer, settled_model_config, training_captions
from .resume import check_run_directory, clear_run_directory, reconcile_resumed_config
from .state import CheckpointError, MetricsLogger, RunLock, load_training_checkpoint, rng_state, save_atomic, set_rng_state
from .strategies import check_strategies, masked_steps
from .step import (
    backward_and_step, check_tower_names, channels_last_on, create_optimizer, forward_terms, to_device, trains_on_one_sample,
)  # fmt: skip
from .task import TrainingTask


def _sharing_groups(model):
    """Which text block positions use one module (the plan the student ended up with); a converted CLIP's plans."""
    if hasattr(model, "recipe"):
        return {stack: plan["groups"] for stack, plan in model.recipe.sharing.items()}
    blocks, groups = list(model.text.transformer), []
    for i, block in enumerate(blocks):
        if i and block is blocks[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [list(g) for g in groups]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tower_schedules(optimizer, warmup: int, total: int, frozen_steps: dict) -> list:
    """One learning-rate factor per parameter group: :func:`warmup_cosine`, and 0 for a group whose tower
    is still frozen (``step < frozen_steps[tower]``)."""
    check_tower_names(frozen_steps, "tower_frozen_steps")
    never = sorted(tower for tower, steps in frozen_steps.items() if steps >= total)
    if never:
        warnings.warn(f"tower_frozen_steps keeps {never} still for all {total} steps of this run: they will not train")

    def factor(start: int):
        return lambda step: warmup_cosine(step, warmup, total) if step >= start else 0.0

    return [factor(int(frozen_steps.get(group.get("tower"), 0))) for group in optimizer.param_groups]


def build_data(config: TrainConfig, inputs: RunInputs, image_size: int, rank: int, world: int) -> ImageTextLoader:
    """The run's loader: the ``data.augment`` policy's views (uint8 crops), ``data.text_augment``'s caption edits, and
    with SLIP (``objective.ssl_scale > 0``) two views of each image augmented as SimCLR's (the ``strong`` policy)."""
    data = config.data
    # uint8 crops: a quarter of the bytes between workers and to the device, and each model normalises them its own way
    augment_config = augment_policy(data.augment, image_size, scale=tuple(data.crop_scale), ratio=tuple(data.crop_ratio), normalize=False)
    ssl_config = augment_policy("strong", image_size, ratio=tuple(data.crop_ratio), normalize=False) if config.objective.ssl_scale > 0 else None
    if augment_config.colour is not None or ssl_config is not None:
        try:
            kornia_library()
        except ImportError as err:  # the user's choice of strategy needs it: a refusal before the first step
            raise ValueError(str(err)) from None
    dataset = ImageTextDataset(inputs.source, inputs.tokenizer, augment_config=augment_config, p_synthetic=data.p_synthetic, seed=config.seed,
                               teacher_tokenizer=inputs.teacher_tokenizer, text_augment=data.text_augment, ssl_config=ssl_config)  # fmt: skip
    return ImageTextLoader(dataset, data.batch_size, num_workers=data.workers, seed=config.seed, rank=rank, world_size=world,
                           max_skip_fraction=data.max_skip_fraction, group_size=2 if data.shape_twins else 1)  # fmt: skip


def build_task(config: TrainConfig, inputs: RunInputs | None = None) -> TrainingTask:
    """Student (inheriting from the teacher when one is given and the model is a SiCLIP), objective, teacher.

    ``inputs`` (source, teacher, tokenizer) come from :func:`~siclip.train.inputs.prepare_run`, which runs here when not given.
    """
    model_config = student_model_config(config)
    inputs = inputs if inputs is not None else prepare_run(config, model_config)
    teacher_model = inputs.teacher  # the model a SiCLIP student inherits from
    distiller = inputs.distiller if inputs.distiller is not None else teacher_model  # the model it distils from
    if inputs.student is not None:  # a converted CLIP file: it inherited its original's weights when it was converted
        student = inputs.student
        if config.model_overrides.get("siclip", {}).get("freeze", "inherited") == "inherited":
            student.train_only_converted()
        teacher = FrozenTeacher(distiller) if distiller is not None and config.objective.needs_teacher else None
        objective = SiCLIPObjective(student.embed_dim, distiller.embed_dim if distiller is not None else None, config.objective)
        return TrainingTask(student, objective, teacher, token_dropout=_token_dropout(student, config))
    siclip_teacher = teacher_model if isinstance(teacher_model, CLIP) else None  # one a student can inherit from
    model_config = settled_model_config(model_config, inputs.tokenizer, siclip_teacher)
    inherited: frozenset[str] = frozenset()
    if siclip_teacher is not None and model_config.siclip is not None and config.inherit:
        measure = {"text": calibration_divergence, "image": calibration_image_divergence}  # on the teacher's blocks
        divergence = {tower: measure[tower](teacher_model, config, inputs) for tower in model_config.siclip.measured_towers()}
        student, report = build_siclip(teacher_model, model_config.siclip, divergence=divergence)
        inherited = frozenset(row["parameter"] for row in report.rows if row["status"] == "inherited")
    else:
        if model_config.siclip is not None and model_config.siclip.measured_towers():
            raise ValueError(f"sharing of {model_config.siclip.measured_towers()} is chosen from a teacher's divergences, "
                             "measured on the blocks a student inherits: give a teacher and keep weight inheritance on")  # fmt: skip
        student = create_model(model_config)
    if config.fuse_frozen_towers:
        fuse_frozen_towers(student)
    if config.grad_checkpointing:
        student.set_grad_checkpointing(True)
    needs_teacher = distiller is not None and config.objective.needs_teacher
    teacher = FrozenTeacher(distiller, reparameterize=config.fuse_frozen_towers) if needs_teacher else None
    teacher_dim = distiller.embed_dim if distiller is not None else None
    objective = SiCLIPObjective(student.config.embed_dim, teacher_dim, config.objective)
    return TrainingTask(student, objective, teacher, inherited=inherited, token_dropout=_token_dropout(student, config))


def _token_dropout(student, config: TrainConfig) -> list:
    """FLIP: the maskers put in the student's image tower at ``config.mask_ratio`` (a ValueError says why a tower
    cannot take them); none at ratio 0."""
    return enable_token_dropout(student, config.mask_ratio) if config.mask_ratio > 0 else []


def student_model_config(config: TrainConfig):
    """The student's registered configuration with the run's image tower and overrides, or None when ``config.model`` is a converted
    CLIP file (a transformers or open_clip model converted by ``experiments/convert_model.py``)."""
    from siclip.interop.converted import check_converted_file, is_converted_file

    if config.model not in list_models() and Path(config.model).is_file():
        if is_converted_file(config.model):
            return None
        check_converted_file(config.model)  # a file that is no converted model: say why, not that the name is unknown
    overrides = dict(config.model_overrides)
    if config.image_tower is not None:  # the tower preset first, the run's image overrides on top of it
        from siclip.models.towers import tower_preset

        image = overrides.get("image", {})
        if not isinstance(image, dict):
            raise ValueError(f"image_tower {config.image_tower!r} and model_overrides['image'] = {image!r}: give the tower once")
        overrides["image"] = {**tower_preset(config.image_tower), **image}
    return get_model_config(config.model, **overrides)


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


def calibration_image_divergence(model, config: TrainConfig, inputs: RunInputs):
    """Attention JS divergences between the image attention blocks of ``model`` on the first
    ``config.calibration_captions`` images of the training data (evaluation view)."""
    from siclip.analysis.divergence import calibration_images, image_divergences

    images = calibration_images(inputs.source, config.calibration_captions, model.preprocess)
    return image_divergences(model.eval(), images.to(next(model.parameters()).device))["attention"].cpu().numpy()


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
          progress: bool = True) -> dict:  # fmt: skip
    """Train; returns the run summary (also written to ``out_dir/summary.json``).

    ``max_steps`` stops early after that many optimiser steps in total (a deliberate interruption).
    An output directory that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (start over); one in use by another run is refused, naming its PID. Everything the run
    reads (teacher, data, tokenizer, evaluation sets, the checkpoint to resume) is checked before the first
    step and before ``overwrite`` deletes anything; a ``ValueError`` or ``OSError`` there is the user's input
    (:func:`siclip.errors.user_input`). SIGINT/SIGTERM save at the next step boundary and raise
    :class:`TrainingInterrupted` (during the final evaluation, with nothing left to save, at once); a NaN or
    Inf loss term, gradient or parameter raises :class:`NonFiniteLoss` naming it and the last good checkpoint,
    which holds the state after the last step that completed; a rank that loses contact with the others
    raises :class:`PeerLost`.
    """
    with user_input():
        if config.accumulation != 1:
            raise ValueError(
                "gradient accumulation would split each batch's contrastive negatives across micro-batches and change "
                "the loss; use a smaller batch, or several GPUs (features are gathered across ranks)"
            )
        if resume and overwrite:
            raise ValueError("resume continues the run in out_dir and overwrite starts it over: choose one")
        check_strategies(config)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.dist_timeout))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out_dir = Path(config.out_dir)
    lock, created = None, rank == 0 and not out_dir.exists()
    try:
        if rank == 0:
            lock = RunLock(out_dir)
            check_run_directory(out_dir, resume=resume, overwrite=overwrite)
        with StopSignals() as signals:
            summary = _train(config, resume=resume, overwrite=overwrite, max_steps=max_steps, progress=progress,
                             distributed=distributed, rank=rank, world=world, signals=signals)  # fmt: skip
    except BaseException as err:
        lost = distributed and _peer_failure(err)
        if owns_group:  # these two stop every rank at the same step; anything else may have stopped this rank alone
            if isinstance(err, (NonFiniteLoss, TrainingInterrupted)) and not lost:
                dist.barrier()
            dist.destroy_process_group()
        if lost:
            raise PeerLost(rank, err, out_dir / "checkpoint.pt") from err
        raise
    finally:
        if lock is not None:
            lock.release(remove_empty=created)
    if owns_group:  # every rank reaches this point before the group (and its connections) goes
        dist.barrier()
        dist.destroy_process_group()
    return summary


def train_or_continue(config: TrainConfig, *, max_steps: int | None = None, progress: bool = True) -> dict:
    """:func:`train` for a study that is run again until it finishes: continue the run in ``out_dir`` from its
    checkpoint, or, without one, start it over (what an earlier try left before its first checkpoint cannot be
    continued: its log would mix two starts), quietly either way."""
    resume = (Path(config.out_dir) / "checkpoint.pt").exists()
    return train(config, resume=resume, overwrite=not resume, max_steps=max_steps, progress=progress)


def _train(config: TrainConfig, *, resume: bool, overwrite: bool, max_steps: int | None, progress: bool, distributed: bool,
           rank: int, world: int, signals: StopSignals) -> dict:  # fmt: skip
    device = _device(config)
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(config.seed)

    with user_input():  # what the run reads, checked before its first step
        inputs = prepare_run(config, student_model_config(config), resume=resume)
        read = data_read(config, inputs.source)  # what summary.json records the run read
        task = build_task(config, inputs).to(device)
        loader = build_data(config, inputs, task.student.preprocess.size, rank, world)
        total_steps = config.epochs * len(loader)
        if len(loader) == 0 or total_steps == 0:
            raise ValueError(f"{config.epochs} epoch(s) of {len(inputs.source)} samples in batches of {config.data.batch_size}"
                             f"{f' over {world} ranks' if world > 1 else ''} make no training step: give more samples, "
                             "a smaller batch or more epochs")  # fmt: skip
        state = load_training_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    channels_last = channels_last_on(device, config.channels_last)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    budget = None
    if config.budget_tflops is not None:  # the budget sets the steps (siclip.train.budget); epochs follow from them
        with user_input():
            budget = compute_budget(config, task, loader, state, device=device, bf16=use_bf16, channels_last=channels_last, world=world)
        total_steps = budget["total_steps"]
    student, tokenizer = task.student, inputs.tokenizer
    optimizer = create_optimizer(task, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
                                 tower_lr_scale=config.tower_lr_scale, inherited=task.inherited_parameters(),
                                 inherited_lr_scale=config.inherited_lr_scale)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tower_schedules(optimizer, config.warmup_steps, total_steps, config.tower_frozen_steps))

    step, saved_step, pm_skipped, single_skipped = 0, None, 0, 0
    last: dict[str, float] = {}
    if state is not None:
        with user_input():
            _restore(state, checkpoint_path, task, optimizer, scheduler, loader)
        step = saved_step = state["step"]
        last, pm_skipped = state.get("last_terms", {}), state.get("pm_skipped_steps", 0)
        single_skipped = state.get("single_sample_batches", 0)
        config = reconcile_resumed_config(config, state.get("config", {}), checkpoint_path)
    elif resume:
        warnings.warn(f"--resume: no checkpoint at {checkpoint_path}; starting from step 0", stacklevel=2)
    if rank == 0:  # the inputs passed: only now may an old run's files go
        clear_run_directory(out_dir, resume=resume, overwrite=overwrite)
        if inputs.student is None:  # a converted CLIP reads its original's tokenizer, which its file names
            save_tokenizer(config, tokenizer)
        save_config(config)
    model = torch.nn.parallel.DistributedDataParallel(task) if distributed else task
    model = torch.compile(model) if config.compile else model
    boundary = StepBoundary(task, loader) if rank == 0 else None  # only rank 0 writes checkpoints

    def save_state(*, from_boundary: bool = False) -> None:
        """Write the state after ``step``; ``from_boundary``: a step failed after its forward changed the buffers, the
        loader's position and the RNGs, so those come from the boundary before it (the weights are untouched)."""
        nonlocal saved_step
        if rank == 0 and saved_step != step:  # a checkpoint of this very step is already on disk
            loader_state, rng = boundary.restore() if from_boundary else (loader.state_dict(), rng_state())
            payload = {"task": task.trainable_state(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "loader": loader_state, "rng": rng, "step": step, "last_terms": last,
                       "pm_skipped_steps": pm_skipped, "single_sample_batches": single_skipped,
                       "config": dataclasses.asdict(config), **({"budget": budget} if budget is not None else {})}  # fmt: skip
            bad = nonfinite_names(flatten_tensors({"task": payload["task"], "optimizer": payload["optimizer"]["state"]}))
            if bad:  # a checkpoint is only ever a state worth resuming from
                raise NonFiniteLoss(f"{_listed(bad)} non-finite after step {step}; not saved. {_last_good(saved_step, checkpoint_path)}")
            save_atomic(payload, checkpoint_path)
        saved_step = step

    def stop_non_finite(what: str, *, save: bool) -> None:
        """Raise naming ``what``, the failing step and what preceded it; ``save``: the weights have not been touched by
        this step, so the state after the previous one is saved as the last good state."""
        lr = scheduler.get_last_lr()[0]
        before = (f"step {step} ended with loss " + ", ".join(f"{k} {v:.4g}" for k, v in last.items())) if last else "the run's first step"
        if save:
            save_state(from_boundary=True)
        raise NonFiniteLoss(f"{what} became non-finite in step {step + 1} (at lr {lr:.3g}; {before}); "
                            f"{_last_good(saved_step, checkpoint_path)}")  # fmt: skip

    def check_gradients(norm: Tensor) -> None:
        if not bool(torch.isfinite(norm)):  # the norm of the all-reduced gradients: every rank agrees
            named = ((name, p.grad) for name, p in task.named_parameters() if p.grad is not None)
            stop_non_finite(f"gradient norm {float(norm)} (gradients of {_listed(nonfinite_names(named))})", save=True)

    logger = MetricsLogger(out_dir, enabled=rank == 0, resume_step=step if resume else None)
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.model}", disable=not progress or rank != 0)
    pm_on = getattr(task.objective, "pair_matching", None) is not None
    masked_until = masked_steps(config, total_steps)  # FLIP: the steps after it tune unmasked
    started = time.perf_counter()
    task.train()
    one_sample_trains = trains_on_one_sample(student, student.preprocess.size, device)
    try:  # the bar ends its line whatever stops the loop, so a message after it starts on a line of its own
        while step < stop:
            for batch in loader:
                if _any_rank(batch["size"] < 2 and not one_sample_trains, device):  # every rank skips it together
                    single_skipped += 1
                    continue
                t0 = time.perf_counter()
                batch = to_device(batch, device, channels_last=channels_last)
                if task.token_dropout:
                    task.set_masking(step < masked_until)
                if task.objective.config.distill_schedule == "linear":  # the teacher fades out: λ × (1 − step / steps)
                    task.objective.distill_factor = 1.0 - step / total_steps
                try:
                    terms = forward_terms(model, batch, bf16=use_bf16)
                except NonFiniteInput as err:  # features went non-finite before any loss could be computed
                    stop_non_finite(f"the forward pass ({err})", save=True)
                bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
                if _any_rank(bool(bad), device):
                    values = ", ".join(f"{name} {float(terms[name].detach()):.4g}" for name in bad)
                    stop_non_finite(f"loss term(s) {bad} ({values})", save=True)  # nothing has been updated by this batch
                try:
                    grad_norm = backward_and_step(terms["total"], optimizer, task.parameters(), grad_clip=config.grad_clip,
                                                  before_step=check_gradients)  # fmt: skip
                except RuntimeError as err:  # torch refuses a float32 update scaled beyond its range (lr ≳ 3e38 / 10)
                    if "without overflow" not in str(err):
                        raise
                    stop_non_finite("the optimiser step's update (it overflows float32)", save=False)  # some weights may be updated
                bad = nonfinite_names((name, p) for name, p in task.named_parameters() if p.requires_grad)
                if bad:  # the in-memory weights are lost; the checkpoint on disk is not touched
                    stop_non_finite(f"parameter(s) {_listed(bad)} after the optimiser step", save=False)
                scheduler.step()
                step += 1
                pm_skipped += pm_on and batch["size"] < PairMatchingLoss.MIN_PAIRS
                last = {name: value.item() for name, value in terms.items()}
                rate = batch["size"] * world / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix({**{k: f"{v:.3g}" for k, v in last.items()}, "img/s": f"{rate:.0f}"})
                if step % config.log_every == 0 or step == stop:
                    logger.log(step, {**last, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "samples_per_s": rate})
                interrupted = _any_rank(signals.received is not None, device)
                if step % config.checkpoint_every == 0 or step == stop or interrupted:
                    save_state()
                if interrupted:
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    logger.summary(_summary(config, read, student, step, total_steps, started, last, pm_skipped, single_skipped, loader, budget) | {"interrupted": name})
                    raise TrainingInterrupted(signals.received or signal.SIGTERM,
                                              f"{name} at step {step}: state saved to {checkpoint_path}; continue with --resume")  # fmt: skip
                if boundary is not None:
                    boundary.record()
                if step >= stop:
                    break
    finally:
        bar.close()
    # Nothing is left to save: a signal from here on stops the run where it lands (none is ever swallowed).
    signals.stop_at_once(f"after step {step}, the last: {checkpoint_path} holds the run; continue with --resume to finish it")
    if step >= total_steps:  # the run ends inside its last epoch (the loop broke out of it): its skip report and limit
        loader.end_epoch()
    if pm_skipped:
        warnings.warn(f"pair matching skipped on {pm_skipped} step(s) whose batch had fewer than {PairMatchingLoss.MIN_PAIRS} pairs "
                      "left after skipped samples", stacklevel=2)  # fmt: skip
    if single_skipped:
        warnings.warn(f"{single_skipped} batch(es) left with one sample after skipped samples were not trained on: the student's "
                      "BatchNorm cannot normalise a single value per channel at this image size", stacklevel=2)  # fmt: skip
    summary = _summary(config, read, student, step, total_steps, started, last, pm_skipped, single_skipped, loader, budget)
    if step >= total_steps and rank == 0:
        if hasattr(student, "recipe"):  # a converted CLIP keeps its format (its tokenizer is its original's)
            student.save(out_dir / "model.pt")
        else:
            save_checkpoint(student, out_dir / "model.pt", tokenizer=tokenizer_spec(tokenizer))
        if config.evaluate:
            logger.summary(summary)  # training is complete, whatever becomes of its evaluation
            signals.stop_at_once(f"during the final evaluation: training is complete (model in {out_dir / 'model.pt'}) but "
                                 "the evaluation did not finish; rerun with --resume to evaluate")  # fmt: skip
            try:
                summary["eval"] = evaluate_run(student, tokenizer, config)
                if not summary["eval"]:
                    summary["eval_note"] = nothing_evaluated(config)
                    print(summary["eval_note"], flush=True)
            except TrainingInterrupted as stopped:
                logger.summary(summary | {"interrupted": signal.Signals(stopped.signum).name, "interrupted_in": "evaluation"})
                raise
    logger.summary(summary)
    return summary


def _restore(state: dict, path: Path, task: TrainingTask, optimizer, scheduler, loader: ImageTextLoader) -> None:
    """Load a training checkpoint's state into this run's objects; a checkpoint of another model or batch size is refused."""
    try:
        task.load_trainable_state(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"checkpoint {path} does not fit this run ({first}): --resume continues a run with the model, "
                              "data and batch size it was started with; start over with --overwrite") from None  # fmt: skip


class StepBoundary:
    """What a checkpoint holds besides weights and optimiser state, as it stood after the last completed step: the
    loader's position, the RNG states and the module buffers (BatchNorm statistics and counters). A step's forward
    changes all three before its loss or gradients can be checked; a step that fails there saves these instead."""

    def __init__(self, task: TrainingTask, loader: ImageTextLoader) -> None:
        self.loader = loader
        self.buffers = [*task.student.buffers(), *task.objective.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]
        self.loader_state, self.rng = loader.state_dict(), rng_state()

    def record(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, [b.detach() for b in self.buffers])
        self.loader_state, self.rng = self.loader.state_dict(), rng_state()

    def restore(self) -> tuple[dict, dict]:
        """Put the buffers back; returns the loader state and RNG states of the boundary."""
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.copies)
        return self.loader_state, self.rng


def _summary(config: TrainConfig, read: dict, student, step: int, total_steps: int, started: float, last: dict, pm_skipped: int,
             single_skipped: int, loader: ImageTextLoader, budget: dict | None = None) -> dict:  # fmt: skip
    """The run's summary; with a compute budget also ``flops_per_step`` (all ranks), ``flops_spent`` (steps × that),
    ``budget_flops`` and ``epochs_run`` (steps ÷ batches per epoch). ``config`` holds the settings that applied
    (:func:`siclip.train.config.applied_settings`, not every field; a resumed run's as its checkpoint reconciled
    them) and ``data`` what was read (``read``, :func:`siclip.train.config.data_read`)."""
    summary = {"model": config.model, "steps": step, "total_steps": total_steps, "seconds": time.perf_counter() - started,
               "final_loss": last, "pm_skipped_steps": pm_skipped, "single_sample_batches": single_skipped, "skipped_samples": loader.skipped_total,
               "parameters": count_parameters_by_group(student), "sharing": _sharing_groups(student),
               "config": applied_settings(config), "data": read}  # fmt: skip
    if budget is not None:
        unmasked = budget.get("flops_per_unmasked_step", budget["flops_per_step"])
        spent = phase_flops(step, masked_steps(config, total_steps) if config.mask_ratio else step, budget["flops_per_step"], unmasked)
        summary |= {"flops_per_step": budget["flops_per_step"], "flops_spent": spent, "budget_flops": budget["budget_flops"],
                    "epochs_run": step / len(loader)}  # fmt: skip
        if unmasked != budget["flops_per_step"]:
            summary["flops_per_unmasked_step"] = unmasked
    return summary


def compute_budget(config: TrainConfig, task: TrainingTask, loader: ImageTextLoader, state: dict | None, *, device: torch.device,
                   bf16: bool, channels_last: bool, world: int) -> dict:  # fmt: skip
    """``{"flops_per_step", "budget_flops", "total_steps"}`` of a run with ``config.budget_tflops``
    (:mod:`siclip.train.budget`): the step cost measured on the run's first batches, or, on a resume, the one its
    checkpoint recorded (so the schedule is the one the run started with). A FLIP run that ends unmasked also measures
    an unmasked step (``flops_per_unmasked_step``; ``flops_per_step`` is then the masked one) and plans its steps with
    both costs (:func:`siclip.train.budget.phased_budget_steps`)."""
    if config.budget_measure_steps < 1:
        raise ValueError(f"budget_measure_steps must be at least 1, got {config.budget_measure_steps}")
    tuned = bool(task.token_dropout) and bool(config.unmasked_steps or config.unmasked_fraction)
    saved = (state or {}).get("budget")
    if saved is not None:
        per_step = float(saved["flops_per_step"])
        unmasked = float(saved.get("flops_per_unmasked_step", per_step))
    else:
        batches = first_batches(loader, config.budget_measure_steps)
        per_step = world * measure_step_flops(task, batches, device=device, bf16=bf16, channels_last=channels_last)
        unmasked = per_step
        if tuned:
            task.set_masking(False)
            try:
                unmasked = world * measure_step_flops(task, batches, device=device, bf16=bf16, channels_last=channels_last)
            finally:
                task.set_masking(True)
    budget_flops = config.budget_tflops * 1e12
    steps = phased_budget_steps(budget_flops, per_step, unmasked, lambda total: masked_steps(config, total) if tuned else total)
    return {"flops_per_step": per_step, "budget_flops": budget_flops, "total_steps": steps,
            **({"flops_per_unmasked_step": unmasked} if tuned else {})}


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _last_good(saved_step: int | None, checkpoint_path: Path) -> str:
    if saved_step is None:
        return "no checkpoint was written in this run"
    return f"the last good state (after step {saved_step}) is in {checkpoint_path}"


# How gloo and NCCL report a rank that died or a connection that broke (a RuntimeError unless torch says DistError).
_PEER_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset) by peer|broken pipe|timed? ?out", re.IGNORECASE)


def _peer_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(err, dist_error)) or (
        type(err) is RuntimeError and bool(_PEER_FAILURE.search(str(err))))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the ranks, so every rank stops (or carries on) together."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
