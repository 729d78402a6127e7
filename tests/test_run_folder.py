"""A run folder says only what is so: summary.json records the settings that applied (a CSV run its real row count and
the caption columns it read, no teacher fields without a teacher), the lock file is gone once the run ends (finished
or refused), and an evaluation that measured nothing is said on stdout and in summary.json, not left as ``{}``.

Tiny runs: a 7-row CSV of 16 px images, mobileclip_tiny, batches of 4, one epoch.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from siclip import cli

ROWS = 7


@pytest.fixture
def table(tmp_path):
    """A 7-row CSV with a raw caption and two synthetic caption columns (the embedded world's defaults are 2,000
    samples and 5 synthetic captions: a summary showing those would be wrong)."""
    (tmp_path / "img").mkdir()
    rows = ["filepath,title,syn0,syn1,unused"]
    for i in range(ROWS):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a square {i},a grey square {i},square number {i},never read")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def run_train(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    from siclip.commands import train

    monkeypatch.setattr(sys, "argv", ["siclip train"])
    status = cli.run(train.main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def tiny(table, out) -> list[str]:
    return ["--data", str(table), "--synthetic-keys", "syn0,syn1", "--model", "mobileclip_tiny", "--image-size", "16", "--tokenizer", "words",
            "--batch-size", "4", "--epochs", "1", "--warmup-steps", "1", "--out", str(out)]  # fmt: skip


def test_a_csv_run_records_its_rows_and_columns_and_no_teacher(table, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    status, stdout, err = run_train(tiny(table, out), monkeypatch, capsys)
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == {"source": str(table), "samples": ROWS, "rows": ROWS,
                               "columns": {"image": "filepath", "caption": "title", "synthetic": ["syn0", "syn1"]}}  # fmt: skip
    data = summary["config"]["data"]
    assert data["synthetic_keys"] == ["syn0", "syn1"]
    for embedded_only in ("num_train", "num_synthetic", "seed", "shape_twins", "caption_noise"):
        assert embedded_only not in data, embedded_only
    for teacher_field in ("teacher", "teacher_model", "distill_teacher", "inherit", "inherited_lr_scale"):
        assert teacher_field not in summary["config"], teacher_field
    # config.json keeps every field: it is what --config reads back to reproduce the run
    assert json.loads((out / "config.json").read_text())["teacher_model"] == "mobileclip_s0"
    # and summary.json still reads back as the run's settings (the fields left out had no effect)
    from siclip.commands.train import parse

    again, _ = parse(["--config", str(out / "summary.json")])
    written, _ = parse(["--config", str(out / "config.json")])
    assert again == written
    # the lock is gone once the run has finished
    assert not (out / ".lock").exists()
    # trained on a CSV with no benchmark named: the evaluation measured nothing, and says so
    assert summary["eval"] == {} and summary["eval_note"].startswith("nothing was evaluated")
    assert "nothing was evaluated: the run trained on" in stdout and "--zeroshot" in summary["eval_note"]


def test_an_embedded_run_records_the_world_and_a_teacher_run_its_teacher(tmp_path, monkeypatch, capsys):
    from siclip.models import create_model, save_checkpoint

    teacher = save_checkpoint(create_model("mobileclip_tiny", image={"image_size": 16}), tmp_path / "teacher.pt")
    out = tmp_path / "run"
    argv = ["--model", "mobileclip_tiny", "--teacher", str(teacher), "--no-inherit", "--num-train", "8", "--batch-size", "4", "--epochs", "1",
            "--warmup-steps", "1", "--image-size", "16", "--no-eval", "--out", str(out)]  # fmt: skip
    status, _, err = run_train(argv, monkeypatch, capsys)
    assert status == 0, err
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["teacher"] == str(teacher) and config["teacher_model"] == "mobileclip_s0"
    summary = json.loads((out / "summary.json").read_text())
    assert config["data"]["num_train"] == 8 and summary["data"] == {"source": "embedded", "samples": 8}
    for table_only in ("image_key", "caption_key", "synthetic_keys"):
        assert table_only not in config["data"], table_only
    assert not (out / ".lock").exists()


def test_a_refused_run_leaves_no_lock(table, tmp_path, monkeypatch, capsys):
    """Refused at its inputs (a caption column the CSV does not have), inside an existing folder of the user's."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [*tiny(table, out), "--caption-key", "no_such_column"]
    status, _, err = run_train(argv, monkeypatch, capsys)
    assert status == 2 and "no_such_column" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_lock_is_exclusive_while_held_and_gone_after(tmp_path):
    from siclip.train.state import RunDirectoryBusy, RunLock

    lock = RunLock(tmp_path / "run")
    assert (tmp_path / "run" / ".lock").read_text().strip().isdigit()
    with pytest.raises(RunDirectoryBusy, match="in use by another run"):
        RunLock(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    RunLock(tmp_path / "run").release(remove_empty=True)  # taken again after, and an empty folder of its own removed
    assert not (tmp_path / "run").exists()
