"""When distillation pays: the method ladder across student training-set sizes, and the rows the ablation left open.

Design (``experiments/data_scale.py`` runs it; :mod:`siclip.analysis.ablation` trains and evaluates each run):

- one MobileCLIP-tiny **teacher** on world 0, as in the ablation;
- **the grid**: SiCLIP-tiny students on N ∈ ``sizes`` pairs of world 1, each for the same number of optimiser steps
  (``epochs = steps · batch / N``: a small set is seen many times, the largest once), in five rows:
  baseline (from scratch, CLIP loss), KD only (from scratch, FD + RD + ICL from the teacher), +WI, +WIKD, +WIKD+PM;
- **the open rows**, at one size (``open_size``), beside the grid's rows there: the inherited parts trainable at
  a lower lr (+WI, +WIKD), both towers converted with the image attention blocks shared (W_Q, W_K, as SiCLIP-S0)
  or unshared, and +WIKD / +WIKD+PM with 1 and 3 synthetic captions per image (the grid has 5);
- every run evaluated on the same items (1,000 zero-shot images, 1,000 retrieval images with 5 captions), over
  ``seeds`` training seeds; mean ± std [95 % two-level bootstrap interval] per row and N, and paired differences
  (same seeds, same items) for the comparisons below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from siclip.distill import ObjectiveConfig

from .ablation import CLIP_ONLY, AblationPreset, Row, markdown_tables
from .figures import pyplot, save_figure

KD = ObjectiveConfig(pair_matching=0)  # FD + RD + ICL, no pair matching
WIKD_PM = ObjectiveConfig()

GRID_ROWS = [
    Row("baseline", False, CLIP_ONLY),
    Row("KD only", False, KD),
    Row("+WI", True, CLIP_ONLY),
    Row("+WIKD", True, KD),
    Row("+WIKD+PM", True, WIKD_PM),
]
GRID_COMPARISONS = [
    ("+WI", "baseline", "weight inheritance"),
    ("KD only", "baseline", "distillation without inheritance"),
    ("+WIKD", "+WI", "distillation on top of inheritance"),
    ("+WIKD+PM", "+WIKD", "pair matching"),
]
TRAINABLE_LR = 0.1  # the inherited parts' lr factor when they train
OPEN_ROWS = [
    Row("+WI trainable", True, CLIP_ONLY, freeze="none", inherited_lr_scale=TRAINABLE_LR),
    Row("+WIKD trainable", True, KD, freeze="none", inherited_lr_scale=TRAINABLE_LR),
    Row("+WIKD+PM both towers", True, WIKD_PM, convert=("text", "image")),
    Row("+WIKD+PM both towers, image unshared", True, WIKD_PM, convert=("text", "image"), image_sharing="none"),
    Row("+WIKD 3 captions", True, KD, num_synthetic=3),
    Row("+WIKD+PM 3 captions", True, WIKD_PM, num_synthetic=3),
    Row("+WIKD 1 caption", True, KD, num_synthetic=1),
    Row("+WIKD+PM 1 caption", True, WIKD_PM, num_synthetic=1),
]
OPEN_COMPARISONS = [
    ("+WI trainable", "+WI", "inherited parts trainable (lr ×0.1) over frozen, WI"),
    ("+WIKD trainable", "+WIKD", "inherited parts trainable (lr ×0.1) over frozen, WIKD"),
    ("+WIKD trainable", "+WI trainable", "distillation with the inherited parts trainable"),
    ("+WIKD+PM both towers, image unshared", "+WIKD+PM", "converting the image tower (unshared) over text only"),
    ("+WIKD+PM both towers", "+WIKD+PM both towers, image unshared", "sharing the image attention (W_Q, W_K)"),
    ("+WIKD+PM 1 caption", "+WIKD 1 caption", "pair matching, 1 synthetic caption"),
    ("+WIKD+PM 3 captions", "+WIKD 3 captions", "pair matching, 3 synthetic captions"),  # 5 captions: the grid's "pair matching"
    ("+WIKD+PM", "+WIKD+PM 1 caption", "5 synthetic captions over 1, WIKD+PM"),
]


@dataclass(frozen=True)
class DataScalePreset:
    """The teacher and evaluation of an ablation preset, the student sizes and their common number of steps."""

    base: AblationPreset
    sizes: tuple[int, ...]
    steps: int  # optimiser steps of every student
    open_size: int | None  # N at which the open rows run (one of sizes; None: no open rows)

    def __post_init__(self) -> None:
        for n in self.sizes:
            if (self.steps * self.base.batch) % n or n % self.base.batch:
                raise ValueError(f"N = {n} must divide {self.steps} steps × batch {self.base.batch} and be a multiple of the batch")
        if self.open_size is not None and self.open_size not in self.sizes:
            raise ValueError(f"open_size {self.open_size} is not one of the sizes {self.sizes}")

    def epochs(self, n: int) -> int:
        """Epochs over N pairs that make ``steps`` optimiser steps."""
        return self.steps * self.base.batch // n


PRESETS = {
    # CI: every cell runs and writes its outputs, a few steps each.
    "smoke": DataScalePreset(AblationPreset(teacher_samples=128, teacher_epochs=1, student_samples=0, student_epochs=0, seeds=1,
                                            eval_per_class=1, eval_images=32, batch=32, warmup_steps=1, image_size=32),
                             sizes=(32, 64), steps=4, open_size=64),
    # 2 CPU cores: the ablation's teacher (640 steps at 96 px; at 64 px it reached only 20 % top-1, against 71.5 %) and
    # 84 students of 128 steps, one epoch at 16k pairs.
    "cpu": DataScalePreset(AblationPreset(teacher_samples=81_920, teacher_epochs=1, student_samples=0, student_epochs=0, seeds=3,
                                          eval_per_class=10, eval_images=1000, batch=128),
                           sizes=(256, 1024, 4096, 16_384), steps=128, open_size=4096),
    # One H100 (16 host cores, --workers 12), about 10 minutes (estimated): students of 512 steps at batch 512,
    # from 1k to 256k pairs.
    "gpu": DataScalePreset(AblationPreset(teacher_samples=204_800, teacher_epochs=2, student_samples=0, student_epochs=0, seeds=3,
                                          eval_per_class=10, eval_images=1000, batch=512, teacher_lr=4e-3, student_lr=4e-3),
                           sizes=(1024, 4096, 16_384, 65_536, 262_144), steps=512, open_size=16_384),
}  # fmt: skip


def cells(preset: DataScalePreset) -> list[tuple[int, Row]]:
    """Every (N, row) of the study, in run order: the grid by increasing N, then the open rows."""
    grid = [(n, row) for n in preset.sizes for row in GRID_ROWS]
    return grid + ([(preset.open_size, row) for row in OPEN_ROWS] if preset.open_size is not None else [])


def run_name(n: int, row: Row, seed: int) -> str:
    return f"n{n}_{row.slug}_seed{seed}"


def tables_by_size(frames: dict[int, tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One rows table and one differences table with an ``N`` column, from ``{N: (rows, differences)}``."""
    rows = pd.concat([f[0].assign(N=n) for n, f in frames.items()], ignore_index=True)
    differences = pd.concat([f[1].assign(N=n) for n, f in frames.items() if len(f[1])], ignore_index=True)
    return rows, differences


