"""The scaling-down study (issue 31): its cells ask for what they name, its verdicts against a plain reference at the
interval boundaries, the fading teacher's weights, the study folder's rules, and the smoke preset end to end."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from siclip.analysis.ablation import save_outcomes
from siclip.analysis.scaling_down import (
    PRESETS, SICLIP, STRATEGIES, StudyPaths, beats, cell_config, chance_percent, claims, matches, needs, strategy_verdict, study_cells,
    summarize_claim,
)  # fmt: skip
from siclip.analysis.stats import Estimate
from siclip.analysis.study import StudyRefused, open_study
from siclip.distill import ObjectiveConfig, SiCLIPObjective

ROOT = Path(__file__).resolve().parents[1]
SMOKE = PRESETS["smoke"]


# ── verdicts: a plain reference at the boundaries ───────────────────────────────────────────────────────────────────


def _reference_beats(low, high):
    if low > 0:
        return "holds"
    if high < 0:
        return "fails"
    return "not resolved"


def _reference_matches(low, high, margin):
    if low >= -margin and high <= margin:
        return "holds"
    if low > margin or high < -margin:
        return "fails"
    return "not resolved"


@pytest.mark.parametrize("low, high", [(0.0, 0.1), (1e-12, 0.1), (-0.1, -1e-12), (-0.1, 0.0), (-0.1, 0.1), (0.02, 0.03)])
def test_beats_at_the_interval_boundaries(low, high):
    e = Estimate((low + high) / 2, 0.01, low, high, 3)
    assert beats(e) == _reference_beats(low, high)
    assert beats(None) == "not resolved"


@pytest.mark.parametrize("low, high", [(-0.02, 0.02), (-0.0201, 0.0), (0.0, 0.0201), (0.0201, 0.05), (-0.05, -0.0201), (-0.03, 0.03),
                                       (0.02, 0.04), (-0.04, -0.02)])  # fmt: skip
def test_matches_at_the_margin(low, high):
    e = Estimate((low + high) / 2, 0.01, low, high, 3)
    assert matches(e, 0.02) == _reference_matches(low, high, 0.02)


def _fake_run(folder: Path, outcomes: dict) -> Path:
    folder.mkdir(parents=True)
    save_outcomes(outcomes, folder / "outcomes.npz")
    (folder / "summary.json").write_text(json.dumps({"parameters": {"image": 1, "text": 1, "total": 2}}))
    return folder


def _outcomes(rng, p_top1, seeds=3, items=400):
    return [{m: rng.random(items) < p for m, p in [("zeroshot_top1", p_top1), ("zeroshot_top5", 0.5), ("image_to_text_R@1", 0.3),
                                                     ("text_to_image_R@1", 0.3)]} for _ in range(seeds)]  # fmt: skip


def test_claim_verdicts_from_synthetic_rows(tmp_path, seed):
    """Rows whose accuracy differs by design: the claims' verdicts come out as the reference reads the intervals."""
    rng = np.random.default_rng(seed)
    by_number = {c.number: c for c in claims(SMOKE)}
    # claim 4: the same outcomes in both rows (a difference of exactly 0 [0, 0]) match; 20 points apart do not
    same = _outcomes(rng, 0.4)
    runs = {label: [_fake_run(tmp_path / f"same_{i}_{s}", o) for s, o in enumerate(same)] for i, label in enumerate(by_number[4].cells)}
    result = summarize_claim(by_number[4], runs, {}, resamples=300)
    assert result["verdict"] == "holds" and "+0.0 [+0.0, +0.0]" in result["why"]
    at_chance = _outcomes(rng, 0.004)  # the same rows at chance (1 of 100 classes): the match is vacuous
    runs_at_chance = {label: [_fake_run(tmp_path / f"chance_{i}_{s}", o) for s, o in enumerate(at_chance)] for i, label in enumerate(by_number[4].cells)}
    result = summarize_claim(by_number[4], runs_at_chance, {}, resamples=300)
    assert result["verdict"] == "not resolved" and "chance" in result["why"]
    half, full = list(by_number[4].cells)
    runs[half] = [_fake_run(tmp_path / f"better_{s}", o) for s, o in enumerate(_outcomes(rng, 0.6))]
    result = summarize_claim(by_number[4], runs, {}, resamples=300)
    assert result["verdict"] == "fails" and "better" in result["why"]
    d = result["differences"].iloc[0]
    assert 0.1 < d["zeroshot_top1"] < 0.3 and d["zeroshot_top1_low"] > 0.02
    # claim 1: the filtered half far above both others holds; above one and below the other fails
    labels = list(by_number[1].cells)
    levels = {labels[0]: 0.2, labels[1]: 0.6, labels[2]: 0.2}
    runs = {label: [_fake_run(tmp_path / f"c1_{i}_{s}", o) for s, o in enumerate(_outcomes(rng, levels[label]))] for i, label in enumerate(labels)}
    assert summarize_claim(by_number[1], runs, {}, resamples=300)["verdict"] == "holds"
    runs[labels[2]] = [_fake_run(tmp_path / f"c1_random_{s}", o) for s, o in enumerate(_outcomes(rng, 0.95))]
    assert summarize_claim(by_number[1], runs, {}, resamples=300)["verdict"] == "fails"
    assert summarize_claim(by_number[1], {}, {}, resamples=300)["verdict"] == "not resolved"  # nothing ran


