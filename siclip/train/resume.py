"""What a run finds in its output directory: a fresh start, a run to continue, or one it must not overwrite.

    check_run_directory(out_dir, resume=False, overwrite=False)   # refuses a directory holding a run; deletes nothing
    ...                                                           # the run's inputs are read and checked
    clear_run_directory(out_dir, resume=False, overwrite=False)   # only then: leftovers and (overwrite) the old run go
    config = reconcile_resumed_config(config, checkpoint["config"], path)
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

from .config import TrainConfig

RUN_FILES = ("checkpoint.pt", "metrics.csv", "summary.json", "model.pt")
# The optimiser's hyper-parameters live in its state: a resumed run uses the checkpoint's values.
OPTIMIZER_FIELDS = ("lr", "weight_decay", "betas", "eps")
# Settings that change neither the weights nor the schedule, free to differ on a resume (a resumed budget reuses the
# checkpoint's measurement of a step, whatever budget_measure_steps now says).
FREE_ON_RESUME = {"out_dir", "log_every", "checkpoint_every", "evaluate", "eval_zero_shot_per_class", "eval_retrieval_images",
                  "device", "dist_timeout", "compile", "data.workers", "data.max_skip_fraction", "budget_measure_steps"}  # fmt: skip


def _run_files(out_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def check_run_directory(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one unless ``resume`` or ``overwrite``; deletes nothing, so a run
    refused later for its inputs leaves the old one whole."""
    found = _run_files(out_dir)
    if found and not (resume or overwrite):
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume to continue it "
                              "or --overwrite to delete it and start over")  # fmt: skip


def clear_run_directory(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """After the inputs passed their checks: drop the temporary files a killed run left (the caller holds the
    directory's lock, so no writer owns them) and, with ``overwrite``, the old run's own files: :data:`RUN_FILES`
    and TensorBoard's event files. Nothing else in ``out_dir`` is touched (a run writes beside what is there, and
    ``eval/`` records are replaced when the new run evaluates the same sets)."""
    check_run_directory(out_dir, resume=resume, overwrite=overwrite)
    for tmp in [*out_dir.glob(".*.tmp"), *out_dir.glob("*.pt.tmp")]:
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    if resume:
        return
    for name in _run_files(out_dir):
        (out_dir / name).unlink()
    board = out_dir / "tensorboard"
    if board.is_dir() and not board.is_symlink():
        for events in board.glob("events.out.tfevents.*"):
            events.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            board.rmdir()  # only when nothing else is in it


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "model_overrides":
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def reconcile_resumed_config(config: TrainConfig, saved: dict, path: Path) -> TrainConfig:
    """The configuration a resumed run really trains with, warning about every setting that differs from the
    checkpoint's: optimiser settings come from the checkpoint (its state holds them), the rest from ``config``."""
    new, old = _flat(dataclasses.asdict(config)), _flat(saved)
    kept = {}
    for name in sorted(set(new) & set(old)):
        if new[name] == old[name] or name in FREE_ON_RESUME:
            continue
        if name in OPTIMIZER_FIELDS:
            kept[name] = tuple(old[name]) if isinstance(old[name], list) else old[name]
            used = f"the run continues with the checkpoint's {old[name]} (the optimiser state holds it); start a new run to change it"
        else:
            used = f"this run uses {new[name]}"
        warnings.warn(f"--resume: {name} is {new[name]} but {path} was written with {old[name]}; {used}", stacklevel=3)
    return dataclasses.replace(config, **kept)
