"""One report format per kind: a divergence report has one JSON schema whatever model it measured (a siclip model on
the embedded world, another library's model on its inputs), plans as lists of lists with strategy and threshold as
fields; ``print(report)`` is the table the command prints and the table saved; a :class:`ModelReport` prints, saves and
reads as the same values. Counts of one read in the singular."""

from __future__ import annotations

import json

import pytest
import torch

from siclip.analysis.divergence import FORMAT, divergence_report
from siclip.analysis.flops import ModelReport, model_report
from siclip.models import create_model
from siclip.wording import count


def schema(value):
    """The shape of plain data: dict keys and the schema of each value, a list's element schema, a leaf's type (ints
    and floats both numbers, None a number left out: a plan without a threshold)."""
    if isinstance(value, dict):
        return {key: schema(v) for key, v in value.items()}
    if isinstance(value, list):
        return [schema(value[0])] if value else []
    return "number" if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def siclip_report():
    from siclip.commands.divergence import report_of

    _, report, _ = report_of("mobileclip_tiny", None, None, 4, None, "mobileclip_s0")  # the embedded world's inputs
    return report


def foreign_report():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=8)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(1, 64, (2, 8))
    return divergence_report(model, {"input_ids": ids, "use_cache": False}, max_groups=1, name="gpt2")


def test_a_divergence_report_has_one_schema_whatever_it_measured():
    ours, theirs = siclip_report().to_dict(), foreign_report().to_dict()
    assert ours["format"] == theirs["format"] == FORMAT and ours["unit"] == theirs["unit"] == "nats"
    stack_schemas = [schema(s) for s in (*ours["stacks"].values(), *theirs["stacks"].values())]
    assert all(s == stack_schemas[0] for s in stack_schemas), stack_schemas
    for stack in (*ours["stacks"].values(), *theirs["stacks"].values()):
        assert [p["strategy"] for p in stack["plans"]] == ["none", "adjacent", "threshold", "optimal"]
        threshold = next(p for p in stack["plans"] if p["strategy"] == "threshold")
        assert isinstance(threshold["threshold"], float)  # a field, not a key like "threshold (≤ 0.0012)"
        for plan in stack["plans"]:
            assert all(isinstance(g, list) and all(isinstance(b, int) for b in g) for g in plan["groups"])  # lists of lists
            assert sorted(b for g in plan["groups"] for b in g) == list(range(len(stack["blocks"])))
        assert stack["optimal"] == next(p["groups"] for p in stack["plans"] if p["strategy"] == "optimal")


def test_a_divergence_report_saves_the_table_it_prints(tmp_path):
    report = foreign_report()
    *heatmaps, tables, record = report.save(tmp_path)
    assert tables.name == "divergence.md" and tables.read_text() == str(report) + "\n"
    saved = json.loads(record.read_text())
    assert {k: v for k, v in saved.items() if k != "heatmaps"} == report.to_dict()
    assert saved["heatmaps"] == [p.name for p in heatmaps] and all(p.is_file() for p in heatmaps)
    assert "| h | optimal | 1 run |" in str(report)  # max_groups=1: one run, not "1 runs"


def test_a_model_report_prints_saves_and_reads_as_the_same_values(tmp_path):
    for report in (model_report(create_model("mobileclip_tiny")), model_report(torch.nn.Linear(4, 3), torch.randn(2, 4))):
        assert isinstance(report, ModelReport)
        saved = json.loads(report.save(tmp_path / "report.json").read_text())
        assert saved == report.to_dict() == dict(report)
        printed = str(report)
        assert printed.startswith("| measure | value |")
        for key, value in report.items():
            if not isinstance(value, dict):
                assert f"| {key} |" in printed, key


def test_counts_of_one_are_singular():
    assert count(1, "thread") == "1 thread" and count(2, "thread") == "2 threads" and count(0, "run") == "0 runs"
    assert count(1, "batch", "batches") == "1 batch" and count(2_000, "sample") == "2,000 samples"
    from siclip.analysis.benchmark import device_name

    one = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert device_name("cpu").endswith("CPU, 1 thread")
    finally:
        torch.set_num_threads(one)
