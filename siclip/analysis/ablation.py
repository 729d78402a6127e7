"""SiCLIP's ablation on the embedded world: presets, rows, per-item evaluation, tables with intervals, plots.

Design (one factor at a time around an anchor, every row over ``seeds`` training seeds):

- one MobileCLIP-tiny **teacher**, trained on its own world (seed 0) with synthetic and raw captions;
- SiCLIP-tiny **students** trained on a second world (seed 1, a new dataset), each row changing one
  thing from the anchor "+WIKD+PM, synthetic captions, adjacent sharing, text tower converted":
  the method ladder baseline → +WI → +WIKD → +WIKD+PM, raw captions, sharing none / by divergence,
  both towers converted;
- every run (teacher included) is evaluated on the same items (zero-shot images, retrieval images and
  captions of world 0's held-out splits); the per-item outcomes are saved (``outcomes.npz``), and
  :mod:`siclip.analysis.stats` turns them into mean ± std over seeds, two-level bootstrap intervals and
  paired differences between neighbouring rows (same seeds, same items).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from siclip.analysis.figures import pyplot, save_figure
from siclip.analysis.stats import estimate, paired_difference
from siclip.data import EmbeddedConfig
from siclip.data.tokenizer import tokenizer_for
from siclip.distill import ObjectiveConfig
from siclip.eval import evaluate_embedded
from siclip.storage import atomic_write
from siclip.train import DataConfig, TrainConfig, train_or_continue
from siclip.train.presets import WORLD_DATA, WORLD_IMAGE_LR_SCALE, WORLD_MODEL, WORLD_TEXT_FROZEN_FRACTION
from siclip.train.snapshots import student_from_checkpoint

CLIP_ONLY = ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)
METRICS = {"zeroshot_top1": "zero-shot top-1", "zeroshot_top5": "zero-shot top-5",
           "image_to_text_R@1": "I→T R@1", "text_to_image_R@1": "T→I R@1"}  # fmt: skip


@dataclass(frozen=True)
class AblationPreset:
    """Sizes of one ablation: the teacher's run, each student's run, seeds and evaluation sets."""

    teacher_samples: int
    teacher_epochs: int
    student_samples: int
    student_epochs: int
    seeds: int
    eval_per_class: int  # zero-shot images per class (100 classes)
    eval_images: int  # retrieval images (5 captions each)
    batch: int = 128
    teacher_lr: float = 2e-3
    student_lr: float = 2e-3
    teacher_p_synthetic: float = 0.5  # raw alt-text half the time: it names shapes canonically (experiments/RESULTS.md)
    warmup_steps: int = 20
    image_size: int = 96  # the teacher's (and so the students') input size


PRESETS = {
    # CI: every stage runs and writes its outputs, a few steps each.
    "smoke": AblationPreset(teacher_samples=128, teacher_epochs=1, student_samples=64, student_epochs=1, seeds=2,
                            eval_per_class=1, eval_images=32, batch=32, warmup_steps=1, image_size=32),
    # 2 CPU cores, under 60 minutes: a teacher of 640 steps at 96 px (~7 min; the demo's 448 reach 52.6 %),
    # 8 rows × 3 seeds of 96-step students (~50 s each) and their evaluations (~20 s each).
    "cpu": AblationPreset(teacher_samples=81_920, teacher_epochs=1, student_samples=4096, student_epochs=3, seeds=3,
                          eval_per_class=10, eval_images=1000, batch=128),
    # One H100 with 16 host cores, about 10 minutes (estimated, not yet run): the embedded world renders on the
    # CPU, so use --workers 12; ~1.4 M training samples at the loader's ~10 k samples/s, 25 evaluations.
    "gpu": AblationPreset(teacher_samples=204_800, teacher_epochs=2, student_samples=20_480, student_epochs=2, seeds=3,
                          eval_per_class=20, eval_images=1000, batch=512, teacher_lr=4e-3, student_lr=4e-3),
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One ablation row: the method, the student's captions, its sharing plan and the towers converted.

    The teacher takes part when the row inherits from it (WI) or distils from it (``objective.needs_teacher``):
    ``inherit=False`` with a distilling objective is KD from scratch. ``freeze="none"`` trains the inherited
    parts too, at ``inherited_lr_scale`` × the lr.
    """

    name: str
    inherit: bool  # weight inheritance from the teacher (WI)
    objective: ObjectiveConfig
    captions: str = "synthetic"
    sharing: str = "adjacent"
    convert: tuple[str, ...] = ("text",)
    image_sharing: str = "adjacent"  # the image tower's attention blocks (when converted): W_Q, W_K shared, or "none"
    freeze: str = "inherited"
    inherited_lr_scale: float = 1.0
    num_synthetic: int = 5  # synthetic captions per training image

    @property
    def slug(self) -> str:
        return self.name.replace("+", "plus_").replace(" ", "_").replace(",", "").replace("×", "x").replace("(", "").replace(")", "")

    @property
    def uses_teacher(self) -> bool:
        return self.inherit or self.objective.needs_teacher


