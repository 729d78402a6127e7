"""Compute-matched training (siclip.train.budget): a budget in FLOPs sets the steps, and the run spends it."""

import copy
import json

import pytest
import torch

from siclip.blocks.flop_count import TotalFlops, flop_counter
from siclip.distill import ObjectiveConfig, SiCLIPObjective
from siclip.models import create_model, load_checkpoint, save_checkpoint
from siclip.train import DataConfig, TrainConfig, train
from siclip.train.budget import budget_steps, measure_step_flops, phase_flops, phased_budget_steps
from siclip.train.step import forward_terms
from siclip.train.task import TrainingTask

TINY = {"image": {"image_size": 32}, "text": {"layers": 1}}


def _config(tmp_path, name, **kw) -> TrainConfig:
    base = dict(model="mobileclip_tiny", model_overrides=TINY, out_dir=str(tmp_path / name), data=DataConfig(num_train=32, batch_size=8),
                warmup_steps=2, log_every=5, checkpoint_every=1000, evaluate=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _batch(model, size: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8)
    ids = torch.randint(1, 200, (size, 32), generator=g)
    ids[:, 10] = model.config.text.vocab_size - 1  # the end-of-text token
    return {"image": images, "text": ids, "size": size}


def test_measuring_a_step_counts_its_forward_and_backward_and_changes_nothing(seed):
    model = create_model("mobileclip_tiny", **TINY)
    task = TrainingTask(model, SiCLIPObjective(128, None, ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)))
    batches = [_batch(model, seed=seed), _batch(model, seed=seed + 1)]
    before = copy.deepcopy(task.state_dict())
    rng = torch.get_rng_state()
    measured = measure_step_flops(task, batches, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in task.parameters())
    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics and counters put back
    reference = copy.deepcopy(task).train()
    with flop_counter() as counter:  # the same step, counted by PyTorch's FlopCounterMode on a copy
        forward_terms(reference, batches[0], bf16=False)["total"].backward()
    assert measured == counter.get_total_flops() > 0  # every step of a batch size costs the same
    assert budget_steps(10.4 * measured, measured) == 10 and budget_steps(0.2 * measured, measured) == 1
    with pytest.raises(ValueError, match="positive"):
        budget_steps(-1.0, measured)


@pytest.mark.parametrize("image", [{"block": "sasp"}, {"family": "timm", "model_name": "test_convnext"}], ids=["vit-sasp", "timm"])
def test_total_flops_counts_what_pytorchs_flop_counter_counts(image, seed):
    if image.get("family") == "timm":
        pytest.importorskip("timm")
    tower = create_model("clip_vit_tiny", image={"image_size": 32, **image}).visual.train()
    images = torch.randn(4, 3, 32, 32)
    with TotalFlops() as lean:
        tower(images).square().sum().backward()
    with flop_counter() as reference:
        tower(images).square().sum().backward()
    assert lean.get_total_flops() == reference.get_total_flops() > 0


def _step_cost(tmp_path, name, **kw) -> float:
    """One training step's FLOPs as a budgeted run measures them (a run stopped before its first step)."""
    return train(_config(tmp_path, name, budget_tflops=1.0, **kw), max_steps=0, progress=False)["flops_per_step"]


class StepCounter:
    """Counts, independently of the budget's own measurement, the FLOPs of every forward and backward the training
    loop runs: its calls of ``forward_terms`` and ``backward_and_step`` are counted as they happen."""

    def __init__(self, monkeypatch) -> None:
        import siclip.train.loop as loop

        self.total, self.steps = 0, 0
        for name in ("forward_terms", "backward_and_step"):
            monkeypatch.setattr(loop, name, self.counted(getattr(loop, name), name == "backward_and_step"))

    def counted(self, call, is_step: bool):
        def wrapper(*args, **kwargs):
            with TotalFlops() as counter:
                out = call(*args, **kwargs)
            self.total += counter.get_total_flops()
            self.steps += is_step
            return out

        return wrapper


# One case per strategy and tower: TrainConfig fields (a teacher checkpoint is put where the value is "TEACHER").
# SLIP's extra views, FLIP's masking and CLIP+DA's views are part of the task's forward, which the budget measures.
BUDGET_CASES = {
    "clip-hybrid": {},
    "clip-cnn": {"image_tower": "cnn_tiny"},
    "clip-vit": {"image_tower": "vit_tiny"},
    "clip-timm": {"model_overrides": {**TINY, "image": {"family": "timm", "model_name": "test_vit", "image_size": 32,
                                                        "kwargs": {"img_size": 32, "patch_size": 8}}}},  # fmt: skip
    "wikd-student": {"model": "siclip_tiny", "teacher": "TEACHER", "objective": ObjectiveConfig()},
    "slip-hybrid": {"objective": ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0, ssl_scale=1.0)},
    "flip-vit": {"image_tower": "vit_tiny", "mask_ratio": 0.5},
    "clip-da-cnn": {"image_tower": "cnn_tiny", "data": DataConfig(num_train=32, batch_size=8, augment="strong", text_augment=0.1)},
}