def _d(mean, half=0.01):
    return Estimate(mean, half, mean - half, mean + half, 3)


def test_strategy_verdict_needs_a_crossing(tmp_path):
    lo, hi = SMOKE.budgets[0], SMOKE.budgets[-1]

    def table(first_at_lo, first_at_hi, gap):
        d = {}
        for b, first in ((lo, first_at_lo), (hi, first_at_hi)):
            order = [first] + [s for s in STRATEGIES if s != first]
            for i, a in enumerate(STRATEGIES):
                for c in STRATEGIES[i + 1 :]:
                    d[f"{a} @ {b:g} TF − {c} @ {b:g} TF"] = _d(gap * (order.index(c) - order.index(a)))
        return d

    assert strategy_verdict(table("SLIP", "CLIP+DA", 0.05), SMOKE.budgets)[0] == "holds"  # the best changes, each significantly
    assert strategy_verdict(table("CLIP", "CLIP", 0.05), SMOKE.budgets)[0] == "fails"  # one strategy beats all, everywhere
    assert strategy_verdict(table("SLIP", "CLIP+DA", 0.005), SMOKE.budgets)[0] == "not resolved"  # inside the noise
    assert strategy_verdict({}, SMOKE.budgets)[0] == "not resolved"
    verdict, why = strategy_verdict(table("CLIP", "CLIP", 0.005), SMOKE.budgets)  # one leader inside the noise: no self-comparison
    assert verdict == "not resolved" and "CLIP − CLIP" not in why and f"CLIP leads at {lo:g} TF and at {hi:g} TF: over SLIP" in why


# ── cells ────────────────────────────────────────────────────────────────────────────────────────────────────────


