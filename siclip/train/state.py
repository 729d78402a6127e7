"""Training state on disk: atomic checkpoints with everything an exact resume needs, metric logs, and the
run directory's lock.

Checkpoints hold only tensors and plain Python values (RNG states included), so they load with
``torch.load(weights_only=True)``: resuming never runs code from the file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from siclip.errors import UserError
from siclip.storage import CheckpointError, atomic_write, load_weights, save_atomic, write_text_atomic

__all__ = ["CHECKPOINT_KEYS", "CheckpointError", "MetricsLogger", "RunDirectoryBusy", "RunLock", "load_training_checkpoint", "rng_state",
           "save_atomic", "set_rng_state"]  # fmt: skip

CHECKPOINT_KEYS = ("task", "optimizer", "scheduler", "loader", "rng", "step")


class RunDirectoryBusy(UserError, RuntimeError):
    """Another process holds the run directory's lock."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (what a weights-only load accepts).

    numpy's Mersenne Twister state ``(name, keys[624], pos, has_gauss, gauss)`` keeps its keys as an int64
    tensor; Python's ``random`` state is a tuple of ints already.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},  # fmt: skip
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINING_CHECKPOINT_HINT = "restore it from a copy, or start the run over with --overwrite"


def load_training_checkpoint(path: Path) -> dict:
    """The payload :func:`~siclip.storage.save_atomic` wrote, loaded weights-only (:func:`~siclip.storage.load_weights`);
    :class:`CheckpointError` naming ``path`` when the file is empty, damaged, not a checkpoint, or would run code."""
    state = load_weights(path, what="checkpoint", hint=TRAINING_CHECKPOINT_HINT)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        have = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a training checkpoint: it needs {list(CHECKPOINT_KEYS)}, has {have}; {TRAINING_CHECKPOINT_HINT}")
    return state


class RunLock:
    """An exclusive ``flock`` on ``out_dir/.lock`` for the life of a run; the file names the holder's PID.

    The kernel drops the lock when its process dies (even by SIGKILL), so a crashed run never leaves a
    stale lock behind; a run that ends through :meth:`release` (finished, refused, interrupted) removes the file,
    so a finished run's folder holds only what the run wrote for its user.
    """

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / ".lock"
        while True:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(self._fd)
                raise RunDirectoryBusy(f"run directory {out_dir} is in use by another run (PID {holder}); "
                                       "wait for it to finish or choose another output directory") from None  # fmt: skip
            try:  # the file locked is still the one at the path, not one a run ending meanwhile removed
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, *, remove_empty: bool = False) -> None:
        """Remove the lock file (still holding the lock, so no other run can take this one) and unlock;
        ``remove_empty``: also the directory when nothing else is in it (a run refused before it wrote anything
        leaves no trace)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            if remove_empty and not any(self.path.parent.iterdir()):
                with contextlib.suppress(OSError):  # someone put a file there meanwhile: keep the directory
                    self.path.parent.rmdir()
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class MetricsLogger:
    """Rows of metrics to ``metrics.csv`` (and TensorBoard when installed); the run summary to JSON.

    ``resume_step``: the step of the checkpoint a run resumes from; rows logged after it (by the run that
    stopped) are dropped, so the resumed run's rows are not written twice.
    """

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.path = out_dir / "metrics.csv"
        self._writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._drop_rows_after(resume_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                self._writer = None

    def _drop_rows_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        if len(kept) == len(rows):
            return
        with atomic_write(self.path, "w") as f:
            csv.writer(f).writerows(kept)

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
            write_text_atomic(json.dumps(data, indent=1, default=str), path)
        return path
