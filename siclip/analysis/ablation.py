"""Ablation tables and plots from run summaries (``summary.json`` and ``metrics.csv`` of each run)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = {
    "params_total": ("parameters", "total"),
    "params_trainable": ("parameters", "trainable"),
    "zeroshot_top1": ("eval", "zeroshot_top1"),
    "i2t_R@1": ("eval", "image_to_text_R@1"),
    "t2i_R@1": ("eval", "text_to_image_R@1"),
}


def collect(run_dirs: dict[str, Path], labels: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per run: its labels (e.g. variant, captions, sharing), parameters and metrics (in %)."""
    rows = []
    for name, run in run_dirs.items():
        summary = json.loads((Path(run) / "summary.json").read_text())
        row = {"run": name, **(labels or {}).get(name, {})}
        for column, (section, key) in COLUMNS.items():
            value = summary.get(section, {}).get(key)
            row[column] = 100 * value if section == "eval" and value is not None else value
        row["final_loss"] = summary.get("final_loss", {}).get("total")
        rows.append(row)
    return pd.DataFrame(rows)


def write_tables(frame: pd.DataFrame, out_dir: Path, name: str = "ablation") -> tuple[Path, Path]:
    """``<name>.md`` (the paper's form: parameters, zero-shot top-1, R@1 both ways) and ``<name>.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    frame.to_csv(csv_path, index=False)
    from siclip.analysis.benchmark import to_markdown

    md_path.write_text(to_markdown(frame.to_dict("records")) + "\n")
    return md_path, csv_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dirs: dict[str, Path], path: Path, metric: str = "clip") -> Path:
    """Training loss against step, one line per run; the CLIP term by default, the one every objective
    shares (totals differ in scale: FD carries λ1 = 4000)."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(frame: pd.DataFrame, path: Path, metric: str = "zeroshot_top1") -> Path:
    """Accuracy against parameter count, each run a labelled point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(frame["params_total"] / 1e6, frame[metric])
    for _, row in frame.iterrows():
        ax.annotate(row["run"], (row["params_total"] / 1e6, row[metric]), fontsize=6)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"{metric} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
