"""Model snapshots through a run, for analyses of how training changes a model (e.g. block divergences).

The loop's exact resume makes a run trained in segments (``train(..., resume=True, max_steps=k)`` for
growing ``k``) the same run as one trained in one go, so snapshots need no hook in the loop: after each
segment the student's weights are read from the run's checkpoint and saved as a model checkpoint.

    paths = train_with_snapshots(config, steps=[0, 50, 100, 200])   # {step: out_dir/snapshots/step_000050.pt}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from siclip.models import save_checkpoint

from .config import TrainConfig
from .loop import build_task, train_or_continue
from .state import load_training_checkpoint


def student_from_checkpoint(config: TrainConfig):
    """The student as the run's ``checkpoint.pt`` holds it, rebuilt as :func:`build_task` builds it (so a
    sharing plan chosen by divergence is measured again on the teacher, where ``load_checkpoint`` could not)."""
    state = load_training_checkpoint(Path(config.out_dir) / "checkpoint.pt")
    student = build_task(config).student
    student.load_state_dict(state["task"]["student"])
    return student


def snapshot_path(config: TrainConfig, step: int) -> Path:
    return Path(config.out_dir) / "snapshots" / f"step_{step:06d}.pt"


def train_with_snapshots(config: TrainConfig, steps: list[int], *, progress: bool = False) -> dict[int, Path]:
    """Train ``config`` to its end, saving the student at each of ``steps`` (0: at initialisation).

    Resumable: snapshots already on disk are kept and the run continues from its checkpoint.
    Returns ``{step: snapshot path}``; steps past the run's end are an error.
    """
    steps = sorted(set(steps))
    if steps and steps[0] < 0:
        raise ValueError(f"snapshot steps must be ≥ 0, got {steps[0]}")
    paths = {}
    for step in steps:
        path = snapshot_path(config, step)
        if not path.exists():
            if step == 0:
                torch.manual_seed(config.seed)  # as train() does before building the task: the same initial weights
                save_checkpoint(build_task(config).student, path)
            else:
                summary = train_or_continue(config, max_steps=step, progress=progress)
                if summary["steps"] < step:
                    raise ValueError(f"snapshot at step {step} asked of a run of {summary['total_steps']} steps ({config.out_dir})")
                save_checkpoint(student_from_checkpoint(config), path)
        paths[step] = path
    summary_path = Path(config.out_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or summary["steps"] < summary["total_steps"]:
        train_or_continue(config, progress=progress)  # the rest of the run, its model and evaluation
    return paths
