"""The data-scale study (issue 24): its rows and presets, the training options it needs, and its smoke run end to end."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from siclip.analysis.ablation import AblationPreset, student_config
from siclip.analysis.data_scale import GRID_COMPARISONS, GRID_ROWS, OPEN_COMPARISONS, OPEN_ROWS, PRESETS, DataScalePreset, cells, run_name
from siclip.data import EmbeddedConfig, EmbeddedSource
from siclip.distill import ObjectiveConfig
from siclip.models import create_model, save_checkpoint
from siclip.train import DataConfig, TrainConfig
from siclip.train.inputs import open_training_source
from siclip.train.loop import build_task
from siclip.train.step import create_optimizer

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_takes_equal_steps_at_every_size():
    for name, preset in PRESETS.items():
        for n in preset.sizes:
            assert preset.epochs(n) * n == preset.steps * preset.base.batch, (name, n)
        assert preset.open_size in preset.sizes
    with pytest.raises(ValueError, match="must divide"):
        DataScalePreset(PRESETS["cpu"].base, sizes=(3000,), steps=128, open_size=None)


def test_comparisons_name_rows_that_run_at_their_size():
    grid = {r.name for r in GRID_ROWS}
    assert all(a in grid and b in grid for a, b, _ in GRID_COMPARISONS)
    at_open_size = grid | {r.name for r in OPEN_ROWS}
    assert all(a in at_open_size and b in at_open_size for a, b, _ in OPEN_COMPARISONS)
    preset = PRESETS["cpu"]
    runs = [run_name(n, row, 0) for n, row in cells(preset)]
    assert len(runs) == len(set(runs)) == len(preset.sizes) * len(GRID_ROWS) + len(OPEN_ROWS)


def _teacher(tmp_path):
    return save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "teacher.pt")


def _student(tmp_path, row, teacher):
    preset = AblationPreset(teacher_samples=64, teacher_epochs=1, student_samples=64, student_epochs=1, seeds=1, eval_per_class=1,
                            eval_images=8, batch=16, image_size=64)  # fmt: skip
    return student_config(preset, row, 0, teacher, tmp_path / row.slug, 0)


def test_kd_from_scratch_builds_a_fresh_student_that_distils(tmp_path, seed):
    """inherit=False with a teacher: every weight new and trainable, the distillation terms on."""
    teacher = _teacher(tmp_path)
    kd, wi = (next(r for r in GRID_ROWS if r.name == name) for name in ("KD only", "+WI"))
    task = build_task(_student(tmp_path, kd, teacher))
    assert task.teacher is not None and task.objective.config.needs_teacher and not task.inherited
    assert all(p.requires_grad for p in task.student.parameters())
    inherited = build_task(_student(tmp_path, wi, teacher))
    token = "text.token_embedding.weight"
    taught = torch.load(teacher, weights_only=True)["state_dict"][token]
    assert torch.equal(inherited.student.state_dict()[token], taught) and token in inherited.inherited
    assert not torch.equal(task.student.state_dict()[token], taught)


def test_inherited_parameters_train_at_their_own_lr(tmp_path, seed):
    teacher = _teacher(tmp_path)
    row = next(r for r in OPEN_ROWS if r.name == "+WI trainable")
    config = _student(tmp_path, row, teacher)
    task = build_task(config)
    assert all(p.requires_grad for p in task.student.parameters())  # freeze="none"
    optimizer = create_optimizer(task, lr=1.0, weight_decay=0.1, inherited=task.inherited_parameters(), inherited_lr_scale=0.1)
    names = {id(p): n for n, p in task.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            inherited = name.removeprefix("student.") in task.inherited
            assert group["inherited"] == inherited and group["lr"] == pytest.approx(0.1 if inherited else 1.0), name
    assert any(n.startswith("student.text.transformer") for n in seen)  # the new SAS-P blocks at full lr
    assert seen == {n for n, p in task.named_parameters() if p.requires_grad}


def test_synthetic_caption_count_reaches_the_embedded_world():
    config = TrainConfig(data=DataConfig(num_train=8, num_synthetic=2))
    source = open_training_source(config, 32)
    assert isinstance(source, EmbeddedSource) and len(source.load(0).synthetic) == 2
    assert EmbeddedConfig().num_synthetic == DataConfig().num_synthetic  # the default world is unchanged


def test_rows_ask_for_what_they_name(tmp_path):
    teacher = tmp_path / "t.pt"
    by_name = {r.name: r for r in GRID_ROWS + OPEN_ROWS}
    base = _student(tmp_path, by_name["baseline"], teacher)
    assert base.teacher is None and base.objective.feature == 0
    assert _student(tmp_path, by_name["KD only"], teacher).inherit is False
    unshared = _student(tmp_path, by_name["+WIKD+PM both towers, image unshared"], teacher)
    assert unshared.model_overrides["siclip"]["image_sharing"] == "none" and unshared.model_overrides["siclip"]["convert"] == ["text", "image"]
    assert _student(tmp_path, by_name["+WIKD+PM 1 caption"], teacher).data.num_synthetic == 1
    trainable = _student(tmp_path, by_name["+WIKD trainable"], teacher)
    assert trainable.model_overrides["siclip"]["freeze"] == "none" and trainable.inherited_lr_scale == 0.1
    assert trainable.objective == ObjectiveConfig(pair_matching=0)


@pytest.mark.slow
def test_smoke_preset_writes_every_cell_and_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "experiments" / "data_scale.py"), "--preset", "smoke", "--out", str(tmp_path)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    for name in ("data_scale.md", "data_scale.csv", "differences.csv", "data_scale.png", "preset.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    preset = PRESETS["smoke"]
    for n, row in cells(preset):
        for seed in range(preset.base.seeds):
            for name in ("outcomes.npz", "model.pt", "summary.json", "metrics.csv"):
                assert (tmp_path / run_name(n, row, seed) / name).exists(), (n, row.name, name)
    table = pd.read_csv(tmp_path / "data_scale.csv")
    assert set(table.N) == set(preset.sizes)
    steps = {n: pd.read_json(tmp_path / run_name(n, GRID_ROWS[0], 0) / "summary.json", typ="series")["steps"] for n in preset.sizes}
    assert set(steps.values()) == {preset.steps}  # equal optimiser steps at every N
    differences = pd.read_csv(tmp_path / "differences.csv")
    assert {"+WIKD − +WI", "KD only − baseline", "+WIKD+PM − +WIKD"} <= set(differences.comparison)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/outcomes.npz")}
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)  # finished runs are skipped
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/outcomes.npz")} == stamps
    assert out.count("N=") == len(cells(preset)) * preset.base.seeds
    (tmp_path / "data_scale.md").unlink()
    (tmp_path / run_name(preset.sizes[-1], GRID_ROWS[0], 0) / "outcomes.npz").unlink()  # as if that run had not finished
    report = subprocess.run(command + ["--report"], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0 and (tmp_path / "data_scale.md").stat().st_size > 0, report.stderr
    assert not (tmp_path / run_name(preset.sizes[-1], GRID_ROWS[0], 0) / "outcomes.npz").exists()  # --report trains nothing
    stamps.pop(tmp_path / run_name(preset.sizes[-1], GRID_ROWS[0], 0) / "outcomes.npz")
    other = subprocess.run([*command[:3], "cpu", *command[4:]], capture_output=True, text=True, cwd=ROOT)  # another study, same folder
    assert other.returncode == 2 and "holds a study of another preset" in other.stderr and "Traceback" not in other.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/outcomes.npz")} == stamps
