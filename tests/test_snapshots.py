"""Snapshots through a run and the adjacent-block divergences read from them."""

import math

import torch

from siclip.analysis.divergence import adjacent_trajectory, plot_trajectory, text_divergences
from siclip.models.siclip import attention_stage
from siclip.models import create_model, load_checkpoint
from siclip.train import DataConfig, TrainConfig
from siclip.train.snapshots import train_with_snapshots


def test_snapshots_are_the_run_at_those_steps(tmp_path):
    config = TrainConfig(model="mobileclip_tiny", out_dir=str(tmp_path / "run"), data=DataConfig(num_train=48, batch_size=16),
                         epochs=2, warmup_steps=1, log_every=1, checkpoint_every=100, evaluate=False)  # fmt: skip
    paths = train_with_snapshots(config, [0, 2, 6])
    assert sorted(paths) == [0, 2, 6] and all(p.exists() for p in paths.values())
    final, first = load_checkpoint(tmp_path / "run" / "model.pt").state_dict(), load_checkpoint(paths[0]).state_dict()
    last, middle = load_checkpoint(paths[6]).state_dict(), load_checkpoint(paths[2]).state_dict()
    torch.manual_seed(config.seed)
    init = create_model("mobileclip_tiny").state_dict()
    assert all(torch.equal(first[k], init[k]) for k in init)  # step 0: the weights training starts from
    assert all(torch.equal(last[k], final[k]) for k in final)  # the last step: the run's model
    assert any(not torch.equal(middle[k], final[k]) for k in final) and any(not torch.equal(middle[k], init[k]) for k in init)
    again = train_with_snapshots(config, [0, 2, 6])  # resumable: nothing is retrained
    assert again == paths and load_checkpoint(paths[2]).state_dict()["logit_scale"].equal(middle["logit_scale"])


def test_adjacent_trajectory_reads_both_towers(tmp_path, seed):
    model = create_model("mobileclip_tiny", image={"layers": [1, 1, 2, 2]}).eval()  # two attention blocks in the last stage
    ids, images = torch.randint(1, 200, (4, 32)), torch.randn(2, 3, 64, 64)
    image_blocks = attention_stage(model)[1]
    rows = adjacent_trajectory({0: model, 5: model}, ids, images)
    text = [r for r in rows if r["tower"] == "text"]
    assert [r["pair"] for r in text] == ["0-1", "1-2", "2-3"] * 2 and [r["step"] for r in text] == [0] * 3 + [5] * 3
    full = text_divergences(model, ids)["attention"]  # over the positions up to each end-of-text, as the trajectory reads them
    assert math.isclose(text[1]["attention"], float(full[1, 2]), rel_tol=1e-9)
    assert all(0 <= r["attention"] <= math.log(2) and 0 <= r["features"] <= math.log(2) for r in rows)
    image = [r for r in rows if r["tower"] == "image"]
    assert len(image_blocks) == 2 and [r["pair"] for r in image] == ["0-1"] * 2
    one = adjacent_trajectory({0: create_model("mobileclip_tiny", image={"layers": [1, 1, 2, 1]}).eval()}, ids, images)
    assert {r["tower"] for r in one} == {"text"}  # an image tower with one attention block has no pair
    assert plot_trajectory(rows, tmp_path / "t.png", "test").stat().st_size > 0


def test_divergence_report_trajectory_of_a_preset(tmp_path, monkeypatch):
    import pandas as pd

    from siclip.commands import divergence as report

    tiny = TrainConfig(model="mobileclip_tiny", model_overrides={"image": {"layers": [1, 1, 2, 2]}}, epochs=1, warmup_steps=1,
                       checkpoint_every=100, evaluate=False, data=DataConfig(num_train=48, batch_size=16))  # fmt: skip
    monkeypatch.setitem(report.PRESETS, "tiny", tiny)
    assert report.main(["--preset", "tiny", "--snapshots", "3", "--calibration-count", "8", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "trajectory.csv")
    assert sorted(frame.step.unique()) == [0, 2, 3]  # 3 steps in all: 0, round(1.5) = 2, 3
    assert set(frame.tower) == {"text", "image"} and (tmp_path / "trajectory.png").stat().st_size > 0
    assert (tmp_path / "run" / "model.pt").exists()