def markdown_by_size(frames: dict[int, tuple[pd.DataFrame, pd.DataFrame]], preset: DataScalePreset) -> str:
    """A section per N: the rows and their paired differences (:func:`~siclip.analysis.ablation.markdown_tables`)."""
    parts = []
    for n, (rows, differences) in frames.items():
        parts.append(f"### N = {n:,} pairs ({preset.epochs(n)} epochs of {preset.steps} steps)\n\n" + markdown_tables(rows, differences))
    return "\n".join(parts)


def plot_scale(rows: pd.DataFrame, path: Path, teacher: pd.Series | None = None) -> Path:
    """Zero-shot top-1 and both R@1 against N (log scale): a line per grid row, its 95 % interval as a band;
    the teacher as a dashed line."""
    plt = pyplot()
    metrics = {"zeroshot_top1": "zero-shot top-1 (%)", "image_to_text_R@1": "I→T R@1 (%)", "text_to_image_R@1": "T→I R@1 (%)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.3))
    grid = rows[rows["row"].isin([r.name for r in GRID_ROWS])]
    for ax, (metric, label) in zip(axes, metrics.items()):
        for name in [r.name for r in GRID_ROWS]:
            line = grid[grid["row"] == name].sort_values("N")
            if line.empty:
                continue
            (drawn,) = ax.plot(line["N"], 100 * line[metric], marker="o", label=name)
            ax.fill_between(line["N"], 100 * line[f"{metric}_low"], 100 * line[f"{metric}_high"], color=drawn.get_color(), alpha=0.18)
        if teacher is not None:
            ax.axhline(100 * teacher[metric], color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(grid["N"].unique()), [f"{n:,}" for n in sorted(grid["N"].unique())])
        ax.set_xlabel("student training pairs N (equal steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SiCLIP-tiny students against training-set size: mean over seeds, 95 % intervals as bands")
    fig.tight_layout()
    return save_figure(fig, path)


def preset_record(name: str, preset: DataScalePreset) -> dict:
    return {"preset": name, **dataclasses.asdict(preset)}


def total_samples(preset: DataScalePreset) -> int:
    """Student training samples the study draws in all (each run draws ``steps × batch``)."""
    return len(cells(preset)) * preset.base.seeds * preset.steps * preset.base.batch


__all__ = ["GRID_ROWS", "GRID_COMPARISONS", "OPEN_ROWS", "OPEN_COMPARISONS", "PRESETS", "DataScalePreset", "cells", "run_name",
           "tables_by_size", "markdown_by_size", "plot_scale", "preset_record", "total_samples"]  # fmt: skip
