"""Loading with exact mid-epoch resume, on torchdata's ``StatefulDataLoader``.

Every sample is a pure function of (seed, epoch, index) and :class:`EpochSampler` orders indices by a
permutation seeded by (seed, epoch). The resume state is therefore small and independent of the
worker count: the epoch and the number of batches the loader has handed out. After
``load_state_dict()`` the sampler starts at exactly the next unseen index, so the run continues
with the batches the original would have yielded, with 0, 2 or any other number of workers.
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from siclip.errors import RunFailed

from .dataset import ImageTextDataset, Skipped, collate_samples

log = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """``(epoch, index)`` pairs: a seeded permutation per epoch (or the identity), split across ranks.

    Each rank takes every ``world_size``-th index of the permutation; the tail that does not divide
    evenly is dropped, so every rank sees the same number of samples (as DDP needs). ``start`` skips
    the first indices of the next iteration only (a resumed epoch).

    ``group_size = g > 1`` permutes groups of ``g`` consecutive indices ``[g·j, g·j + g)`` instead, each
    group staying whole, in order and on one rank: with a batch size divisible by ``g`` a group is never
    split across batches (the embedded world's shape twins, which must meet as each other's negatives).
    """

    def __init__(
        self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, group_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        if size // group_size < world_size:
            raise ValueError(f"{size} samples in groups of {group_size} cannot be split over {world_size} ranks")
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.group_size = group_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> np.ndarray:
        groups = self.size // self.group_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(groups) if self.shuffle else np.arange(groups)
        per_rank = groups // self.world_size
        mine = perm[self.rank : per_rank * self.world_size : self.world_size]
        return (mine[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)

    def __len__(self) -> int:
        return self.size // self.group_size // self.world_size * self.group_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.start
        self.start = 0
        for index in self.order(epoch)[start:]:
            yield epoch, int(index)


@dataclass
class SkipReport:
    """Samples skipped in one epoch, with their keys and reasons."""

    epoch: int
    skipped: list[Skipped] = field(default_factory=list)
    source_problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        if not self.skipped and not self.source_problems:
            return f"epoch {self.epoch}: no sample skipped"
        reasons = Counter(s.reason.split(" (")[0] for s in self.skipped)
        lines = [f"epoch {self.epoch}: skipped {self.count} samples ({dict(reasons)})"]
        lines += [f"  {s.key}: {s.reason}" for s in self.skipped[:20]]
        if self.count > 20:
            lines.append(f"  … and {self.count - 20} more")
        lines += [f"  unreadable in the source: {where}: {why}" for where, why in self.source_problems]
        return "\n".join(lines)


class TooManySkipped(RunFailed, ValueError):
    """An epoch yielded no sample, or skipped more than the allowed fraction; the message is the skip report."""


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches the workers too (one process group); only the main process decides when to stop (the
    training loop saves at the next step boundary), so a worker must not die from it mid-epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ImageTextLoader:
    """Batches of an :class:`ImageTextDataset`, one epoch per ``iter()``, resumable mid-epoch.

    ``state_dict()`` holds the epoch, the batches handed out in it and the samples skipped so far;
    after ``load_state_dict()`` iteration continues with exactly the batches the original run would
    have produced next. Batches whose samples were all skipped are not yielded. A state is taken
    between batches (the training loop saves it with its checkpoint, after an optimiser step).

    An epoch that yields no sample at all, or skips more than ``max_skip_fraction`` of the samples it
    reads (None: no limit), raises :class:`TooManySkipped` with the epoch's skip report when it ends, so
    bad data stops a run instead of spinning through empty epochs. A caller that stops inside an epoch for
    good (a run's last step) calls :meth:`end_epoch`, so its report and limits still apply to what was read;
    ``skipped_total`` counts the samples skipped in every epoch so far (resumed runs included).
    """

    def __init__(
        self,
        dataset: ImageTextDataset,
        batch_size: int,
        *,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        prefetch_factor: int = 2,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        max_skip_fraction: float | None = None,
        group_size: int = 1,
    ) -> None:
        if batch_size % group_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of group_size {group_size}, or groups are split across batches")
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1] or None, got {max_skip_fraction}")
        self.dataset, self.batch_size, self.max_skip_fraction = dataset, batch_size, max_skip_fraction
        self.sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, group_size=group_size)
        with warnings.catch_warnings():  # torchdata calls a torch function torch deprecated, and says so on every run
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            self.loader = StatefulDataLoader(
                dataset,
                batch_size=batch_size,
                sampler=self.sampler,
                num_workers=num_workers,
                collate_fn=collate_samples,
                drop_last=drop_last,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                pin_memory=pin_memory,
                worker_init_fn=_ignore_sigint if num_workers > 0 else None,
            )
        self.epoch = 0
        self._batches = 0  # batches of the current epoch handed out (or skipped whole)
        self._skipped: list[Skipped] = []
        self._skipped_before = 0  # in the epochs before the current one
        self.reports: list[SkipReport] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        self.sampler.set_epoch(self.epoch, self._batches * self.batch_size)
        for batch in self.loader:
            self._batches += 1
            self._skipped.extend(batch.pop("skipped"))
            if batch["size"]:
                yield batch
        self.end_epoch()

    @property
    def skipped_total(self) -> int:
        """Samples skipped in all epochs so far, the current one included."""
        return self._skipped_before + len(self._skipped)

    def end_epoch(self) -> SkipReport:
        """Close the current epoch where it stands: log its skip report, move to the next epoch, then raise
        :class:`TooManySkipped` if the samples read in it (``batches × batch_size``, at most the epoch) were all
        skipped or more than ``max_skip_fraction`` of them were. Iteration calls it when an epoch runs out."""
        problems = list(getattr(self.dataset.source, "problems", []))
        report = SkipReport(self.epoch, self._skipped, problems)
        read = min(self._batches * self.batch_size, len(self.sampler.order(self.epoch)))
        self.reports.append(report)
        if report.skipped or problems:
            log.warning("%s", report)
        self.epoch += 1
        self._batches = 0
        self._skipped_before += len(self._skipped)
        self._skipped = []
        if read and report.count >= read:
            raise TooManySkipped(f"every one of the {read} samples read in the epoch was skipped; nothing to train on.\n{report}")
        if read and self.max_skip_fraction is not None and report.count > self.max_skip_fraction * read:
            raise TooManySkipped(f"{report.count} of the {read} samples read in the epoch were skipped, more than the allowed "
                                 f"fraction {self.max_skip_fraction} (DataConfig.max_skip_fraction, --max-skip-fraction).\n{report}")  # fmt: skip
        return report

    @property
    def last_report(self) -> SkipReport | None:
        return self.reports[-1] if self.reports else None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "batch_size": self.batch_size,
            "skipped": [(s.index, s.key, s.reason) for s in self._skipped],
            "skipped_before": self._skipped_before,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"the saved loader state is for batch size {state['batch_size']}, not {self.batch_size}")
        self.epoch, self._batches = int(state["epoch"]), int(state["batches"])
        self._skipped = [Skipped(*s) for s in state["skipped"]]
        self._skipped_before = int(state.get("skipped_before", 0))  # absent from checkpoints written before it was counted
