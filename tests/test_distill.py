import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siclip.data import AugmentConfig, EmbeddedConfig, EmbeddedSource, ImageTextDataset, ImageTextLoader, TeacherCache
from siclip.data import build_teacher_cache, create_tokenizer, model_pixels
from siclip.distill import CachedTeacher, FrozenTeacher, ObjectiveConfig, SiCLIPObjective
from siclip.models import build_siclip, create_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def teacher_model():
    torch.manual_seed(0)
    return create_model("mobileclip_tiny").eval()


def test_frozen_teacher_stays_frozen_and_in_eval(teacher_model):
    teacher = FrozenTeacher(teacher_model)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), "text": torch.randint(1, 100, (2, 32))}
    image, text, scale = teacher(batch)
    assert not image.requires_grad and image.shape == (2, 128) and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_teacher_cache_gives_the_identical_loss(tmp_path, teacher_model):
    """The objective computed from cached teacher features equals the one from the teacher's forward pass."""
    source = EmbeddedSource(EmbeddedConfig(num_val=24), "val")
    tokenizer = create_tokenizer()
    view = AugmentConfig(64, train=False, normalize=False)  # the cache stores the evaluation view; train on it for the identity
    path = build_teacher_cache(source, teacher_model.encode_image, teacher_model.encode_text, tokenizer, tmp_path / "cache",
                               preprocess=teacher_model.preprocess, batch_size=10, dtype="float32",
                               logit_scale=teacher_model.scale().item(), progress=False)  # fmt: skip
    cache = TeacherCache(path, preprocess=teacher_model.preprocess)
    dataset = ImageTextDataset(source, tokenizer, augment_config=view, teacher_cache=cache, seed=1)
    batch = next(iter(ImageTextLoader(dataset, batch_size=12, seed=2)))
    student, _ = build_siclip(teacher_model)
    objective = SiCLIPObjective(128)
    out = student(model_pixels(batch["image"], student.preprocess), batch["text"])
    live = objective(out, FrozenTeacher(teacher_model)(batch))
    cached = objective(out, CachedTeacher.from_cache(cache)(batch))
    for name in live:
        torch.testing.assert_close(cached[name], live[name], rtol=1e-6, atol=1e-6, msg=name)


def test_cache_teacher_script(tmp_path, teacher_model):
    checkpoint = save_checkpoint(teacher_model, tmp_path / "teacher.pt")
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "cache_teacher.py"), "--teacher", str(checkpoint), "--data", "embedded",
         "--num-train", "20", "--out", str(tmp_path / "cache")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 20 and cache.meta["logit_scale"] == pytest.approx(teacher_model.scale().item())


def test_one_training_step_reaches_every_trainable_parameter(teacher_model):
    student, _ = build_siclip(teacher_model)
    objective = SiCLIPObjective(128, config=ObjectiveConfig())
    params = [p for p in student.parameters() if p.requires_grad] + list(objective.parameters())
    batch = {"image": torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8), "text": torch.randint(1, 100, (6, 32))}
    batch["text"][:, 10] = 107
    terms = objective(student(model_pixels(batch["image"], student.preprocess), batch["text"]), FrozenTeacher(teacher_model)(batch))
    terms["total"].backward()
    missing = [p.shape for p in params if p.grad is None]
    assert not missing, missing
    # the frozen image prefix keeps no graph; only the image SAS-P stage gets gradients
    assert all((p.grad is not None) == name.startswith("network.7.") for name, p in student.visual.named_parameters())
