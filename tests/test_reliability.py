"""Reliability (issue 14): each test replays one reported fault; the docstring says which."""

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from siclip.blocks import PreLNBlock, SASBlock, SASPBlock
from siclip.data import AugmentConfig, EpochSampler, ImageTextDataset, ImageTextLoader, ShardSource, Skipped, TooManySkipped, create_tokenizer
from siclip.data.sources import SampleError, encode_image
from siclip.distill import ObjectiveConfig, SiCLIPObjective
from siclip.models import create_model, load_checkpoint, save_checkpoint
from siclip.train import CheckpointError, DataConfig, NonFiniteLoss, RunDirectoryBusy, TrainConfig, train, train_or_continue
from siclip.train.state import RunLock, load_training_checkpoint, save_atomic

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, name, **kw):
    base = dict(model="mobileclip_tiny", out_dir=str(tmp_path / name), data=DataConfig(num_train=64, batch_size=16),
                epochs=1, warmup_steps=2, log_every=1, checkpoint_every=100, evaluate=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _all_finite(state: dict) -> bool:
    tensors = [*state["task"]["student"].values(), *state["task"]["objective"].values()]
    tensors += [t for s in state["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# 1. The non-finite guard: loss, gradient and parameters at every step boundary; never a non-finite checkpoint.


# A learning rate whose AdamW update leaves float32's range (3.4e38) is non-finite by construction, whatever the data
# and the trajectory: the optimiser cannot write the step (lr = 30 diverged on some machines and not on others).
OVERFLOWING_LR = 1e300


def test_issue_reproduction_lr_30_stops_naming_the_gradient_and_keeps_finite_checkpoints(tmp_path, monkeypatch):
    """lr=30: the gradient norm went NaN with a finite loss and the step-2 checkpoint held NaN weights. (The schedule
    now jumps to an overflowing lr at step 3, after the checkpoint of step 2.)"""
    from siclip.train import loop

    schedule = loop.warmup_cosine
    monkeypatch.setattr(loop, "warmup_cosine", lambda step, *args: OVERFLOWING_LR if step == 2 else schedule(step, *args))
    config = _config(tmp_path, "lr30", checkpoint_every=2, data=DataConfig(num_train=256, batch_size=16))
    with pytest.raises(NonFiniteLoss, match="became non-finite in step 3") as caught:
        train(config, progress=False)
    message = str(caught.value)
    assert any(what in message for what in ("gradient", "parameter", "loss term", "forward pass", "optimiser step")), message
    path = tmp_path / "lr30" / "checkpoint.pt"
    assert str(path) in message
    state = load_training_checkpoint(path)  # loads (the resume did not): finite, and a step the message names
    assert _all_finite(state) and state["step"] == 2 and f"(after step {state['step']})" in message


def test_nan_gradient_with_finite_loss_is_caught_before_the_step(tmp_path, monkeypatch):
    """A NaN gradient (finite loss) must not reach the weights; the state saved is the untouched one."""
    from siclip.models.clip import CLIP

    calls = {"n": 0}
    original = CLIP.forward

    def poisoned_backward(self, *args, **kw):
        image, text, scale = original(self, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # d(loss)/d(image features) becomes NaN, the loss stays finite
            image = _NaNGrad.apply(image)
        return image, text, scale

    monkeypatch.setattr(CLIP, "forward", poisoned_backward)
    with pytest.raises(NonFiniteLoss, match=r"gradient norm nan \(gradients of .*\) became non-finite in step 3") as caught:
        train(_config(tmp_path, "nangrad", checkpoint_every=1), progress=False)
    state = load_training_checkpoint(tmp_path / "nangrad" / "checkpoint.pt")
    assert state["step"] == 2 and _all_finite(state) and "(after step 2)" in str(caught.value)


class _NaNGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_inf_gradient_never_saves_a_nan_logit_scale_and_the_run_resumes(tmp_path, monkeypatch):
    """An Inf gradient of logit_scale made the guard save a NaN logit_scale over the good checkpoint."""
    config = _config(tmp_path, "infgrad", checkpoint_every=2)
    original = torch.optim.AdamW.step
    steps = {"n": 0}

    def inf_grad_at_step_4(self, *args, **kw):
        steps["n"] += 1
        if steps["n"] == 4:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.ndim == 0:
                        p.grad.fill_(float("inf"))
        return original(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", inf_grad_at_step_4)
    with pytest.raises(NonFiniteLoss, match=r"parameter\(s\) .*logit_scale.* after the optimiser step became non-finite in step 4 .*; "
                                            r"the last good state \(after step 2\)"):  # fmt: skip
        train(config, progress=False)
    state = load_training_checkpoint(tmp_path / "infgrad" / "checkpoint.pt")
    assert state["step"] == 2 and _all_finite(state)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    summary = train(config, resume=True, progress=False)
    assert summary["steps"] == summary["total_steps"] == 4


def test_non_finite_features_are_reported_as_the_forward_pass(tmp_path, monkeypatch):
    """A NaN in the features failed inside the loss's input check, naming no term and saving nothing."""
    from siclip.models.clip import CLIP

    original, calls = CLIP.forward, {"n": 0}

    def nan_features(self, *args, **kw):
        image, text, scale = original(self, *args, **kw)
        calls["n"] += 1
        return (image * float("nan") if calls["n"] == 2 else image), text, scale

    monkeypatch.setattr(CLIP, "forward", nan_features)
    with pytest.raises(NonFiniteLoss, match=r"the forward pass \(image_features contains NaN or Inf\) became non-finite in step 2"):
        train(_config(tmp_path, "nanfeat"), progress=False)
    assert load_training_checkpoint(tmp_path / "nanfeat" / "checkpoint.pt")["step"] == 1


def _script(name: str):
    """The module an ``experiments/`` script calls (``siclip.commands.<command>``, whose ``main`` it runs): patching its
    names patches what the script runs."""
    import importlib
    import re

    caller = (ROOT / "experiments" / f"{name}.py").read_text()
    return importlib.import_module(re.search(r"^from (siclip\.commands\.\w+) import main$", caller, re.M).group(1))


def test_cli_huge_lr_stops_with_a_message_and_status_1(tmp_path, capsys):
    """From the CLI, --lr 1e3 failed inside the loss's check with no checkpoint at all. (An overflowing lr now: the
    first step writes ±inf into the weights by construction, see OVERFLOWING_LR.)"""
    from siclip import cli

    out = tmp_path / "cli"
    status = cli.run(_script("train").main, ["--lr", str(OVERFLOWING_LR), "--num-train", "128", "--batch-size", "16", "--out", str(out),
                                             "--no-eval", "--checkpoint-every", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "the optimiser step's update (it overflows float32) became non-finite in step 1" in err, err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error:" in line] == [err.strip().splitlines()[-1]]
    assert not (out / "checkpoint.pt").exists() and "no checkpoint was written in this run" in err


# 3. Bad data stops the run instead of spinning through empty epochs.


def _captions_csv(tmp_path, captions):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i, caption in enumerate(captions):
            (images / f"{i}.png").write_bytes(encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
            writer.writerow([f"images/{i}.png", caption])
    return path


def test_an_epoch_of_skipped_samples_stops_the_run(tmp_path):
    """A CSV whose captions are all empty made train.py spin through thousands of empty epochs."""
    path = _captions_csv(tmp_path, [""] * 32)
    config = _config(tmp_path, "empty", epochs=1000, data=DataConfig(source=str(path), batch_size=8))
    started = time.perf_counter()
    with pytest.raises(TooManySkipped, match=r"every one of the 32 samples read in the epoch was skipped") as caught:
        train(config, progress=False)
    assert time.perf_counter() - started < 60 and "empty or missing caption" in str(caught.value)


def test_skipping_more_than_the_allowed_fraction_stops(tmp_path):
    dataset = ImageTextDataset(ShardSource(_tar(tmp_path / "s.tar", _samples(12, bad={1, 2, 3, 5, 7, 8, 9}))), create_tokenizer(),
                               augment_config=AugmentConfig(16))  # fmt: skip
    with pytest.raises(TooManySkipped, match=r"7 of the 12 samples .* more than the allowed fraction 0.5"):
        list(ImageTextLoader(dataset, batch_size=4, max_skip_fraction=0.5))
    assert len([b for b in ImageTextLoader(dataset, batch_size=4, max_skip_fraction=0.6)]) == 3


# 4. A batch reduced to one pair by skips.


def test_pair_matching_term_on_a_one_pair_batch_is_zero_and_reaches_its_parameters(seed):
    objective = SiCLIPObjective(16, 16, ObjectiveConfig())
    normed = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)  # noqa: E731
    objective = objective.double()
    student = (normed(1, 16).requires_grad_(), normed(1, 16), torch.tensor(10.0, dtype=torch.float64))
    teacher = (normed(1, 16), normed(1, 16), torch.tensor(10.0, dtype=torch.float64))
    terms = objective(student, teacher)
    assert terms["pair_matching"].item() == 0.0 and all(bool(torch.isfinite(v)) for v in terms.values())
    terms["total"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in objective.pair_matching.parameters())
    two = (normed(2, 16), normed(2, 16), student[2])
    assert objective(two, (normed(2, 16), normed(2, 16), teacher[2]))["pair_matching"].item() > 0


def test_wikd_pm_training_counts_the_steps_whose_batch_kept_one_pair(tmp_path, monkeypatch):
    """A batch reduced by skips to one pair crashed WIKD + PM ('pair matching needs at least 2 pairs')."""
    original = ImageTextDataset.__getitem__
    kept = lambda index: index % 3 == 0  # noqa: E731

    def mostly_skipped(self, item):
        _, index = item
        return original(self, item) if kept(index) else Skipped(index, f"#{index}", "test skip")

    monkeypatch.setattr(ImageTextDataset, "__getitem__", mostly_skipped)
    teacher = save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "teacher.pt")
    config = _config(tmp_path, "pm", model="siclip_tiny", teacher=str(teacher), objective=ObjectiveConfig(),
                     data=DataConfig(num_train=48, batch_size=4, max_skip_fraction=None))  # fmt: skip
    sampler = EpochSampler(48, seed=config.seed)
    # The loop runs len(loader) = 12 steps; batches left empty are not steps, so it reaches into epoch 1.
    per_batch = [sum(kept(int(i)) for i in sampler.order(e)[b : b + 4]) for e in (0, 1) for b in range(0, 48, 4)]
    per_step = [n for n in per_batch if n][:12]
    assert per_step.count(1) > 0  # the fixed seed gives one-pair batches
    with pytest.warns(UserWarning, match=f"pair matching skipped on {per_step.count(1)} step"):
        summary = train(config, progress=False)
    assert summary["steps"] == 12 and summary["pm_skipped_steps"] == per_step.count(1)


# 5. Shards: every bad member is counted and reported with its key; a cut archive says what it lost.


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _samples(n, bad=()):
    rng = np.random.default_rng(1)
    members = []
    for i in range(n):
        members.append((f"s{i:03d}.png", encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))))
        members.append((f"s{i:03d}.txt", b"" if i in bad else f"caption {i}".encode()))
    return members


@pytest.mark.parametrize("json_bytes, reason", [
    (b"42", "json member is int 42, not an object"), (b'"x"', "json member is str 'x', not an object"),
    (b"null", "json member is NoneType None, not an object"),
    (b'{"synthetic_captions": "a red circle"}', "must be a list of strings, got str"),
    (b'{"syn_text": ["ok", 3]}', "must be a list of strings, got a list holding \\['int'\\]"),
    (b'["ok", null]', "must be a list of strings, got a list holding \\['NoneType'\\]"),
])  # fmt: skip
def test_json_members_of_the_wrong_type_are_skipped_with_their_key(tmp_path, json_bytes, reason):
    """A valid .json that is not an object ended the epoch with an AttributeError naming no key."""
    path = _tar(tmp_path / "j.tar", [*_samples(3), ("bad.png", _samples(1)[0][1]), ("bad.txt", b"a caption"), ("bad.json", json_bytes)])
    source = ShardSource(path)
    with pytest.raises(SampleError, match=reason) as caught:
        source.load([e.key for e in source.entries].index("bad"))
    assert caught.value.key == "bad"
    dataset = ImageTextDataset(source, create_tokenizer(), augment_config=AugmentConfig(16))
    loader = ImageTextLoader(dataset, batch_size=2, drop_last=False)
    assert sorted(k for batch in loader for k in batch["key"]) == ["s000", "s001", "s002"]
    assert [s.key for s in loader.last_report.skipped] == ["bad"]


def test_non_utf8_caption_is_skipped_with_its_key(tmp_path):
    """A non-UTF-8 .txt was read as U+FFFD replacement characters."""
    path = _tar(tmp_path / "u.tar", [*_samples(2), ("latin.png", _samples(1)[0][1]), ("latin.txt", "café crème".encode("latin-1"))])
    source = ShardSource(path)
    with pytest.raises(SampleError, match="txt member is not UTF-8") as caught:
        source.load(2)
    assert caught.value.key == "latin"


def test_an_archive_cut_at_or_inside_any_later_header_reports_the_lost_rest(tmp_path):
    """A tar cut at or inside a later member header silently dropped the rest of the shard (24 of 103 cut points)."""
    whole = _tar(tmp_path / "whole.tar", _samples(6))
    data = whole.read_bytes()
    assert ShardSource(whole).problems == [] and len(ShardSource(whole)) == 6
    with tarfile.open(whole) as tar:
        headers = [m.offset for m in tar.getmembers()][1:]
    cuts = sorted({c for h in headers for c in (h, h + 1, h + 256, h + 511)})
    for cut in cuts:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        source = ShardSource(tmp_path / "cut.tar")
        assert source.problems, f"cut at byte {cut} went unreported"
        assert any("the rest of the shard is lost" in why or "cut off" in why for _, why in source.problems), source.problems
        assert len(source) <= 6


# 6. One run per directory.


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    """Two runs in one directory corrupted each other's checkpoint and interleaved metrics rows."""
    config = _config(tmp_path, "busy")
    lock = RunLock(Path(config.out_dir))
    try:
        with pytest.raises(RunDirectoryBusy, match=f"in use by another run \\(PID {os.getpid()}\\)"):
            train(config, progress=False)
    finally:
        lock.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from siclip.train.state import RunLock; "
                               f"RunLock(Path({config.out_dir!r})); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=f"PID {holder.pid}"):
            RunLock(Path(config.out_dir))
    finally:
        holder.kill()
        holder.wait()
    RunLock(Path(config.out_dir)).release()  # a killed holder leaves no stale lock


def test_concurrent_atomic_saves_use_their_own_temporary_files(tmp_path):
    path, errors = tmp_path / "checkpoint.pt", []

    def writer(value):
        try:
            for _ in range(10):
                save_atomic({"x": torch.full((1000,), float(value))}, path)
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    x = torch.load(path, weights_only=True)["x"]
    assert bool((x == x[0]).all())


def test_rerunning_into_a_finished_run_needs_resume_or_overwrite(tmp_path):
    config = _config(tmp_path, "again", data=DataConfig(num_train=32, batch_size=16))
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run .*--resume .*--overwrite"):
        train(config, progress=False)
    with pytest.raises(ValueError, match="choose one"):
        train(config, resume=True, overwrite=True, progress=False)
    (Path(config.out_dir) / "checkpoint.pt.tmp").write_bytes(b"left by a killed run")
    train(config, overwrite=True, progress=False)
    rows = (Path(config.out_dir) / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2"]
    assert not (Path(config.out_dir) / "checkpoint.pt.tmp").exists()


# 7-8. Checkpoints load weights-only, with errors naming the file.


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_checkpoint_is_refused_without_running_its_code(tmp_path):
    """--resume executed code from the checkpoint (weights_only=False)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"task": {}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": _RunsCode(str(marker)), "step": 0}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*could run code"):
        load_training_checkpoint(path)
    with pytest.raises(CheckpointError, match="could run code"):
        train(_config(tmp_path, "evil"), resume=True, progress=False)
    assert not marker.exists()


def test_damaged_checkpoint_files_name_the_file_and_the_problem(tmp_path):
    """Truncated, random or zero-byte files gave EOFError('') or KeyError: 101 with no path."""
    good = save_atomic({"task": {"w": torch.randn(64, 64)}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": {}, "step": 3},
                       tmp_path / "good.pt")  # fmt: skip
    assert load_training_checkpoint(good)["step"] == 3
    data = good.read_bytes()
    cases = {"empty.pt": (b"", "is empty"), "random.pt": (np.random.default_rng(0).bytes(5000), "not a PyTorch weights file"),
             "half.pt": (data[: len(data) // 2], "is damaged"), "tail_cut.pt": (data[:-10], "is damaged")}  # fmt: skip
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=problem) as caught:
            load_training_checkpoint(path)
        assert str(path) in str(caught.value)
    other = save_atomic({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a training checkpoint: it needs .* has \['weights'\]"):
        load_training_checkpoint(other)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from siclip.train.state import rng_state, set_rng_state
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_atomic({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# 9. Resume semantics.


def test_resume_writes_each_metrics_row_once_and_keeps_the_final_loss(tmp_path, monkeypatch):
    """Rows since the last checkpoint were written twice; resuming a finished run wrote final_loss {}."""
    from siclip.losses import ClipLoss

    config = _config(tmp_path, "rows", checkpoint_every=2)
    original, calls = ClipLoss.forward, {"n": 0}

    def crash_at_step_4(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(ClipLoss, "forward", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, progress=False)
    assert [r.split(",")[0] for r in (tmp_path / "rows" / "metrics.csv").read_text().splitlines()] == ["step", "1", "2", "3"]
    monkeypatch.setattr(ClipLoss, "forward", original)
    first = train(config, resume=True, progress=False)
    assert [r.split(",")[0] for r in (tmp_path / "rows" / "metrics.csv").read_text().splitlines()] == ["step", "1", "2", "3", "4"]
    again = train(config, resume=True, progress=False)  # after the last checkpoint: nothing left to train
    assert again["steps"] == 4 and again["final_loss"] == first["final_loss"] and "clip" in again["final_loss"]


def test_resume_warns_about_a_changed_lr_and_a_missing_checkpoint(tmp_path):
    config = _config(tmp_path, "lr", data=DataConfig(num_train=32, batch_size=16))
    with pytest.warns(UserWarning, match=f"no checkpoint at {tmp_path / 'lr' / 'checkpoint.pt'}; starting from step 0"):
        train(config, resume=True, max_steps=1, progress=False)
    changed = dataclasses.replace(config, lr=5e-2)
    with pytest.warns(UserWarning, match=r"lr is 0.05 but .* was written with 0.001; the run continues with the checkpoint's 0.001"):
        summary = train(changed, resume=True, progress=False)
    assert summary["config"]["lr"] == 1e-3
    assert load_training_checkpoint(tmp_path / "lr" / "checkpoint.pt")["config"]["lr"] == 1e-3


def test_train_or_continue_starts_quietly_restarts_a_start_without_checkpoint_and_continues(tmp_path):
    """A study's runs (ablation, data scale, snapshots) are called again until they finish: a fresh run must not
    warn about a missing checkpoint, a start killed before its first checkpoint starts over (train(resume=True)
    appended to its log), and one with a checkpoint continues."""
    config = _config(tmp_path, "study", data=DataConfig(num_train=48, batch_size=16))
    run, steps = tmp_path / "study", lambda: [r.split(",")[0] for r in (tmp_path / "study" / "metrics.csv").read_text().splitlines()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_or_continue(config, max_steps=1, progress=False)
    assert not [w for w in caught if "checkpoint" in str(w.message)], [str(w.message) for w in caught]
    assert steps() == ["step", "1"]
    (run / "checkpoint.pt").unlink()  # as if killed before its first checkpoint: its log stays behind
    train_or_continue(config, max_steps=2, progress=False)
    assert steps() == ["step", "1", "2"]  # started over, not [1, 1, 2]
    summary = train_or_continue(config, progress=False)
    assert steps() == ["step", "1", "2", "3"] and summary["steps"] == summary["total_steps"] == 3


# 10. Knobs and input shapes.


def test_cli_knobs_reach_the_config(monkeypatch):
    from siclip.commands.train import parse  # experiments/train.py is a thin caller of it

    config, args = parse(["--checkpoint-every", "7", "--dist-timeout", "60", "--overwrite", "--max-skip-fraction", "0.2", "--no-eval"])
    assert (config.checkpoint_every, config.dist_timeout, config.data.max_skip_fraction, config.evaluate) == (7, 60.0, 0.2, False)
    assert args.overwrite and not args.resume
    seen = {}

    def record(backend, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", record)
    with pytest.raises(RuntimeError, match="stop here"):
        train(config)
    assert seen["timeout"].total_seconds() == 60.0


@pytest.mark.parametrize("block", [SASPBlock, SASBlock, PreLNBlock])
def test_blocks_name_the_shape_they_need(block):
    module = block(32, 4)
    with pytest.raises(ValueError, match=r"takes a \(batch, tokens, 32\) tensor, got shape \(10, 32\) \(add a batch axis"):
        module(torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"got shape \(2, 10, 16\)"):
        module(torch.randn(2, 10, 16))
    assert module(torch.randn(2, 10, 32)).shape == (2, 10, 32)


# 2. Signals: save at the next step boundary, exit 130/143, resume to the uninterrupted weights.


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "train.py"), "--model", "mobileclip_tiny", "--num-train", "96",
            "--batch-size", "16", "--epochs", "2", "--out", str(out), "--no-eval", "--log-every", "1", *extra]  # fmt: skip


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "straight"
    subprocess.run(_cli(out), check=True, capture_output=True, env=_env())
    return load_checkpoint(out / "model.pt").state_dict()


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_at_the_next_step_and_resume_ends_equal(tmp_path, uninterrupted, signum, status):
    """SIGINT/SIGTERM lost everything since the last checkpoint (up to 99 steps from the CLI)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 300
    while _rows(out / "metrics.csv") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-2000:]
    state = load_training_checkpoint(out / "checkpoint.pt")
    assert 3 <= state["step"] < 12 and state["step"] == _rows(out / "metrics.csv")  # the step boundary after the signal
    assert f"{signal.Signals(signum).name} at step {state['step']}" in err
    assert json.loads((out / "summary.json").read_text())["interrupted"] == signal.Signals(signum).name
    subprocess.run(_cli(out, "--resume"), check=True, capture_output=True, env=_env())
    resumed = load_checkpoint(out / "model.pt").state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]] == list(range(1, 13))


@pytest.mark.slow
def test_fault_injection_smoke(tmp_path):
    """The fault-injection script's cheapest category (the reference run; an overflowing lr from the start and in a later
    step, whose resume ends on the reference weights; a NaN teacher) prints its table."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_injection.py"), "--rounds", "1", "--categories", "nan",
                             "--work", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| nan | 4 | 4 | 0 | 0 | 0 |" in result.stdout and "| **total** | **4** | **4** | **0** | **0** | **0** |" in result.stdout
