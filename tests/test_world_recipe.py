"""The pieces of the embedded-world recipe that teaches shape: padding-blind text attention, shape twins
grouped in batches, per-tower learning rates and frozen starts, crop settings, and their command line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from siclip.analysis.divergence import attention_probabilities, text_divergences
from siclip.data import EmbeddedConfig, EpochSampler
from siclip.data.embedded import EmbeddedSource
from siclip.data.world import render_scene
from siclip.models import create_model
from siclip.models.text import MCt, TextConfig
from siclip.train import TrainConfig
from siclip.train.config import DataConfig
from siclip.train.inputs import open_training_source, settled_model_config
from siclip.train.loop import tower_schedules
from siclip.train.step import create_optimizer, tower_of

CONFIG = dict(vocab_size=50, context_length=12, width=32, heads=4, layers=2, mixer_kernel=3)


def _ids(lengths: list[int], context: int = 12, pad_fill: torch.Generator | None = None) -> torch.Tensor:
    """Rows ``[sot] words [eot] pad…``; eot = 49 is the largest id; padding 0 unless ``pad_fill`` draws it."""
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = 48
        ids[row, 1 : n + 1] = torch.randint(2, 48, (n,))
        ids[row, n + 1] = 49
        if pad_fill is not None:
            ids[row, n + 2 :] = torch.randint(0, 48, (context - n - 2,), generator=pad_fill)
    return ids


def test_masked_text_attention_never_reads_padding():
    # Mixers with layer scale 0 are identities, so only attention could carry padding into the pooled token.
    torch.manual_seed(0)
    ids = _ids([3, 5, 9])
    other = ids.clone()
    after_eot = torch.arange(12)[None] > ids.argmax(-1)[:, None]
    other[after_eot] = torch.randint(0, 48, (int(after_eot.sum()),))
    for mask_padding, same in ((True, True), (False, False)):
        torch.manual_seed(1)
        model = MCt(TextConfig(**CONFIG, layer_scale_init=0.0, mask_padding=mask_padding), 16).double().eval()
        a, b = model(ids), model(other)
        assert torch.allclose(a, b, atol=1e-12) == same, f"mask_padding={mask_padding}"


def test_mask_padding_changes_nothing_without_padding_and_passes_through_checkpointing():
    torch.manual_seed(2)
    full = _ids([10, 10])  # eot in the last position: nothing to hide
    masked = MCt(TextConfig(**CONFIG, mask_padding=True), 16).double()
    plain = MCt(TextConfig(**CONFIG), 16).double()
    plain.load_state_dict(masked.state_dict())
    torch.testing.assert_close(masked(full), plain(full), rtol=0, atol=1e-12)

    ids = _ids([2, 7])
    grads = []
    for checkpointing in (False, True):
        masked.zero_grad()
        masked.set_grad_checkpointing(checkpointing)
        masked(ids).square().sum().backward()
        grads.append([p.grad.clone() for p in masked.parameters() if p.grad is not None])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-12)


def test_divergence_reads_attention_with_the_mask_the_block_was_given():
    torch.manual_seed(3)
    model = create_model("mobileclip_tiny", text={"mask_padding": True}).eval()
    ids = _ids([2, 4, 6], context=model.config.text.context_length)
    hidden = torch.arange(ids.shape[1])[None] > ids.argmax(-1)[:, None]
    x = torch.randn(3, ids.shape[1], model.config.text.width)
    probs = attention_probabilities(model.text.transformer[0], x, hidden)
    assert float(probs.masked_select(hidden[:, None, None, :].expand_as(probs)).abs().max()) == 0.0
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    result = text_divergences(model, ids)
    assert result["attention"].shape == (4, 4) and bool(torch.isfinite(result["attention"]).all())


def test_shape_twins_change_shapes_only_and_leave_other_scenes_alone():
    config = EmbeddedConfig(seed=4, num_train=64, shape_twins=True)
    twins, plain = EmbeddedSource(config, "train"), EmbeddedSource(dataclasses.replace(config, shape_twins=False), "train")
    for j in range(0, 64, 2):
        first, second = twins.scene(j), twins.scene(j + 1)
        assert first == plain.scene(j)
        assert second.background == first.background and second.noise_seed == first.noise_seed
        for a, b in zip(first.objects, second.objects, strict=True):
            assert (a.colour, a.size, a.position, a.rgb, a.cx, a.cy) == (b.colour, b.size, b.position, b.rgb, b.cx, b.cy)
            assert a.shape != b.shape
        # The pictures differ only where an object is drawn.
        difference = np.any(render_scene(first) != render_scene(second), axis=-1)
        assert difference.any()
    shapes = [o.shape for j in range(1, 64, 2) for o in twins.scene(j).objects]
    assert len(set(shapes)) >= 8  # the replacement shape is drawn, not fixed
    for split in ("val", "test", "zeroshot"):
        assert EmbeddedSource(config, split).scene(1) == EmbeddedSource(dataclasses.replace(config, shape_twins=False), split).scene(1)


def test_grouped_sampler_keeps_groups_whole_and_single_groups_unchanged():
    size, seed = 103, 7
    old = np.random.default_rng([seed, 0]).permutation(size)  # the ungrouped order, written out
    for world, rank in ((1, 0), (3, 1)):
        per_rank = size // world
        np.testing.assert_array_equal(EpochSampler(size, seed=seed, rank=rank, world_size=world).order(0),
                                      old[rank : per_rank * world : world])  # fmt: skip
    seen = []
    for rank in range(3):
        sampler = EpochSampler(size, seed=seed, rank=rank, world_size=3, group_size=2)
        order = sampler.order(1)
        assert len(order) == len(sampler) == size // 2 // 3 * 2
        pairs = order.reshape(-1, 2)
        assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] == pairs[:, 0] + 1).all()
        seen.extend(order.tolist())
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="group_size"):
        EpochSampler(10, group_size=0)


def test_loader_refuses_a_batch_that_would_split_a_twin_pair():
    from siclip.data import ImageTextDataset, ImageTextLoader, create_tokenizer

    dataset = ImageTextDataset(EmbeddedSource(EmbeddedConfig(num_train=16, shape_twins=True)), create_tokenizer("embedded"))
    with pytest.raises(ValueError, match="multiple of group_size 2"):
        ImageTextLoader(dataset, 5, group_size=2)
    batch = next(iter(ImageTextLoader(dataset, 4, group_size=2, seed=3)))
    assert len(batch["image"]) == 4


def test_shape_twins_refuse_user_data(tmp_path):
    config = TrainConfig(data=DataConfig(source=str(tmp_path / "train.csv"), shape_twins=True))
    with pytest.raises(ValueError, match="shape_twins is a property of the embedded world"):
        open_training_source(config, 64)


def test_tower_learning_rates_and_frozen_start():
    torch.manual_seed(5)
    model = create_model("mobileclip_tiny")
    optimizer = create_optimizer(model, lr=1e-2, weight_decay=0.1, tower_lr_scale={"image": 2.5})
    by_tower = {}
    for group in optimizer.param_groups:
        by_tower.setdefault(group["tower"], set()).add(group["lr"])
        assert all(tower_of(n) == group["tower"] for n, p in model.named_parameters() if any(p is q for q in group["params"]))
    assert by_tower == {"image": {0.025}, "text": {0.01}, None: {0.01}}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tower_schedules(optimizer, 0, 100, {"text": 2}))
    text_weight = model.text.token_embedding.weight
    image_weight = next(p for n, p in model.named_parameters() if tower_of(n) == "image" and p.ndim > 1)
    images, ids = torch.randn(4, 3, 64, 64), _ids([3, 4, 5, 6], context=model.config.text.context_length)
    history = []
    for _ in range(3):
        before = (text_weight.detach().clone(), image_weight.detach().clone())
        out = model(images, ids)
        (out.image_features @ out.text_features.T).logsumexp(-1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        history.append((not torch.equal(before[0], text_weight), not torch.equal(before[1], image_weight)))
    assert history == [(False, True), (False, True), (True, True)]
    with pytest.raises(ValueError, match="unknown towers"):
        create_optimizer(model, lr=1e-3, weight_decay=0.0, tower_lr_scale={"vision": 2})
    with pytest.raises(ValueError, match="unknown towers"):
        tower_schedules(optimizer, 0, 10, {"txt": 5})
    with pytest.warns(UserWarning, match=r"keeps \['text'\] still for all 10 steps"):
        tower_schedules(optimizer, 0, 10, {"text": 10})


def test_inheriting_student_reads_text_and_images_as_its_teacher(tmp_path):
    from siclip.models import get_model_config, save_checkpoint
    from siclip.train.inputs import prepare_run

    teacher = create_model("mobileclip_tiny", text={"mask_padding": True}, image={"image_size": 96})
    student_config = create_model("siclip_tiny").config
    assert student_config.text.mask_padding is False and student_config.image.image_size == 64
    settled = settled_model_config(student_config, None, teacher)
    assert settled.text.mask_padding is True and settled.image.image_size == 96
    # From the command line: --teacher alone works; an --image-size that disagrees is refused, naming both sizes.
    path = save_checkpoint(teacher, tmp_path / "teacher.pt")
    config = TrainConfig(model="siclip_tiny", teacher=str(path), out_dir=str(tmp_path / "run"), data=DataConfig(num_train=64, batch_size=16))
    inputs = prepare_run(config, get_model_config("siclip_tiny"))
    assert inputs.source.config.image_size == 96
    wrong = dataclasses.replace(config, model_overrides={"image": {"image_size": 64}})
    with pytest.raises(ValueError, match="takes 96 px images, not 64: leave --image-size out or pass 96"):
        prepare_run(wrong, get_model_config("siclip_tiny", image={"image_size": 64}))


def test_command_line_sets_the_recipe():
    from siclip.commands import train as cli
    from siclip.settings import SettingError

    config, _ = cli.parse(["--shape-twins", "--crop-scale", "1", "1", "--crop-ratio", "1", "1", "--mask-padding", "--image-size", "96",
                           "--tower-lr-scale", "image=2.5", "--tower-frozen-steps", "text=150"])  # fmt: skip
    assert config.data.shape_twins and config.data.crop_scale == (1.0, 1.0) and config.data.crop_ratio == (1.0, 1.0)
    assert config.model_overrides == {"image": {"image_size": 96}, "text": {"mask_padding": True}}
    assert config.tower_lr_scale == {"image": 2.5} and config.tower_frozen_steps == {"text": 150}
    for bad in (["--tower-lr-scale", "image"], ["--tower-frozen-steps", "vision=3"], ["--tower-lr-scale", "image=abc"],
                ["--tower-frozen-steps", "text=-5"], ["--crop-scale", "1.2", "0.5"], ["--crop-ratio", "2", "1"]):  # fmt: skip
        with pytest.raises((SystemExit, SettingError)):  # argparse's usage error, or the settings' one line (crop bounds)
            cli.parse(bad)


def test_crop_settings_are_checked():
    from siclip.data import AugmentConfig

    for bad in ({"scale": (1.2, 0.5)}, {"scale": (0.0, 1.0)}, {"ratio": (2.0, 1.0)}):
        with pytest.raises(ValueError, match="crop"):
            AugmentConfig(**bad)