ANCHOR = "+WIKD+PM"
ROWS = [
    Row("baseline", False, CLIP_ONLY),
    Row("+WI", True, CLIP_ONLY),
    Row("+WIKD", True, ObjectiveConfig(pair_matching=0)),
    Row(ANCHOR, True, ObjectiveConfig()),
    Row("+WIKD+PM raw captions", True, ObjectiveConfig(), captions="raw"),
    Row("+WIKD+PM sharing none", True, ObjectiveConfig(), sharing="none"),
    Row("+WIKD+PM sharing by divergence", True, ObjectiveConfig(), sharing="divergence"),
    Row("+WIKD+PM both towers", True, ObjectiveConfig(), convert=("text", "image")),
]
# Neighbouring rows: (row, the row it is compared with, what the difference measures).
COMPARISONS = [
    ("+WI", "baseline", "weight inheritance"),
    ("+WIKD", "+WI", "distillation (FD + RD + ICL)"),
    (ANCHOR, "+WIKD", "pair matching"),
    (ANCHOR, "+WIKD+PM raw captions", "synthetic over raw captions"),
    (ANCHOR, "+WIKD+PM sharing none", "adjacent sharing over none"),
    ("+WIKD+PM sharing by divergence", ANCHOR, "sharing by divergence over adjacent"),
    ("+WIKD+PM both towers", ANCHOR, "both towers over text only"),
]
CAPTIONS = {"raw": 0.0, "synthetic": 1.0}
SHARING = {"none": {"sharing": "none"}, "adjacent": {"sharing": "adjacent"},
           "divergence": {"sharing": "optimal", "sharing_max_groups": 2}}  # fmt: skip


def save_outcomes(outcomes: dict, path: Path) -> Path:
    """Per-item boolean outcomes (``evaluate_embedded(..., per_item=True)``) to ``.npz``, written atomically."""
    with atomic_write(path) as f:
        np.savez_compressed(f, **{k: np.asarray(v, dtype=bool) for k, v in outcomes.items()})
    return path


def load_outcomes(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation outcomes at {path}: the run has not finished")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def summarize(runs: dict[str, list[Path]], parameters: dict[str, dict], *, resamples: int = 2000,
              comparisons: list[tuple[str, str, str]] = COMPARISONS) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """``(rows, differences)`` tables from finished runs.

    ``runs[row]`` lists the run directories of the row's seeds in seed order (each with ``outcomes.npz``);
    rows: per metric mean, std, 95 % interval (fractions); differences: each of ``comparisons`` (``(a, b,
    meaning)``: a − b) whose two rows both ran, paired by seed and item.
    """
    outcomes = {row: [load_outcomes(Path(d) / "outcomes.npz") for d in dirs] for row, dirs in runs.items() if dirs}
    stacked = {row: {m: np.stack([o[m] for o in seeds]) for m in METRICS} for row, seeds in outcomes.items()}
    records = []
    for row, metrics in stacked.items():
        record = {"row": row, "seeds": len(outcomes[row]), **{f"params_{k}": v for k, v in parameters.get(row, {}).items()}}
        for metric, x in metrics.items():
            e = estimate(x, resamples=resamples)
            record |= {f"{metric}": e.mean, f"{metric}_std": e.std, f"{metric}_low": e.low, f"{metric}_high": e.high}
        records.append(record)
    differences = []
    for a, b, meaning in comparisons:
        if a not in stacked or b not in stacked:
            continue
        seeds = min(len(outcomes[a]), len(outcomes[b]))  # paired seed by seed
        record = {"comparison": f"{a} − {b}", "measures": meaning, "seeds": seeds}
        for metric in METRICS:
            d = paired_difference(stacked[a][metric][:seeds], stacked[b][metric][:seeds], resamples=resamples)
            record |= {f"{metric}": d.mean, f"{metric}_std": d.std, f"{metric}_low": d.low, f"{metric}_high": d.high}
        differences.append(record)
    return pd.DataFrame(records), pd.DataFrame(differences)


