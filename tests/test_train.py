import json

import pytest
import torch

from siclip.distill import ObjectiveConfig
from siclip.blocks import count_parameters
from siclip.models import load_checkpoint, save_checkpoint, create_model
from siclip.train import DataConfig, NonFiniteLoss, TrainConfig, train, warmup_cosine


def _config(tmp_path, name, **kw):
    base = dict(model="mobileclip_tiny", out_dir=str(tmp_path / name), data=DataConfig(num_train=96, batch_size=16),
                epochs=2, warmup_steps=2, log_every=2, checkpoint_every=100, evaluate=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return load_checkpoint(path).state_dict()


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_for_bit_equal(tmp_path):
    straight = train(_config(tmp_path, "straight"), progress=False)
    assert straight["steps"] == straight["total_steps"] == 12
    interrupted = _config(tmp_path, "resumed")
    partial = train(interrupted, max_steps=5, progress=False)  # stops mid-epoch 0
    assert partial["steps"] == 5 and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train(interrupted, resume=True, progress=False)
    assert resumed["steps"] == 12
    a, b = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 12 and "clip" in summary["final_loss"]
    assert (tmp_path / "resumed" / "metrics.csv").read_text().startswith("step,clip,total,lr")


@pytest.mark.slow
@pytest.mark.parametrize("memory_saving", [False, True], ids=["plain", "fused+checkpointed"])
def test_siclip_student_distils_from_a_teacher_checkpoint(tmp_path, memory_saving):
    teacher = save_checkpoint(create_model("mobileclip_tiny"), tmp_path / "teacher.pt")
    # The fused variant trains the text-only ablation, whose image tower is all frozen and so gets fused.
    overrides = {"siclip": {"convert": ["text"]}} if memory_saving else {}
    config = _config(tmp_path, "student", model="siclip_tiny", teacher=str(teacher), epochs=1, objective=ObjectiveConfig(),
                     fuse_frozen_towers=memory_saving, grad_checkpointing=memory_saving, model_overrides=overrides)  # fmt: skip
    summary = train(config, progress=False)
    assert set(summary["final_loss"]) == {"clip", "feature", "relation", "interactive", "pair_matching", "total"}
    student = load_checkpoint(tmp_path / "student" / "model.pt")
    sasp = [student.text.transformer] + ([] if memory_saving else [student.visual.network[7]])
    assert summary["parameters"]["trainable"] == sum(map(count_parameters, sasp))  # only the SAS-P blocks train
    assert student.text.transformer[0] is student.text.transformer[1]
    assert student.fused_towers == (["visual"] if memory_saving else [])
    image_blocks = student.visual.network[7]
    assert memory_saving or image_blocks[0].attn is image_blocks[1].attn  # the image SAS-P blocks trained, shared


def test_nan_guard_names_the_term_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    from siclip.losses import ClipLoss

    calls = {"n": 0}
    original = ClipLoss.forward

    def sometimes_nan(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ClipLoss, "forward", sometimes_nan)
    with pytest.raises(NonFiniteLoss, match=r"\['clip', 'total'\] \(clip nan, total nan\) became non-finite in step 3"):
        train(_config(tmp_path, "nan"), progress=False)
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["task"]["student"].values() if v.is_floating_point())


def test_schedule_and_refusals(tmp_path):
    factors = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0 and factors[20] == 0.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    with pytest.raises(ValueError, match="contrastive negatives"):
        train(_config(tmp_path, "acc", accumulation=2), progress=False)
    with pytest.raises(ValueError, match="distils from a teacher .*: pass --teacher SPEC"):
        train(_config(tmp_path, "noteacher", objective=ObjectiveConfig()), progress=False)


def test_training_with_uint8_batches_normalised_on_the_device(tmp_path):
    config = _config(tmp_path, "uint8", epochs=1, data=DataConfig(num_train=32, batch_size=16))
    summary = train(config, progress=False)
    assert summary["steps"] == 2 and all(v == v for v in summary["final_loss"].values())