@pytest.mark.parametrize("case", sorted(BUDGET_CASES))
def test_a_budget_lands_within_two_percent_of_its_flops(tmp_path, monkeypatch, case):
    """Every step the loop runs costs exactly the measured F (counted independently, over the first steps of the run), and
    the steps planned, round(B / F), spend the budget B to within 2 %."""
    fields = dict(BUDGET_CASES[case])
    if "model_overrides" in fields and fields["model_overrides"]["image"].get("family") == "timm":
        pytest.importorskip("timm")
    if fields.get("teacher") == "TEACHER":
        fields["teacher"] = str(save_checkpoint(create_model("mobileclip_tiny", **TINY), tmp_path / "teacher.pt"))
    budget = 0.1e12
    counter = StepCounter(monkeypatch)
    summary = train(_config(tmp_path, "run", budget_tflops=budget / 1e12, **fields), max_steps=3, progress=False)
    per_step = summary["flops_per_step"]
    assert counter.steps == summary["steps"] == 3 and counter.total == 3 * per_step == summary["flops_spent"]
    assert summary["total_steps"] == round(budget / per_step) >= 25 and summary["budget_flops"] == budget
    assert abs(summary["total_steps"] * per_step - budget) <= 0.02 * budget
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["flops_per_step"] == per_step and saved["epochs_run"] == pytest.approx(3 / 4)


@pytest.mark.slow  # three runs (and a measurement) to show a whole run spends its budget and a resume changes nothing
def test_a_budgeted_run_spends_its_budget_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    per_step = _step_cost(tmp_path, "cost", image_tower="vit_tiny")
    budget = 9.1 * per_step  # 9 steps: two epochs and a part
    config = dict(image_tower="vit_tiny", budget_tflops=budget / 1e12)
    counter = StepCounter(monkeypatch)
    straight = train(_config(tmp_path, "straight", **config), progress=False)
    spent = counter.total
    assert counter.steps == straight["steps"] == 9 and abs(spent - budget) <= 0.02 * budget  # a whole run's steps, counted
    train(_config(tmp_path, "resumed", **config), max_steps=5, progress=False)
    resumed = train(_config(tmp_path, "resumed", **config), resume=True, progress=False)
    assert resumed["steps"] == 9 and resumed["flops_spent"] == straight["flops_spent"] == spent
    a, b = (load_checkpoint(tmp_path / name / "model.pt").state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_phased_steps_are_the_count_whose_cost_comes_nearest_the_budget(seed):
    """FLIP's unmasked tail makes the last steps dearer: the planned T is, among every T up to a bound, the one whose
    cost (T − u(T))·F_m + u(T)·F_u is nearest B (a brute-force reference), for a fixed tail and a fractional one."""
    import math
    import random

    rng = random.Random(seed)
    for _ in range(200):
        masked, unmasked = rng.uniform(1, 10), rng.uniform(1, 20)
        tail = rng.choice([lambda total, n=rng.randint(0, 30): max(0, total - n),
                           lambda total, f=rng.random(): total - math.ceil(f * total)])  # fmt: skip
        budget = rng.uniform(0.5, 400) * masked

        def cost(total):
            return phase_flops(total, tail(total), masked, unmasked)

        nearest = min(range(1, 2000), key=lambda total: (abs(cost(total) - budget), total))
        assert phased_budget_steps(budget, masked, unmasked, tail) == nearest
    assert phase_flops(10, 7, 2.0, 5.0) == 7 * 2.0 + 3 * 5.0 and phase_flops(5, 7, 2.0, 5.0) == 10.0


def test_a_flip_run_with_unmasked_tuning_spends_its_budget(tmp_path, monkeypatch):
    """Masked steps and the dearer unmasked tail, each counted as it runs: the whole run lands within 2 % of B and the
    summary's flops_spent is what ran."""
    fields = dict(image_tower="vit_tiny", mask_ratio=0.5, unmasked_fraction=0.4)
    measured = train(_config(tmp_path, "cost", budget_tflops=1.0, **fields), max_steps=0, progress=False)
    masked, unmasked = measured["flops_per_step"], measured["flops_per_unmasked_step"]
    assert unmasked > masked  # half the patch tokens dropped: a masked step is cheaper (the text tower's cost is the same)
    budget = 6.1 * masked + 4 * unmasked  # 10 steps: 6 masked, 4 unmasked (⌈0.4 · 10⌉), and a tenth of a step over
    counter = StepCounter(monkeypatch)
    summary = train(_config(tmp_path, "run", budget_tflops=budget / 1e12, **fields), progress=False)
    assert counter.steps == summary["steps"] == summary["total_steps"] == 10
    assert counter.total == pytest.approx(summary["flops_spent"], rel=1e-12) and abs(counter.total - budget) <= 0.02 * budget
