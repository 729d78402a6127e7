"""The scaling-down study: do *Scaling (Down) CLIP*'s claims hold at equal compute, where does SiCLIP sit, when does a
teacher hurt?

Every cell is a training run on the student world (world 1) of a budget in training FLOPs (``budget_tflops``: the steps
follow from the measured FLOPs of one step, :mod:`siclip.train.budget`), evaluated on the same held-out items of world 0
(``eval_per_class`` × 100 zero-shot images and ``eval_images`` retrieval images with 5 captions each: 1,000 + 1,000 in
``cpu`` and ``gpu``, fixed whatever N, noise or strategy), over ``seeds`` training seeds. The claims (issue 31):

1. **quality over quantity** — in a noisy world (``caption_noise`` 0.5 of the pairs carry another scene's captions), the
   half kept by the teacher's CLIP score (:mod:`siclip.data.quality`) against the whole noisy set and against a random
   half, at one budget;
2. **architecture follows data** — CNN, ViT-tiny, ViT-small image towers at N ∈ ``sizes`` at one budget;
3. **strategy follows compute** — CLIP, SLIP, FLIP (mask 0.5), CLIP+DA (``da_policy`` + EDA 0.1) on ViT-tiny at ``budgets``;
4. **CLIP+DA on half the data matches CLIP on all of it** (inside ±2 points);
5. **SiCLIP's own row** — a SiCLIP-tiny student with WI + WIKD from the teacher (its FLOPs include the teacher's forward),
   at the budgets of 3 and the sizes of 2;
6. **teacher quality** — KD from three teachers (an early checkpoint of the teacher, the teacher, a wider teacher) against
   the same student alone, at equal steps, and two remedies on the weakest teacher: the distillation weights × 0.25, and
   weights that fade linearly to 0 (``ObjectiveConfig.distill_schedule``).

Readings where the papers are silent (said here, kept behind preset fields where cheap):

- Verdicts are read on zero-shot top-1 (both R@1 are tabled beside it) from paired differences (same seeds, same items)
  with two-level bootstrap 95 % intervals (:mod:`siclip.analysis.stats`): ``a`` beats ``b`` *holds* when the interval of
  a − b lies above 0, *fails* when it lies below 0, else *not resolved* (:func:`beats`); "matches" (claim 4) holds when the
  interval lies inside ±``match_margin``, fails when it lies wholly outside it (the direction said), else not resolved.
- Claim 1's cells train without shape twins (a subset of the world would separate twins; ``DataConfig.shape_twins``),
  its halves are the filter's kept indices and a seeded random draw of as many indices; at equal compute a half is
  seen twice as often.
- Claim 6 compares at equal optimiser steps (``kd_steps``), not equal FLOPs: the question is the teacher's quality, and a
  wider teacher's forward would otherwise buy fewer steps. Its students learn from scratch (``inherit=False``: the wide
  teacher's weights do not fit a SiCLIP-tiny student), so the only change between rows is the teacher.
- The ViT towers see the teacher's ``image_size`` with patches of ``image_size / 8`` pixels (their presets' 8 × 8 grid),
  so a larger input does not change a ViT's token count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from siclip.data import AUGMENT_POLICIES, EmbeddedConfig, EmbeddedSource
from siclip.data.quality import noise_report, score_pairs, select_pairs, write_indices
from siclip.data.tokenizer import tokenizer_for
from siclip.distill import ObjectiveConfig
from siclip.eval.run import image_encoder, text_encoder
from siclip.models import load_checkpoint
from siclip.storage import write_text_atomic
from siclip.train import TrainConfig

from .ablation import (
    CLIP_ONLY, METRICS, STUDENT_WORLD, AblationPreset, evaluate_on_shared_items, markdown_tables, summarize, world_data, world_model,
)  # fmt: skip
from .figures import pyplot, save_figure
from .stats import Estimate

KD = ObjectiveConfig(pair_matching=0)  # FD + RD + ICL: WIKD's distillation terms
STRATEGIES = ("CLIP", "SLIP", "FLIP", "CLIP+DA")
TOWERS = ("cnn_tiny", "vit_tiny", "vit_small")
SICLIP = "SiCLIP (WI+WIKD)"
VERDICTS = ("holds", "fails", "not resolved")
CHANCE = 0.01  # zero-shot top-1 of a guess among the embedded world's 100 classes


@dataclass(frozen=True)
class ScalingDownPreset:
    """Sizes of the study: the teachers and evaluation (``base``, the ablation's), the budgets and sizes of the grid."""

    base: AblationPreset
    budgets: tuple[float, ...]  # TFLOPs of claims 3 and 5
    sizes: tuple[int, ...]  # training pairs N of claims 2 and 5
    budget: float  # TFLOPs of claims 1, 2 and 4 (one of ``budgets``: its cells are shared)
    n: int  # training pairs of claims 1, 3, 4 and 6 (one of ``sizes``), the noisy world's size in claim 1
    kd_steps: int  # optimiser steps of every claim-6 student
    student_batch: int = 64  # pairs per student step (the teacher's: base.batch); smaller, so a small budget still takes steps
    caption_noise: float = 0.5
    keep_fraction: float = 0.5
    early_fraction: float = 0.125  # the early teacher: its checkpoint after this fraction of the teacher's steps
    wide: dict = field(default_factory=lambda: {"embed_dim": 192, "image": {"dims": [24, 48, 96, 192]}, "text": {"width": 192, "heads": 6}})
    kd_low: float = 0.25  # claim 6's lower distillation weight (× λ1, λ2, λ3)
    text_augment: float = 0.1  # CLIP+DA's EDA rate
    # CLIP+DA's image policy: "mild" keeps the colours and most of the scene a caption names; "strong" (SimCLR's) collapsed
    # to chance at 4 TFLOPs on the embedded world (experiments/RESULTS.md, claim 4's first run)
    da_policy: str = "mild"
    mask_ratio: float = 0.5  # FLIP's
    match_margin: float = 0.02  # claim 4: "matches" inside ± this (fraction; 2 points)

    def __post_init__(self) -> None:
        if self.budget not in self.budgets or self.n not in self.sizes:
            raise ValueError(f"budget {self.budget} must be one of {self.budgets} and n {self.n} one of {self.sizes}")
        if self.da_policy not in AUGMENT_POLICIES:
            raise ValueError(f"da_policy {self.da_policy!r} is not an augmentation policy; choose one of {AUGMENT_POLICIES}")
        for n in (*self.sizes, self.n // 2, round(self.keep_fraction * self.n)):
            if n < self.student_batch:
                raise ValueError(f"{n} training pairs make no batch of {self.student_batch}")

    @property
    def early_step(self) -> int:
        return max(1, round(self.early_fraction * self.base.teacher_epochs * (self.base.teacher_samples // self.base.batch)))


PRESETS = {
    # CI: every claim's cells, a few steps each (a ViT-tiny step at 32 px and batch 16 costs ~0.01 TFLOPs), 16 retrieval images.
    "smoke": ScalingDownPreset(AblationPreset(teacher_samples=64, teacher_epochs=1, student_samples=0, student_epochs=0, seeds=2,
                                              eval_per_class=1, eval_images=16, batch=16, warmup_steps=1, image_size=32),
                               budgets=(0.02, 0.04), sizes=(32, 64), budget=0.04, n=64, kd_steps=2, student_batch=16,
                               wide={"embed_dim": 64, "image": {"dims": [8, 16, 32, 64]}, "text": {"width": 64, "heads": 2}}),
    # A quiet 2-core CPU: 1 h 37 min measured for all six claims (experiments/RESULTS.md): the ablation's teacher (640 steps
    # at 96 px) and a 1.5× wider one, 105 student runs of 3 seeds, each evaluated on the 1,000 + 1,000 shared items.
    "cpu": ScalingDownPreset(AblationPreset(teacher_samples=81_920, teacher_epochs=1, student_samples=0, student_epochs=0, seeds=3,
                                            eval_per_class=10, eval_images=1000, batch=128),
                             budgets=(2.0, 4.0, 8.0), sizes=(1024, 4096, 16_384), budget=4.0, n=4096, kd_steps=64),
    # One H100 (16 host cores, --workers 12), for a user's shards the same grid at 50× the compute (not yet run): budgets
    # 100–400 TFLOPs, N up to 256k pairs, a 2× wider teacher.
    "gpu": ScalingDownPreset(AblationPreset(teacher_samples=204_800, teacher_epochs=2, student_samples=0, student_epochs=0, seeds=3,
                                            eval_per_class=10, eval_images=1000, batch=512, teacher_lr=4e-3, student_lr=4e-3),
                             budgets=(100.0, 200.0, 400.0), sizes=(16_384, 65_536, 262_144), budget=200.0, n=65_536, kd_steps=512, student_batch=256,
                             wide={"embed_dim": 256, "image": {"dims": [32, 64, 128, 256]}, "text": {"width": 256, "heads": 8}}),
}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One training run of the study (before its seed): a strategy on an image tower, N pairs of a world, a budget.

    ``strategy``: one of :data:`STRATEGIES` (a CLIP with ``tower``), :data:`SICLIP` (WI + WIKD from the teacher), "alone"
    (the SiCLIP-tiny student from scratch, CLIP loss) or "KD" (from scratch, distilling from ``teacher`` with the weights
    × ``kd_weight`` and ``kd_schedule``). ``data``: "clean", "noisy", "filtered" or "random" (the halves of the noisy
    world). ``budget`` None: ``steps`` optimiser steps instead of a FLOP budget."""

    strategy: str
    tower: str
    n: int
    budget: float | None
    steps: int | None = None
    data: str = "clean"
    teacher: str | None = None  # "teacher", "early", "wide"
    kd_weight: float = 1.0
    kd_schedule: str = "constant"

    @property
    def slug(self) -> str:
        length = f"b{self.budget:g}" if self.budget is not None else f"s{self.steps}"
        parts = [self.strategy.split(" ")[0].replace("+", "plus"), self.tower, f"n{self.n}", length, self.data]
        if self.teacher:
            parts += [self.teacher, f"w{self.kd_weight:g}", self.kd_schedule]
        return "_".join(parts).lower()


@dataclass(frozen=True)
class Claim:
    """A claim: its cells by label, the paired comparisons it reads (a, b, meaning: a − b) and its verdict."""

    number: int
    title: str
    cells: dict[str, Cell]
    comparisons: list[tuple[str, str, str]]
    verdict: Callable[[dict[str, Estimate]], tuple[str, str]]  # differences by "a − b" (top-1) → (verdict, why)
    vacuous_at_chance: bool = False  # a "matches" claim says nothing when both rows are at chance: then not resolved


# ── verdicts ─────────────────────────────────────────────────────────────────────────────────────────────────────


def beats(d: Estimate | None) -> str:
    """"holds" when the interval of a − b lies above 0, "fails" below 0, "not resolved" when it holds 0 (or was not run)."""
    if d is None:
        return "not resolved"
    return "holds" if d.low > 0 else "fails" if d.high < 0 else "not resolved"


def matches(d: Estimate | None, margin: float) -> str:
    """"holds" when the interval of a − b lies inside ±margin, "fails" when it lies wholly outside, else "not resolved"."""
    if d is None:
        return "not resolved"
    if -margin <= d.low and d.high <= margin:
        return "holds"
    return "fails" if d.low > margin or d.high < -margin else "not resolved"


def negated(d: Estimate | None) -> Estimate | None:
    """b − a from a − b (the interval mirrored)."""
    return None if d is None else Estimate(-d.mean, d.std, -d.high, -d.low, d.seeds)


def all_of(verdicts: list[str]) -> str:
    """A claim made of parts: holds when every part holds, fails when any fails, else not resolved."""
    return "fails" if "fails" in verdicts else "holds" if verdicts and all(v == "holds" for v in verdicts) else "not resolved"


def _points(d: Estimate | None) -> str:
    return "not run" if d is None else f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def _key(a: str, b: str) -> str:
    return f"{a} − {b}"


# ── the claims ───────────────────────────────────────────────────────────────────────────────────────────────────


def _tf(b: float) -> str:
    return f"{b:g} TF"


def claims(p: ScalingDownPreset) -> list[Claim]:
    """The six claims of the preset: cells (shared between claims where they are the same run), comparisons, verdicts."""
    half = p.n // 2
    kept = round(p.keep_fraction * p.n)
    clip = {f"CLIP, {t}, N={n:,}": Cell("CLIP", t, n, p.budget) for t in TOWERS for n in p.sizes}
    siclip_at_n = {f"{SICLIP}, N={n:,}": Cell(SICLIP, "mci", n, p.budget, teacher="teacher") for n in p.sizes}
    by_budget = {f"{s} @ {_tf(b)}": Cell(s, "vit_tiny", p.n, b) for s in STRATEGIES for b in p.budgets}
    siclip_by_budget = {f"{SICLIP} @ {_tf(b)}": Cell(SICLIP, "mci", p.n, b, teacher="teacher") for b in p.budgets}

    c1 = {"noisy, all": Cell("CLIP", "vit_tiny", p.n, p.budget, data="noisy"),
          "noisy, filtered half": Cell("CLIP", "vit_tiny", kept, p.budget, data="filtered"),
          "noisy, random half": Cell("CLIP", "vit_tiny", kept, p.budget, data="random")}  # fmt: skip
    cmp1 = [("noisy, filtered half", "noisy, all", "filtered half over the whole noisy set"),
            ("noisy, filtered half", "noisy, random half", "filtered half over a random half (cleaner, not smaller)")]  # fmt: skip

    def verdict1(d):
        parts = [beats(d.get(_key(a, b))) for a, b, _ in cmp1]
        return all_of(parts), "; ".join(f"{m}: {_points(d.get(_key(a, b)))}" for a, b, m in cmp1)

    small, large = min(p.sizes), max(p.sizes)
    cmp2 = [(f"CLIP, vit_tiny, N={small:,}", f"CLIP, vit_small, N={small:,}", "ViT-tiny over ViT-small at the smallest N"),
            (f"CLIP, vit_small, N={large:,}", f"CLIP, vit_tiny, N={large:,}", "ViT-small over ViT-tiny at the largest N"),
            (f"CLIP, cnn_tiny, N={small:,}", f"CLIP, vit_tiny, N={small:,}", "CNN over ViT-tiny at the smallest N")]  # fmt: skip
    cmp2 += [(f"CLIP, cnn_tiny, N={n:,}", f"CLIP, vit_tiny, N={n:,}", f"CNN over ViT-tiny at N={n:,}") for n in p.sizes if n != small]

    def verdict2(d):
        vit = all_of([beats(d.get(_key(a, b))) for a, b, _ in cmp2[:2]])
        cnn = beats(d.get(_key(*cmp2[2][:2])))
        why = "; ".join(f"{m}: {_points(d.get(_key(a, b)))}" for a, b, m in cmp2)
        return all_of([vit, cnn]), f"ViT size follows N: {vit}; CNN preferable at the smallest N: {cnn}. {why}"

    cmp3 = [(f"{a} @ {_tf(b)}", f"{c} @ {_tf(b)}", f"{a} over {c} at {_tf(b)}")
            for b in p.budgets for i, a in enumerate(STRATEGIES) for c in STRATEGIES[i + 1 :]]  # fmt: skip

    def verdict3(d):
        return strategy_verdict(d, p.budgets)

    c4 = {"clean, CLIP+DA on half": Cell("CLIP+DA", "vit_tiny", half, p.budget), "clean, CLIP on all": by_budget[f"CLIP @ {_tf(p.budget)}"]}
    cmp4 = [("clean, CLIP+DA on half", "clean, CLIP on all", f"CLIP+DA on N/2 = {half:,} over CLIP on N = {p.n:,}")]

    def verdict4(d):
        e = d.get(_key(*cmp4[0][:2]))
        v = matches(e, p.match_margin)
        way = "" if v != "fails" else (" (CLIP+DA on half is better)" if e.mean > 0 else " (CLIP+DA on half is worse)")
        return v, f"{cmp4[0][2]}: {_points(e)} points, 'matches' inside ±{100 * p.match_margin:g}{way}"

    cmp5 = [(f"{SICLIP} @ {_tf(b)}", f"{s} @ {_tf(b)}", f"SiCLIP over {s} at {_tf(b)}") for b in p.budgets for s in STRATEGIES]
    cmp5 += [(f"{SICLIP}, N={n:,}", f"CLIP, {t}, N={n:,}", f"SiCLIP over CLIP {t} at N={n:,}") for n in p.sizes for t in TOWERS]

    def verdict5(d):
        # SiCLIP against the best row (by mean) at each budget and each N: holds when it beats every best row
        parts, why = [], []
        for where, rows in [(_tf(b), [(f"{SICLIP} @ {_tf(b)}", f"{s} @ {_tf(b)}") for s in STRATEGIES]) for b in p.budgets] + \
                           [(f"N={n:,}", [(f"{SICLIP}, N={n:,}", f"CLIP, {t}, N={n:,}") for t in TOWERS]) for n in p.sizes]:  # fmt: skip
            found = [(d[_key(a, b)], b) for a, b in rows if _key(a, b) in d]
            if not found:
                parts.append("not resolved")
                why.append(f"{where}: not run")
                continue
            e, best = min(found, key=lambda x: x[0].mean)  # the smallest gain: over the best rival
            parts.append(beats(e))
            why.append(f"{where}: over {best.split(' @ ')[0]} {_points(e)}")
        return all_of(parts), "; ".join(why)

    alone = Cell("alone", "mci", p.n, None, steps=p.kd_steps)
    c6 = {"alone": alone,
          "KD ← early teacher": Cell("KD", "mci", p.n, None, steps=p.kd_steps, teacher="early"),
          "KD ← teacher": Cell("KD", "mci", p.n, None, steps=p.kd_steps, teacher="teacher"),
          "KD ← wide teacher": Cell("KD", "mci", p.n, None, steps=p.kd_steps, teacher="wide"),
          f"KD ← early teacher × {p.kd_low:g}": Cell("KD", "mci", p.n, None, steps=p.kd_steps, teacher="early", kd_weight=p.kd_low),
          "KD ← early teacher, fading": Cell("KD", "mci", p.n, None, steps=p.kd_steps, teacher="early", kd_schedule="linear")}  # fmt: skip
    cmp6 = [(name, "alone", f"{name} over the student alone") for name in c6 if name != "alone"]
    cmp6 += [(f"KD ← early teacher × {p.kd_low:g}", "KD ← early teacher", f"weight × {p.kd_low:g} over full weight, early teacher"),
             ("KD ← early teacher, fading", "KD ← early teacher", "fading weights over constant, early teacher")]  # fmt: skip

    def verdict6(d):
        # a teacher's quality decides: KD from the wide teacher beats the student alone, KD from the early one loses to it
        strong, weak = d.get(_key("KD ← wide teacher", "alone")), d.get(_key("KD ← early teacher", "alone"))
        v = all_of([beats(strong), beats(negated(weak))])
        return v, "; ".join(f"{m}: {_points(d.get(_key(a, b)))}" for a, b, m in cmp6)

    return [
        Claim(1, "quality over quantity", c1, cmp1, verdict1),
        Claim(2, "architecture follows data size", clip, cmp2, verdict2),
        Claim(3, "strategy follows compute", by_budget, cmp3, verdict3),
        Claim(4, "CLIP+DA on half the data matches CLIP on all of it", c4, cmp4, verdict4, vacuous_at_chance=True),
        Claim(5, "SiCLIP (WI + WIKD) at the same compute", {**siclip_by_budget, **siclip_at_n, **by_budget, **clip}, cmp5, verdict5),
        Claim(6, "teacher quality: when distillation hurts", c6, cmp6, verdict6),
    ]


def strategy_verdict(d: dict[str, Estimate], budgets: tuple[float, ...]) -> tuple[str, str]:
    """Claim 3: the best strategy changes with the budget. Ranks by the paired differences at each budget (a strategy's
    score: its summed mean difference over the others). Holds when the best at the smallest budget and the best at the
    largest differ and each beats the other (interval above 0) at its own budget; fails when one strategy beats every
    other at every budget; else not resolved."""
    rankings, scores = {}, {}
    for b in budgets:
        score = {s: 0.0 for s in STRATEGIES}
        for i, a in enumerate(STRATEGIES):
            for c in STRATEGIES[i + 1 :]:
                e = d.get(_key(f"{a} @ {_tf(b)}", f"{c} @ {_tf(b)}"))
                if e is not None:
                    score[a] += e.mean
                    score[c] -= e.mean
        scores[b] = score
        rankings[b] = sorted(STRATEGIES, key=lambda s: -score[s])

    def diff(a: str, c: str, b: float) -> Estimate | None:
        e = d.get(_key(f"{a} @ {_tf(b)}", f"{c} @ {_tf(b)}"))
        if e is not None:
            return e
        return negated(d.get(_key(f"{c} @ {_tf(b)}", f"{a} @ {_tf(b)}")))

    lo, hi = min(budgets), max(budgets)
    ranking = "; ".join(f"{_tf(b)}: " + " > ".join(rankings[b]) for b in budgets)
    if not any(diff(a, c, b) for b in budgets for a in STRATEGIES for c in STRATEGIES if a != c):
        return "not resolved", "not run"
    w_lo, w_hi = rankings[lo][0], rankings[hi][0]
    if w_lo != w_hi and beats(diff(w_lo, w_hi, lo)) == "holds" and beats(diff(w_hi, w_lo, hi)) == "holds":
        return "holds", f"ranking by budget: {ranking}; {w_lo} − {w_hi} at {_tf(lo)} {_points(diff(w_lo, w_hi, lo))}, at {_tf(hi)} {_points(diff(w_lo, w_hi, hi))}"
    for s in STRATEGIES:
        if all(beats(diff(s, c, b)) == "holds" for b in budgets for c in STRATEGIES if c != s):
            return "fails", f"{s} beats every other strategy at every budget; ranking by budget: {ranking}"
    if w_lo == w_hi:  # the same leader at both ends: how far it leads the runner-up at each
        leads = ", ".join(f"over {rankings[b][1]} at {_tf(b)} {_points(diff(w_lo, rankings[b][1], b))}" for b in (lo, hi))
        return "not resolved", f"ranking by budget (mean differences): {ranking}; {w_lo} leads at {_tf(lo)} and at {_tf(hi)}: {leads}"
    return "not resolved", f"ranking by budget (mean differences): {ranking}; {w_lo} − {w_hi} at {_tf(lo)} {_points(diff(w_lo, w_hi, lo))}, at {_tf(hi)} {_points(diff(w_lo, w_hi, hi))}"


def study_cells(p: ScalingDownPreset, numbers: tuple[int, ...] | None = None) -> list[Cell]:
    """The distinct cells the chosen claims (all by default) need, in run order (claim by claim, first use)."""
    seen: dict[str, Cell] = {}
    for claim in claims(p):
        if numbers is None or claim.number in numbers:
            for cell in claim.cells.values():
                seen.setdefault(cell.slug, cell)
    return list(seen.values())


def needs(cells: list[Cell]) -> set[str]:
    """What the cells need besides themselves: "teacher", "early", "wide", "filter"."""
    out = {c.teacher for c in cells if c.teacher}
    if out or any(c.data in ("filtered", "random") for c in cells):
        out.add("teacher")
    if any(c.data in ("filtered", "random") for c in cells):
        out.add("filter")
    return out


# ── a cell as a training configuration ──────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class StudyPaths:
    """Where the study keeps its teachers and the noisy world's subsets."""

    out: Path

    def teacher(self, which: str) -> Path:
        return {"teacher": self.out / "teacher" / "model.pt", "early": self.out / "teacher_early" / "model.pt",
                "wide": self.out / "teacher_wide" / "model.pt"}[which]  # fmt: skip

    def subset(self, data: str) -> Path:
        return self.out / "filter" / ("kept_indices.json" if data == "filtered" else "random_indices.json")

    def run(self, cell: Cell, seed: int) -> Path:
        return self.out / "runs" / f"{cell.slug}_seed{seed}"


def cell_config(p: ScalingDownPreset, cell: Cell, seed: int, paths: StudyPaths, workers: int = 0) -> TrainConfig:
    """The :class:`TrainConfig` of ``cell`` at ``seed`` (world 1, the teacher's image size, the students' lr)."""
    b = p.base
    noisy = cell.data != "clean"
    data = world_data(b, batch_size=p.student_batch, num_train=p.n if noisy else cell.n, seed=STUDENT_WORLD, workers=workers, caption_noise=p.caption_noise if noisy else 0.0,
                      shape_twins=not noisy, subset=str(paths.subset(cell.data)) if cell.data in ("filtered", "random") else None)  # fmt: skip
    model = world_model(b)
    common = dict(out_dir=str(paths.run(cell, seed)), lr=b.student_lr, seed=seed, warmup_steps=b.warmup_steps, log_every=5,
                  checkpoint_every=50, evaluate=False, budget_tflops=cell.budget)  # fmt: skip
    if cell.budget is None:
        samples = len(json.loads(paths.subset(cell.data).read_text())) if cell.data in ("filtered", "random") else cell.n
        common["epochs"] = max(1, math.ceil(cell.steps * p.student_batch / samples))
    if cell.strategy in STRATEGIES:
        image = {**model["image"], **({"patch_size": b.image_size // 8} if cell.tower.startswith("vit") else {})}
        objective = dataclasses.replace(CLIP_ONLY, ssl_scale=1.0) if cell.strategy == "SLIP" else CLIP_ONLY
        extra = {"mask_ratio": p.mask_ratio} if cell.strategy == "FLIP" else {}
        if cell.strategy == "CLIP+DA":
            data = dataclasses.replace(data, augment=p.da_policy, text_augment=p.text_augment)
        return TrainConfig(model=f"clip_{cell.tower}", model_overrides={**model, "image": image}, objective=objective, data=data, **extra, **common)
    siclip = {"convert": ["text"], "sharing": "adjacent", "freeze": "inherited"}
    student = dict(model="siclip_tiny", model_overrides={**model, "siclip": siclip}, data=data, **common)
    if cell.strategy == SICLIP:
        return TrainConfig(teacher=str(paths.teacher("teacher")), inherit=True, objective=KD, **student)
    if cell.strategy == "alone":
        return TrainConfig(teacher=None, inherit=False, objective=CLIP_ONLY, **student)
    kd = dataclasses.replace(KD, feature=KD.feature * cell.kd_weight, relation=KD.relation * cell.kd_weight,
                             interactive=KD.interactive * cell.kd_weight, distill_schedule=cell.kd_schedule)  # fmt: skip
    return TrainConfig(teacher=str(paths.teacher(cell.teacher)), inherit=False, objective=kd, **student)


def wide_teacher_overrides(p: ScalingDownPreset) -> dict:
    """The wide teacher's model overrides: the teacher's (image size, padding mask) with ``p.wide`` on top."""
    model = world_model(p.base)
    return {**model, **p.wide, "image": {**model["image"], **p.wide.get("image", {})}, "text": {**model["text"], **p.wide.get("text", {})}}


# ── the teachers' evaluation, the filter, timings ───────────────────────────────────────────────────────────────


def evaluate_checkpoint(path: Path, p: AblationPreset, outcomes: Path) -> Path:
    """A saved model (the early teacher) on the shared items, once: ``outcomes`` is written when missing."""
    if not outcomes.is_file():
        evaluate_on_shared_items(load_checkpoint(path), p, outcomes)
    return outcomes


def filter_noisy_world(preset: ScalingDownPreset, paths: StudyPaths) -> dict:
    """Claim 1's halves of the noisy world (world 1, ``caption_noise``, no shape twins): the best ``keep_fraction`` by
    the teacher's CLIP score of each pair's raw caption (:mod:`siclip.data.quality`, scores cached and resumable), and a
    random draw of as many indices (seeded, so every run of the study draws the same). Writes ``filter/`` (kept and random
    indices, ``filter.json`` with the filter's precision and recall on the flagged noisy pairs); returns the summary."""
    folder = paths.out / "filter"
    summary_path = folder / "filter.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    teacher = paths.teacher("teacher")
    model = load_checkpoint(teacher).eval()
    world = EmbeddedConfig(seed=STUDENT_WORLD, num_train=preset.n, image_size=preset.base.image_size, caption_noise=preset.caption_noise)
    source = EmbeddedSource(world, "train")
    identity = {"model": str(teacher), "world": {"seed": STUDENT_WORLD, "num_train": preset.n, "caption_noise": preset.caption_noise}}
    pairs = score_pairs(source, image_encoder(model), text_encoder(model, tokenizer_for(model.config.text)), folder / "cache",
                        identity=identity, progress=False)  # fmt: skip
    kept = select_pairs(pairs.scores, keep_fraction=preset.keep_fraction)
    random = np.sort(np.random.default_rng(0).choice(len(source), size=len(kept), replace=False))
    write_indices(kept, paths.subset("filtered"))
    write_indices(random, paths.subset("random"))
    summary = {"model": str(teacher), "pairs": len(source), "kept": int(len(kept)), "keep_fraction": preset.keep_fraction,
               "noise": noise_report(pairs, kept), "random_half_noise": float(np.mean([pairs.noisy[i] for i in random]))}  # fmt: skip
    write_text_atomic(json.dumps(summary, indent=1), summary_path)
    return summary


def record_time(out: Path, slug: str, seed: int, seconds: float) -> float:
    """Append a run's wall time (training and evaluation) to ``out/timings.csv``; returns ``seconds``."""
    path = out / "timings.csv"
    new = not path.is_file()
    with path.open("a") as f:
        f.write(("cell,seed,seconds\n" if new else "") + f"{slug},{seed},{seconds:.1f}\n")
    return seconds


# ── tables, verdicts, figures ───────────────────────────────────────────────────────────────────────────────────


def estimates(differences: pd.DataFrame, metric: str = "zeroshot_top1") -> dict[str, Estimate]:
    """``{"a − b": Estimate}`` of a :func:`~siclip.analysis.ablation.summarize` differences table."""
    return {r["comparison"]: Estimate(r[metric], r[f"{metric}_std"], r[f"{metric}_low"], r[f"{metric}_high"], int(r["seeds"]))
            for _, r in differences.iterrows()}  # fmt: skip


def summarize_claim(claim: Claim, runs: dict[str, list[Path]], parameters: dict, *, resamples: int = 2000) -> dict:
    """Rows and paired differences of a claim's finished runs, and its verdict."""
    rows, differences = summarize({label: dirs for label, dirs in runs.items() if dirs}, parameters, comparisons=claim.comparisons,
                                  resamples=resamples)  # fmt: skip
    verdict, why = claim.verdict(estimates(differences)) if len(differences) else ("not resolved", "not run")
    if claim.vacuous_at_chance and len(rows) and verdict == "holds":
        compared = rows[rows["row"].isin({x for a, b, _ in claim.comparisons for x in (a, b)})]
        if (compared["zeroshot_top1_low"] <= CHANCE).all():
            verdict, why = "not resolved", f"every row's zero-shot top-1 interval reaches chance ({100 * CHANCE:g} %): a match says nothing. {why}"
    return {"rows": rows, "differences": differences, "verdict": verdict, "why": why}


def verdict_table(results: dict[int, dict], titles: dict[int, str]) -> str:
    lines = ["| claim | verdict | paired differences, zero-shot top-1 (points) [95 % interval] |", "|---|---|---|"]
    for number, r in results.items():
        lines.append(f"| {number}. {titles[number]} | **{r['verdict']}** | {r['why']} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[int, dict], titles: dict[int, str], out: Path, flops: dict[str, float], note: str = "") -> Path:
    """``claim<k>.csv`` (rows, with the TFLOPs spent), ``differences.json`` / ``.md``, ``verdicts.json``, ``scaling_down.md``."""
    records, md = [], [f"# Scaling (Down) CLIP at equal compute\n\n{note}\n## Verdicts\n\n" + verdict_table(results, titles)]
    for number, r in results.items():
        rows = r["rows"]
        if len(rows):
            rows = rows.assign(tflops_spent=rows["row"].map(flops))
        rows.to_csv(out / f"claim{number}.csv", index=False)
        records += [{"claim": number, **d} for d in r["differences"].to_dict("records")]
        md.append(f"\n## Claim {number}: {titles[number]} — {r['verdict']}\n\n{r['why']}\n\n" + (markdown_tables(r["rows"], r["differences"]) if len(rows) else "not run\n"))
    (out / "differences.json").write_text(json.dumps(records, indent=1))
    (out / "verdicts.json").write_text(json.dumps({n: {"title": titles[n], "verdict": r["verdict"], "why": r["why"]} for n, r in results.items()}, indent=1))
    (out / "differences.md").write_text("\n".join(_differences_md(n, r) for n, r in results.items()))
    path = out / "scaling_down.md"
    path.write_text("\n".join(md))
    return path


def _differences_md(number: int, r: dict) -> str:
    d = r["differences"]
    if not len(d):
        return f"### Claim {number}: not run\n"
    lines = [f"### Claim {number}", "", "| paired difference (points) | measures | seeds | " + " | ".join(METRICS.values()) + " |",
             "|---|---|---:|" + "---:|" * len(METRICS)]  # fmt: skip
    for _, x in d.iterrows():
        cells = [f"{100 * x[m]:+.1f} [{100 * x[f'{m}_low']:+.1f}, {100 * x[f'{m}_high']:+.1f}]" for m in METRICS]
        lines.append(f"| {x['comparison']} | {x['measures']} | {x['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PLOTTED = {"zeroshot_top1": "zero-shot top-1 (%)", "image_to_text_R@1": "image→text R@1 (%)", "text_to_image_R@1": "text→image R@1 (%)"}


def _band(ax, x, line: pd.DataFrame, metric: str, color) -> None:
    """The 95 % interval as a band between points, and as error bars (visible where a line has a single point)."""
    low, mean, high = (100 * line[f"{metric}{s}"].to_numpy() for s in ("_low", "", "_high"))
    ax.fill_between(x, low, high, color=color, alpha=0.15)
    ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="none", ecolor=color, capsize=3, alpha=0.7)


def chance_percent(retrieval_images: int) -> dict[str, float]:
    """A guess's score on the shared items, per plotted metric (%): one of the world's 100 classes (top-1); for R@1
    with N retrieval images of k captions each, k right captions among k·N, or one right image among N: 1/N."""
    return {"zeroshot_top1": 100 * CHANCE, "image_to_text_R@1": 100 / retrieval_images, "text_to_image_R@1": 100 / retrieval_images}


ZOOM_TITLE = "the from-scratch CLIPs alone (zoomed; dashed: chance)"


def _two_rows(title: str):
    """A figure of two rows × the plotted metrics: every line above, the lines without SiCLIP below (zoomed: SiCLIP's
    inherited start sits ~60 points above the from-scratch rows and would flatten them)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(PLOTTED), figsize=(5.4 * len(PLOTTED), 8.4))
    fig.suptitle(title)
    return fig, axes


def _finish_rows(fig, axes, xlabel: str, chance: dict[str, float]) -> None:
    for row, what in zip(axes, ("every row", ZOOM_TITLE)):
        for ax, (metric, label) in zip(row, PLOTTED.items()):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(what, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    for ax, metric in zip(axes[1], PLOTTED):
        ax.axhline(chance[metric], color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(bottom=0)
    fig.tight_layout()


def plot_compute(rows: pd.DataFrame, flops: dict[str, float], path: Path, *, budgets: tuple[float, ...], retrieval_images: int) -> Path:
    """Claims 3 and 5: accuracy against the training TFLOPs spent (log scale), one line per strategy, 95 % bands; the
    lower row without SiCLIP, zoomed. Ticks at the preset's ``budgets`` (a run spends its budget to within a step)."""
    fig, axes = _two_rows("Strategy against compute (ViT-tiny CLIPs; SiCLIP-tiny incl. its teacher's forward): mean over seeds, 95 % bands")
    for row, strategies in zip(axes, ((*STRATEGIES, SICLIP), STRATEGIES)):
        for ax, metric in zip(row, PLOTTED):
            for i, strategy in enumerate((*STRATEGIES, SICLIP)):  # colours by strategy, the same in both rows
                if strategy not in strategies:
                    continue
                line = rows[rows["row"].str.startswith(f"{strategy} @ ")].assign(x=lambda f: f["row"].map(flops)).sort_values("x")
                if line.empty:
                    continue
                ax.plot(line["x"], 100 * line[metric], marker="o", label=strategy, color=f"C{i}")
                _band(ax, line["x"], line, metric, f"C{i}")
            ax.set_xscale("log")
            ax.set_xticks(sorted(budgets), [f"{b:g}" for b in sorted(budgets)])
            ax.minorticks_off()
    _finish_rows(fig, axes, "training compute (TFLOPs, log scale)", chance_percent(retrieval_images))
    return save_figure(fig, path)


def plot_sizes(rows: pd.DataFrame, path: Path, *, retrieval_images: int) -> Path:
    """Claims 2 and 5: accuracy against N (log scale) at one budget, one line per image tower, 95 % bands; the lower
    row without SiCLIP, zoomed."""
    fig, axes = _two_rows("Image tower against data size at one budget: mean over seeds, 95 % bands")
    lines = {f"CLIP, {t}": t.replace("_", "-") for t in TOWERS} | {SICLIP: "SiCLIP-tiny (MCi, WI+WIKD)"}
    ns: set[int] = set()
    for row, drawn in zip(axes, (list(lines), [f"CLIP, {t}" for t in TOWERS])):
        for ax, metric in zip(row, PLOTTED):
            for i, (prefix, name) in enumerate(lines.items()):  # colours by tower, the same in both rows
                if prefix not in drawn:
                    continue
                line = rows[rows["row"].str.startswith(f"{prefix}, N=")]
                if line.empty:
                    continue
                line = line.assign(n=line["row"].str.rsplit("N=", n=1).str[1].str.replace(",", "").astype(int)).sort_values("n")
                ns |= set(line["n"])
                ax.plot(line["n"], 100 * line[metric], marker="o", label=name, color=f"C{i}")
                _band(ax, line["n"], line, metric, f"C{i}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ns), [f"{n:,}" for n in sorted(ns)])
            ax.minorticks_off()
    _finish_rows(fig, axes, "training pairs N (log scale), equal compute", chance_percent(retrieval_images))
    return save_figure(fig, path)


def plot_quality(rows: pd.DataFrame, path: Path, noise: dict | None = None, *, retrieval_images: int) -> Path:
    """Claims 1 and 4: bars of each row's mean with its 95 % interval, per metric; chance dashed."""
    chance = chance_percent(retrieval_images)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.4 * len(PLOTTED), 4.6))
    for ax, (metric, label) in zip(axes, PLOTTED.items()):
        x = np.arange(len(rows))
        y = 100 * rows[metric].to_numpy()
        err = [y - 100 * rows[f"{metric}_low"].to_numpy(), 100 * rows[f"{metric}_high"].to_numpy() - y]
        ax.bar(x, y, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(x, [r.replace(", ", "\n", 1) for r in rows["row"]], fontsize=8)
        ax.axhline(chance[metric], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    title = "Quality against quantity at equal compute: mean over seeds, 95 % intervals"
    if noise:
        title += f"\n(noisy world: {noise['noise_before']:.0%} misaligned; the filter's half holds {noise['noise_after']:.0%})"
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def preset_record(name: str, preset: ScalingDownPreset) -> dict:
    return {"preset": name, **dataclasses.asdict(preset)}


__all__ = ["KD", "PRESETS", "SICLIP", "STRATEGIES", "TOWERS", "VERDICTS", "Cell", "Claim", "ScalingDownPreset", "StudyPaths", "all_of",
           "beats", "cell_config", "chance_percent", "evaluate_checkpoint", "filter_noisy_world", "negated", "record_time", "claims", "estimates", "matches", "needs", "plot_compute", "plot_quality", "plot_sizes", "preset_record",
           "strategy_verdict", "study_cells", "summarize_claim", "verdict_table", "wide_teacher_overrides", "write_outputs"]  # fmt: skip
