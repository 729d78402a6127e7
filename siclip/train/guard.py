"""What stops a run cleanly: non-finite values at a step boundary, and SIGINT/SIGTERM.

Both end the same way: the loop writes the last good state (never a non-finite one) and raises an
exception saying what happened and where that state is, so ``--resume`` continues from it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from siclip.errors import Interrupted, RunFailed


class NonFiniteLoss(RunFailed, FloatingPointError):
    """A loss term, a gradient or a parameter became NaN or Inf; the message names it and the last good checkpoint."""


class TrainingInterrupted(Interrupted):
    """SIGINT or SIGTERM stopped the run at a step boundary, after saving; ``exit_status`` is 128 + the signal."""


class PeerLost(RunFailed, RuntimeError):
    """A rank lost contact with the others (one stopped, or the connection broke); the message says where the state is."""

    def __init__(self, rank: int, err: BaseException, checkpoint: Path) -> None:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        kept = (f"the last checkpoint is {checkpoint}: continue with --resume" if checkpoint.exists()
                else "no checkpoint was written")  # fmt: skip
        super().__init__(f"rank {rank} lost contact with the other ranks ({first}): one of them stopped (its own output says "
                         f"why) or the connection failed; {kept}")  # fmt: skip


def nonfinite_names(named: Iterable[tuple[str, Tensor | None]]) -> list[str]:
    """Names of the tensors holding a NaN or ±Inf (``None`` entries are skipped).

    One fused max-abs reduction over all tensors, ``max|x|`` being finite iff every element is, then a
    per-tensor look only when something is wrong.
    """
    pairs = [(name, t) for name, t in named if t is not None and t.is_floating_point()]
    if not pairs:
        return []
    maxima = torch._foreach_norm([t.detach() for _, t in pairs], ord=float("inf"))
    if bool(torch.isfinite(torch.stack([m.float() for m in maxima])).all()):
        return []
    return [name for (name, _), m in zip(pairs, maxima) if not bool(torch.isfinite(m))]


def flatten_tensors(state, prefix: str = "") -> Iterable[tuple[str, Tensor]]:
    """``(dotted name, tensor)`` for every tensor in a nested dict/list state (a checkpoint payload)."""
    if isinstance(state, Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from flatten_tensors(value, f"{prefix}.{i}" if prefix else str(i))


class StopSignals:
    """Records SIGINT/SIGTERM instead of dying, so the loop can save at the next step boundary.

    The first signal restores the previous handlers: a second Ctrl-C interrupts at once. Outside the
    main thread (where Python cannot install handlers) nothing is installed and ``received`` stays None.
    Once there is nothing left to save (after the last step: writing the model, the final evaluation),
    :meth:`stop_at_once` makes a signal raise :class:`TrainingInterrupted` with the caller's message where it lands.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._at_once: str | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def stop_at_once(self, message: str) -> None:
        """From now on a signal raises ``TrainingInterrupted("SIGNAME " + message)`` at once; one already received does so now."""
        self._at_once = message
        if self.received is not None:
            self._raise(self.received)

    def _raise(self, signum: int) -> None:
        self._restore()
        raise TrainingInterrupted(signum, f"{signal.Signals(signum).name} {self._at_once}")

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        if self._at_once is not None:
            self._raise(signum)
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
