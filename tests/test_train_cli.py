"""`siclip train` from the command line: every setting reachable, the paper's recipe three ways, a run's saved config
reproducing it, one-line refusals, and a smoke run of --preset paper-s0 on shards."""

import json
import shlex
from pathlib import Path

import pytest
import torch

from siclip import cli
from siclip.commands import train as command

ROOT = Path(__file__).resolve().parents[1]


def _printed(capsys, argv) -> str:
    assert command.main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def _readme_recipe() -> list[str]:
    """docs/training.md's command line for the paper's recipe (so the documented claim is the one tested)."""
    lines = (ROOT / "docs" / "training.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("siclip train --model siclip_s0"))
    command_line = ""
    for line in lines[start:]:
        command_line += line.strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(command_line)[2:]


@pytest.fixture
def paper_files(tmp_path, monkeypatch):
    """The recipe's inputs as the user would hold them (their existence is checked; they are not read here)."""
    monkeypatch.chdir(tmp_path)
    Path("mobileclip_s0.pt").write_bytes(b"")
    Path("data/shards").mkdir(parents=True)
    return tmp_path


def test_the_paper_recipe_as_a_command_line_a_config_file_and_a_preset_prints_one_config(paper_files, capsys):
    from_flags = _printed(capsys, _readme_recipe())
    from_file = _printed(capsys, ["--config", str(ROOT / "experiments" / "paper_s0.yaml")])
    from_preset = _printed(capsys, ["--preset", "paper-s0"])
    assert from_flags == from_file == from_preset
    for line in ("data:\n  source: \"data/shards\"", "  batch_size: 1536", "epochs: 32", "lr: 0.001", "weight_decay: 0.1",
                 "warmup_steps: 10000", "  feature: 4000.0", "  relation: 1.0", "  interactive: 1.0", "  pair_matching: 0.1",
                 'precision: "auto"', 'teacher: "mobileclip_s0.pt"', 'model: "siclip_s0"'):  # fmt: skip
        assert line in from_flags, line
    # precedence: preset < file < --set < named flags
    (paper_files / "run.json").write_text(json.dumps({"lr": 0.002, "data": {"batch_size": 512}}))
    mixed = _printed(capsys, ["--preset", "paper-s0", "--config", "run.json", "--set", "lr=0.003", "--set", "data.workers=2", "--workers", "4"])
    assert "lr: 0.003" in mixed and "  batch_size: 512" in mixed and "  workers: 4" in mixed and "epochs: 32" in mixed


def test_help_shows_every_named_flag_with_its_default_and_every_setting(capsys):
    with pytest.raises(SystemExit):
        command.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--weight-decay", "--warmup-steps", "--betas", "--eps", "--accumulation", "--precision", "--grad-clip", "--seed", "--device",
                 "--lambda-feature", "--lambda-relation", "--lambda-interactive", "--lambda-pair-matching", "--zeroshot", "--retrieval",
                 "--config", "--set", "--preset", "--distill-teacher", "--epochs", "--lr", "--batch-size"):  # fmt: skip
        assert flag in text, flag
    assert "--eval-zeroshot" not in text and "--eval-retrieval" not in text  # the old spellings still work, unlisted
    parser = command.build_parser()
    for action in parser._actions:
        if action.option_strings and action.help != "==SUPPRESS==" and action.dest != "help":
            assert "(default:" in action.help, action.option_strings
    assert "data.tokenizer_check_samples (int, default 512)" in text and "objective.pm_mining" in text
    assert "precedence" in text


def test_old_flag_spellings_and_refusals_in_one_line(tmp_path, capsys, monkeypatch):
    config, _ = command.parse(["--eval-zeroshot", str(tmp_path), "--eval-retrieval", "embedded", "--classnames", "cifar10"])
    assert (config.eval_zeroshot, config.eval_retrieval, config.eval_classnames) == (str(tmp_path), "embedded", "cifar10")
    notes = capsys.readouterr().err.splitlines()  # each old spelling says its new one, once
    assert [line.split(": note: ")[1] for line in notes] == [f"--eval-{name} is now --{name}; the old spelling goes in the next release"
                                                             for name in ("zeroshot", "retrieval")]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["siclip train"])
    (tmp_path / "bad.yaml").write_text("data:\n  batch_sise: 4\n")
    for argv, line in [(["--config", str(tmp_path / "bad.yaml")], f"{tmp_path / 'bad.yaml'}: unknown setting 'data.batch_sise' (did you mean data.batch_size?)"),
                       (["--accumulation", "4"], "accumulation 4: gradient accumulation would split each batch's contrastive negatives"),
                       (["--wikd", "--model", "siclip_tiny", "--out", str(tmp_path / "run")],
                        "the objective distils from a teacher (objective.feature/relation/interactive > 0, as --wikd sets) and none was given: "
                        "pass --teacher SPEC"),
                       (["--set", "lr=0"], "--set: lr: must be greater than 0, got 0"),
                       (["--set", "objective.pm_form=plane"], "--set: objective.pm_form: expected one of hyperplane, cosine")]:  # fmt: skip
        assert cli.run(command.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"siclip train: error: {line}") and err.count("\n") == 1, err


@pytest.mark.slow  # a SiCLIP-tiny student built from a teacher file (calibration, fusing) and two steps: 5–10 s on a quiet 2-core CPU
def test_paper_preset_smoke_run_on_shards_and_its_saved_config_reproduces_it(tmp_path, capsys, monkeypatch):
    """--preset paper-s0 with tiny overrides: a SiCLIP-tiny student of a tiny teacher file, two steps on embedded shards."""
    from siclip.data import EmbeddedConfig, EmbeddedSource, write_shards
    from siclip.models import create_model, save_checkpoint

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(create_model("mobileclip_tiny", image={"image_size": 32}), "teacher.pt")
    write_shards(EmbeddedSource(EmbeddedConfig(num_train=8, image_size=32), "train"), "shards", samples_per_shard=4, progress=False)
    argv = ["--preset", "paper-s0", "--set", "model=siclip_tiny", "--teacher", "teacher.pt", "--data", "shards", "--batch-size", "4",
            "--epochs", "1", "--warmup-steps", "1", "--workers", "0", "--no-eval", "--set", "calibration_captions=4", "--out", "run"]  # fmt: skip
    assert command.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(Path("run/summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["final_loss"]) == {"clip", "feature", "relation", "interactive", "pair_matching", "total"}
    saved = json.loads(Path("run/config.json").read_text())
    assert saved["data"]["batch_size"] == 4 and saved["objective"]["feature"] == 4000 and saved["epochs"] == 1
    # the block printed at start is the resolved config; the saved config.json gives it back
    block = out.split("saved in run/config.json:\n", 1)[1].split("\ntrain ", 1)[0]
    printed = "\n".join(line.removeprefix("  ") for line in block.splitlines() if line.startswith("  ")) + "\n"
    assert _printed(capsys, ["--config", "run/config.json"]) == printed
    assert _printed(capsys, ["--config", "run/summary.json"]) == printed
