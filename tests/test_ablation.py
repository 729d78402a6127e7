"""The ablation driver end to end on its smoke preset, and the tables it builds from per-item outcomes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siclip.analysis.ablation import COMPARISONS, ROWS, markdown_tables, save_outcomes, summarize

ROOT = Path(__file__).resolve().parents[1]


def _fake_runs(tmp_path, rng, rows, seeds=3, items=50):
    runs = {}
    for r, row in enumerate(rows):
        runs[row] = []
        for s in range(seeds):
            d = tmp_path / f"{r}_{s}"
            save_outcomes({m: rng.random(items) < 0.2 + 0.1 * r for m in ("zeroshot_top1", "zeroshot_top5", "image_to_text_R@1")}
                          | {"text_to_image_R@1": rng.random(5 * items) < 0.3}, d / "outcomes.npz")  # fmt: skip
            runs[row].append(d)
    return runs


def test_summary_tables_from_outcomes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    names = ["baseline", "+WI", "+WIKD"]
    runs = _fake_runs(tmp_path, rng, names)
    rows, differences = summarize(runs, {n: {"image": 1e6, "text": 2e6, "total": 3e6} for n in names}, resamples=300)
    first = np.stack([np.load(d / "outcomes.npz")["zeroshot_top1"] for d in runs["baseline"]])
    assert rows.loc[0, "zeroshot_top1"] == pytest.approx(first.mean()) and rows.loc[0, "zeroshot_top1_std"] == pytest.approx(first.mean(1).std(ddof=1))
    assert (rows.zeroshot_top1_low <= rows.zeroshot_top1).all() and (rows.zeroshot_top1 <= rows.zeroshot_top1_high).all()
    assert list(differences.comparison) == ["+WI − baseline", "+WIKD − +WI"]  # only comparisons whose rows both ran
    wi = np.stack([np.load(d / "outcomes.npz")["zeroshot_top1"] for d in runs["+WI"]])
    assert differences.loc[0, "zeroshot_top1"] == pytest.approx(wi.mean() - first.mean())
    md = markdown_tables(rows, differences)
    assert "| baseline | 3 | 1.00 / 2.00 / 3.00 |" in md and "+WI − baseline" in md


def test_comparisons_name_existing_rows():
    names = {r.name for r in ROWS}
    assert all(a in names and b in names for a, b, _ in COMPARISONS) and len(names) == len(ROWS)


@pytest.mark.slow
def test_smoke_preset_runs_every_stage_and_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "experiments" / "ablation.py"), "--preset", "smoke", "--out", str(tmp_path)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    for name in ("ablation.md", "ablation.csv", "differences.csv", "curves.png", "rows.png", "preset.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "ablation.csv")
    skipped = [line for line in out.splitlines() if line.startswith("skipped row")]
    assert len(table) == 1 + len(ROWS) - len(skipped) and set(table.seeds.iloc[1:]) == {2}
    for row in table.row.iloc[1:]:
        slug = next(r.slug for r in ROWS if r.name == row)
        for seed in range(2):
            for name in ("outcomes.npz", "model.pt", "summary.json", "metrics.csv"):
                assert (tmp_path / f"{slug}_seed{seed}" / name).exists(), (row, seed, name)
    assert table.loc[0, "zeroshot_top1_low"] <= table.loc[0, "zeroshot_top1"] <= table.loc[0, "zeroshot_top1_high"]
    shared = table[table.row == "+WIKD+PM"].params_total.iloc[0]
    assert shared < table[table.row == "+WIKD+PM sharing none"].params_total.iloc[0]
    differences = pd.read_csv(tmp_path / "differences.csv")
    assert "+WI − baseline" in set(differences.comparison) and "±" in (tmp_path / "ablation.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/outcomes.npz")}
    again = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout  # finished runs are skipped
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/outcomes.npz")} == stamps
    assert again.count("\n| ") == out.count("\n| ")