def _cell(frame_row, metric: str, signed: bool = False) -> str:
    mean, std, low, high = (100 * frame_row[f"{metric}{s}"] for s in ("", "_std", "_low", "_high"))
    sign = "+" if signed and mean > 0 else ""
    return f"{sign}{mean:.1f} ± {std:.1f} [{low:.1f}, {high:.1f}]"


def markdown_tables(rows: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The two tables in markdown: metrics as ``mean ± std [95 % interval]`` in %, differences in points."""
    lines = ["| row | seeds | params (image / text / total, M) | " + " | ".join(METRICS.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(METRICS)]  # fmt: skip
    for _, r in rows.iterrows():
        params = " / ".join(f"{r[f'params_{k}'] / 1e6:.2f}" if f"params_{k}" in r and r[f"params_{k}"] == r[f"params_{k}"] else "–"
                            for k in ("image", "text", "total"))  # fmt: skip
        lines.append(f"| {r['row']} | {r['seeds']} | {params} | " + " | ".join(_cell(r, m) for m in METRICS) + " |")
    if len(differences):
        lines += ["", "| paired difference (points) | measures | seeds | " + " | ".join(METRICS.values()) + " |",
                  "|---|---|---:|" + "---:|" * len(METRICS)]  # fmt: skip
        for _, d in differences.iterrows():
            lines.append(f"| {d['comparison']} | {d['measures']} | {d['seeds']} | " + " | ".join(_cell(d, m, True) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: pd.DataFrame, differences: pd.DataFrame, out_dir: Path) -> Path:
    """``ablation.md`` (both tables), ``ablation.csv`` and ``differences.csv`` in ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out_dir / "ablation.csv", index=False)
    differences.to_csv(out_dir / "differences.csv", index=False)
    md = out_dir / "ablation.md"
    md.write_text(markdown_tables(rows, differences))
    return md


def plot_curves(run_dirs: dict[str, Path], path: Path, metric: str = "clip") -> Path:
    """Training loss against step, one line per run; the CLIP term by default, the one every objective
    shares (totals differ in scale: FD carries λ1 = 4000)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    for name, run in run_dirs.items():
        metrics = Path(run) / "metrics.csv"
        if metrics.exists():
            frame = pd.read_csv(metrics)
            ax.plot(frame["step"], frame[metric], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({metric})")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_rows(rows: pd.DataFrame, path: Path, metric: str = "zeroshot_top1") -> Path:
    """Each row's mean with its 95 % interval as an error bar, against its parameter count."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    x, y = rows["params_total"] / 1e6, 100 * rows[metric]
    err = [100 * (rows[metric] - rows[f"{metric}_low"]), 100 * (rows[f"{metric}_high"] - rows[metric])]
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
    for xi, yi, name in zip(x, y, rows["row"]):
        ax.annotate(name, (xi, yi), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"{METRICS[metric]} (%), mean and 95 % interval")
    fig.tight_layout()
    return save_figure(fig, path)


def preset_record(preset: AblationPreset) -> str:
    return json.dumps(dataclasses.asdict(preset))


