"""The main job's script on tiny presets: a teacher, its SiCLIP student, one table; a rerun reuses both."""

import dataclasses
import importlib
import warnings
from pathlib import Path

import pytest

from siclip.train import DataConfig

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    return importlib.import_module(f"siclip.commands.{name}")


@pytest.mark.slow
def test_demo_prints_the_teacher_student_table(tmp_path, monkeypatch, capsys):
    demo = _load("demo")
    tiny = dict(epochs=1, warmup_steps=1, checkpoint_every=100, eval_zero_shot_per_class=1, eval_retrieval_images=16,
                data=DataConfig(num_train=32, batch_size=16))  # fmt: skip
    monkeypatch.setitem(demo.PRESETS, "demo", dataclasses.replace(demo.PRESETS["demo"], **tiny))
    monkeypatch.setitem(demo.PRESETS, "demo-student", dataclasses.replace(demo.PRESETS["demo-student"], **tiny))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert demo.main(["--out", str(tmp_path), "--timing-rounds", "1"]) == 0
    assert not [w for w in caught if "--resume" in str(w.message)]  # a first run has nothing to resume: no warning
    table = (tmp_path / "demo_table.md").read_text()
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| teacher: mobileclip_tiny") and lines[3].startswith("| student: siclip_tiny")
    for column in ("params image", "params text", "params total", "zero-shot top-1 %", "zero-shot top-5 %", "I→T R@1 %", "T→I R@1 %",
                   "images/s", "texts/s"):  # fmt: skip
        assert column in lines[0]
    teacher_text, student_text = (int(line.split("|")[3].strip().replace(",", "")) for line in lines[2:])
    assert student_text < teacher_text  # SAS-P drops W_V and W_P, sharing halves the blocks
    stamp = (tmp_path / "demo" / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert demo.main(["--out", str(tmp_path), "--timing-rounds", "1"]) == 0  # finished runs are reused, not retrained
    assert (tmp_path / "demo" / "model.pt").stat().st_mtime_ns == stamp and "train siclip" not in capsys.readouterr().err