def test_cells_ask_for_what_they_name(tmp_path):
    paths = StudyPaths(tmp_path)
    for data in ("filtered", "random"):
        paths.subset(data).parent.mkdir(exist_ok=True)
        paths.subset(data).write_text(json.dumps(list(range(32))))
    configs = {c.slug: (c, cell_config(SMOKE, c, 1, paths)) for c in study_cells(SMOKE)}
    assert len(configs) == len(study_cells(SMOKE))  # one run folder per distinct cell
    for cell, config in configs.values():
        assert config.seed == 1 and config.data.seed == 1 and config.data.batch_size == SMOKE.student_batch
        assert (config.budget_tflops == cell.budget) and (cell.budget is None) == (cell.strategy in ("alone", "KD"))
        if cell.strategy in STRATEGIES:
            assert config.model == f"clip_{cell.tower}" and config.teacher is None
            assert (config.objective.ssl_scale == 1.0) == (cell.strategy == "SLIP")
            assert (config.mask_ratio == 0.5) == (cell.strategy == "FLIP")
            assert (config.data.augment == SMOKE.da_policy == "mild" and config.data.text_augment > 0) == (cell.strategy == "CLIP+DA")
            if cell.tower.startswith("vit"):
                assert config.model_overrides["image"]["patch_size"] * 8 == SMOKE.base.image_size
        if cell.data != "clean":  # claim 1: the noisy world, its halves as subsets, no twins (a subset would split them)
            assert config.data.caption_noise == 0.5 and config.data.num_train == SMOKE.n and not config.data.shape_twins
            assert (config.data.subset is None) == (cell.data == "noisy")
        else:
            assert config.data.caption_noise == 0 and config.data.shape_twins and config.data.num_train == cell.n
        if cell.strategy == SICLIP:
            assert config.inherit and config.teacher == str(paths.teacher("teacher")) and config.objective == ObjectiveConfig(pair_matching=0)
        if cell.strategy == "alone":
            assert config.teacher is None and not config.inherit and not config.objective.needs_teacher
        if cell.strategy == "KD":
            assert not config.inherit and config.teacher == str(paths.teacher(cell.teacher))
            assert config.objective.feature == pytest.approx(4000 * cell.kd_weight) and config.objective.distill_schedule == cell.kd_schedule
    kd = [c for c, _ in configs.values() if c.strategy in ("alone", "KD")]
    assert {c.teacher for c in kd} == {None, "early", "teacher", "wide"} and len({cfg.epochs for c, cfg in configs.values() if c in kd}) == 1
    assert needs(study_cells(SMOKE, (3,))) == set() and needs(study_cells(SMOKE, (1,))) == {"teacher", "filter"}
    assert needs(study_cells(SMOKE, (6,))) == {"teacher", "early", "wide"}


def test_every_claim_compares_its_own_cells_and_the_real_presets_are_the_issues():
    for preset in PRESETS.values():
        for claim in claims(preset):
            assert all(a in claim.cells and b in claim.cells for a, b, _ in claim.comparisons), claim.number
        slugs = [c.slug for c in study_cells(preset)]
        assert len(slugs) == len(set(slugs))
    for name in ("cpu", "gpu"):
        p = PRESETS[name]
        assert p.base.seeds >= 3 and p.base.eval_per_class * 100 == p.base.eval_images == 1000 and p.caption_noise == 0.5
        assert len(p.budgets) == 3 and len(p.sizes) == 3
    assert PRESETS["cpu"].sizes == (1024, 4096, 16_384)
    with pytest.raises(ValueError, match="one of"):
        type(SMOKE)(SMOKE.base, budgets=(1.0,), sizes=(32,), budget=2.0, n=32, kd_steps=1, student_batch=16)
    with pytest.raises(ValueError, match="'heavy' is not an augmentation policy"):
        dataclasses.replace(SMOKE, da_policy="heavy")


# ── the fading teacher ──────────────────────────────────────────────────────────────────────────────────────────


def test_distillation_weights_scale_with_the_factor(seed):
    """total = L_clip + f·(λ1 FD + λ2 CRD + λ3 ICL) + λ4 PM, in float64 from the returned terms."""
    torch.manual_seed(seed)
    config = ObjectiveConfig(feature=40.0, relation=2.0, interactive=3.0, pair_matching=0.5, distill_schedule="linear")
    objective = SiCLIPObjective(16, 16, config).double()
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    student = (unit(torch.randn(8, 16, dtype=torch.float64)), unit(torch.randn(8, 16, dtype=torch.float64)), torch.tensor(10.0, dtype=torch.float64))
    teacher = (unit(torch.randn(8, 16, dtype=torch.float64)), unit(torch.randn(8, 16, dtype=torch.float64)), torch.tensor(20.0, dtype=torch.float64))
    for factor in (1.0, 0.25, 0.0):
        objective.distill_factor = factor
        t = objective(student, teacher)
        expected = t["clip"] + factor * (40.0 * t["feature"] + 2.0 * t["relation"] + 3.0 * t["interactive"]) + 0.5 * t["pair_matching"]
        torch.testing.assert_close(t["total"], expected, rtol=1e-12, atol=1e-12)


# ── the study folder ────────────────────────────────────────────────────────────────────────────────────────────