# ── running a study: the teacher, the students, their evaluation on shared items ─────────────────────────────────

TEACHER_WORLD, STUDENT_WORLD = 0, 1


def _common(p: AblationPreset) -> dict:
    return dict(warmup_steps=p.warmup_steps, log_every=5, checkpoint_every=50, evaluate=False)


def world_data(p: AblationPreset, **fields) -> DataConfig:
    """The demo's embedded-world data recipe (shape twins, no crops) at the preset's batch size."""
    return DataConfig(**{**WORLD_DATA, "batch_size": p.batch, **fields})


def world_model(p: AblationPreset) -> dict:
    return {**WORLD_MODEL, "image": {**WORLD_MODEL["image"], "image_size": p.image_size}}


def teacher_config(p: AblationPreset, out: Path, workers: int) -> TrainConfig:
    """The teacher learns as the demo's does: image tower at a higher lr, text tower still for the first third."""
    data = world_data(p, num_train=p.teacher_samples, p_synthetic=p.teacher_p_synthetic, workers=workers, seed=TEACHER_WORLD)
    steps = p.teacher_epochs * (p.teacher_samples // p.batch)
    return TrainConfig(model="mobileclip_tiny", model_overrides=world_model(p), out_dir=str(out), epochs=p.teacher_epochs, lr=p.teacher_lr,
                       tower_lr_scale={"image": WORLD_IMAGE_LR_SCALE}, tower_frozen_steps={"text": int(steps * WORLD_TEXT_FROZEN_FRACTION)},
                       objective=CLIP_ONLY, data=data, **_common(p))  # fmt: skip


def student_config(p: AblationPreset, row: Row, seed: int, teacher: Path, out: Path, workers: int, *,
                   samples: int | None = None, epochs: int | None = None) -> TrainConfig:  # fmt: skip
    """A SiCLIP-tiny student of ``row`` on the second world (``samples`` pairs, ``epochs``: the preset's by default)."""
    siclip = {**SHARING[row.sharing], "convert": list(row.convert), "image_sharing": row.image_sharing, "freeze": row.freeze}
    data = world_data(p, num_train=samples or p.student_samples, p_synthetic=CAPTIONS[row.captions], workers=workers, seed=STUDENT_WORLD,
                      num_synthetic=row.num_synthetic)  # fmt: skip
    return TrainConfig(model="siclip_tiny", model_overrides={**world_model(p), "siclip": siclip}, out_dir=str(out),
                       teacher=str(teacher) if row.uses_teacher else None, inherit=row.inherit, inherited_lr_scale=row.inherited_lr_scale,
                       epochs=epochs or p.student_epochs, lr=p.student_lr, objective=row.objective, data=data, seed=seed, **_common(p))  # fmt: skip


def run_and_evaluate(config: TrainConfig, p: AblationPreset) -> dict:
    """Train (resuming), evaluate on the shared items (world 0's held-out splits), save ``outcomes.npz``; returns
    the run summary. A run whose ``outcomes.npz`` exists is finished and only read."""
    out = Path(config.out_dir)
    if not (out / "outcomes.npz").exists():
        train_or_continue(config, progress=False)
        model = student_from_checkpoint(config).eval()  # model.pt cannot rebuild a plan chosen by divergence
        evaluate_on_shared_items(model, p, out / "outcomes.npz")
    return json.loads((out / "summary.json").read_text())


def evaluate_on_shared_items(model, p: AblationPreset, path: Path) -> Path:
    """Per-item outcomes of ``model`` on the shared items (world 0's held-out zero-shot and retrieval splits, the preset's
    sizes), saved to ``path``; the model's own tokenizer (the embedded world's words for the tiny models)."""
    world = EmbeddedConfig(seed=TEACHER_WORLD, zero_shot_per_class=p.eval_per_class, num_test=p.eval_images)
    outcomes = evaluate_embedded(model.eval(), tokenizer_for(model.config.text), world, retrieval_images=p.eval_images, per_item=True)
    return save_outcomes(outcomes, path)
