"""Training state on disk: atomic checkpoints with everything an exact resume needs, and metric logs."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(payload: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename: never half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_training_checkpoint(path: Path) -> dict:
    # Optimiser and RNG states hold numpy and Python objects, so this file is not weights-only; it is
    # the run's own file, written by save_atomic.
    return torch.load(path, map_location="cpu", weights_only=False)


class MetricsLogger:
    """Rows of metrics to ``metrics.csv`` (and TensorBoard when installed); the run summary to JSON."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.path = out_dir / "metrics.csv"
        self._writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self._writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name, value, step)

    def summary(self, data: dict) -> Path:
        path = self.out_dir / "summary.json"
        if self.enabled:
            path.write_text(json.dumps(data, indent=1, default=str))
        return path