def test_study_folder_continues_with_more_seeds_and_refuses_another_preset(tmp_path):
    record = {"preset": "cpu", "base": {"seeds": 3, "batch": 128}, "n": 4}
    with pytest.raises(StudyRefused, match="nothing to report"):
        open_study(tmp_path / "study", record, report=True)
    open_study(tmp_path / "study", record)
    open_study(tmp_path / "study", {**record, "base": {"seeds": 5, "batch": 128}})  # more seeds: the same study
    with pytest.raises(StudyRefused, match="another preset"):
        open_study(tmp_path / "study", {**record, "n": 5})
    (tmp_path / "file").write_text("")
    with pytest.raises(StudyRefused, match="not a directory"):
        open_study(tmp_path / "file", record)


# ── the smoke preset end to end ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.slow  # 26 cells, each a model built, a step's FLOPs measured, a few steps and an evaluation (~1-2 s each, quiet)
def test_smoke_study_end_to_end_resumes_and_reports(tmp_path):
    command = [sys.executable, str(ROOT / "experiments" / "scaling_down.py"), "--preset", "smoke", "--out", str(tmp_path), "--seeds", "1"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    for name in ("scaling_down.md", "verdicts.json", "differences.json", "differences.md", "timings.csv", "compute.png", "sizes.png",
                 "quality.png", *(f"claim{k}.csv" for k in range(1, 7))):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    paths = StudyPaths(tmp_path)
    for cell in study_cells(SMOKE):
        assert (paths.run(cell, 0) / "outcomes.npz").is_file(), cell.slug
        assert not paths.run(cell, 1).exists()
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    assert set(verdicts) == {str(k) for k in range(1, 7)} and all(v["verdict"] in ("holds", "fails", "not resolved") for v in verdicts.values())
    noise = json.loads((tmp_path / "filter" / "filter.json").read_text())["noise"]
    assert noise["noise_before"] == 0.5 and len(json.loads(paths.subset("filtered").read_text())) == SMOKE.n // 2
    budgeted = pd.read_csv(tmp_path / "claim3.csv")
    assert budgeted["tflops_spent"].notna().all() and (budgeted["seeds"] == 1).all()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/outcomes.npz")}
    # a second seed of claim 4 only: its two cells run, nothing finished is touched
    more = subprocess.run(command[:-1] + ["2", "--claims", "4"], capture_output=True, text=True, cwd=ROOT)
    assert more.returncode == 0, more.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    seed1 = sorted(p.parent.name for p in tmp_path.glob("runs/*_seed1/outcomes.npz"))
    assert seed1 == sorted(f"{c.slug}_seed1" for c in study_cells(SMOKE, (4,)))
    assert (pd.read_csv(tmp_path / "claim4.csv")["seeds"] == 2).all()
    # --report on the partial study (claim 4 has 2 seeds, the rest 1): tables and verdicts, nothing trained
    (tmp_path / "scaling_down.md").unlink()
    report = subprocess.run(command[:-1] + ["2", "--report"], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0 and "## Verdicts" in (tmp_path / "scaling_down.md").read_text(), report.stderr[-2000:]
    assert not list(tmp_path.glob("runs/*_seed1/checkpoint.pt")) or len(list(tmp_path.glob("runs/*_seed1"))) == 2
    other = subprocess.run([*command[:3], "cpu", *command[4:]], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 2 and "holds a study of another preset" in other.stderr and "Traceback" not in other.stderr


def test_the_figures_chance_lines_are_a_random_guess_on_the_shared_items(seed):
    """chance_percent against a plain simulation: random scores over N images of 5 captions each find a right caption
    (image→text) or the right image (text→image) at rank 1 with probability 1/N; top-1 among 100 classes, 1 %."""
    rng = np.random.default_rng(seed)
    images, captions, trials = 16, 5, 4000
    owner = np.repeat(np.arange(images), captions)  # caption j describes image owner[j]
    scores = rng.random((trials, images, images * captions))
    image_to_text = (owner[scores.argmax(axis=2)] == np.arange(images)).mean()
    text_to_image = (scores.argmax(axis=1) == owner).mean()
    chance = chance_percent(images)
    sigma = 100 * np.sqrt((1 / images) * (1 - 1 / images) / (trials * images))
    assert abs(100 * image_to_text - chance["image_to_text_R@1"]) < 4 * sigma
    assert abs(100 * text_to_image - chance["text_to_image_R@1"]) < 4 * sigma
    assert chance["zeroshot_top1"] == 1.0 and chance_percent(1000)["text_to_image_R@1"] == 0.1
