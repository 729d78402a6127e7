"""Image towers by family (siclip.models.towers): MCi's hybrid, the pure CNN, siclip's ViT and any timm model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from torch import nn
from torch.nn import functional as F

from siclip.data import EmbeddedConfig, EmbeddedSource, model_pixels
from siclip.distill import ObjectiveConfig
from siclip.models import ModelConfig, create_model, get_model_config, load_checkpoint, reparameterize_model, save_checkpoint
from siclip.models.fastvit import AttentionBlock, RepCPE
from siclip.models.towers import TOWER_PRESETS
from siclip.models.vit import VisionTransformer
from siclip.train import DataConfig, TrainConfig, train

CONFIGS = Path(__file__).parents[1] / "siclip" / "models" / "configs"
TINY_VIT = {"image_size": 32, "layers": 2}  # vit presets at test size: a 4×4 grid of 8-pixel patches, two blocks
TIMM_TINY = {"family": "timm", "model_name": "test_vit", "image_size": 32, "kwargs": {"img_size": 32, "patch_size": 8}}


class KeepTokens(nn.Module):
    """A token-masking module keeping the prefix tokens and the given patch positions (FLIP's contract)."""

    def __init__(self, prefix: int, kept: torch.Tensor) -> None:
        super().__init__()
        self.prefix, self.kept = prefix, kept
        self.seen = None

    def forward(self, x):
        self.seen = x.shape
        patches = x[:, self.prefix :][torch.arange(x.shape[0])[:, None], self.kept]
        return torch.cat([x[:, : self.prefix], patches], dim=1)


def reference_vit(tower: VisionTransformer, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The ViT written out from its parameters: patches as flattened pixels times the projection, class token, positions,
    the kept patches, the pre-norm, the blocks, the final norm, the class token or the mean, the projection."""
    embed, p = tower.embed, tower.config.patch_size
    patches = rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)
    tokens = patches @ embed.proj.weight.reshape(embed.proj.out_channels, -1).T + embed.proj.bias
    prefix = tower.num_prefix_tokens
    if prefix:
        tokens = torch.cat([embed.cls_token.expand(len(images), -1, -1), tokens], dim=1)
    tokens = tokens + embed.positional_embedding
    if kept is not None:
        tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix:][torch.arange(len(images))[:, None], kept]], dim=1)
    tokens = F.layer_norm(tokens, (tokens.shape[-1],), tower.norm_pre.weight, tower.norm_pre.bias)
    for block in tower.blocks:
        tokens = block(tokens)
    head = tower.head
    tokens = F.layer_norm(tokens, (tokens.shape[-1],), head.norm.weight, head.norm.bias)
    pooled = tokens[:, 0] if tower.config.pool == "cls" else tokens.mean(1)
    return pooled @ head.proj


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("block", ["pre_ln", "sasp"])
def test_vit_tower_matches_its_written_out_form_and_takes_masked_tokens(seed, pool, block):
    tower = create_model("clip_vit_tiny", image={**TINY_VIT, "pool": pool, "block": block}).visual.double().eval()
    for p in tower.parameters():  # away from the near-zero class token and the zero query of SAS-P's initialisation
        p.data.add_(torch.randn_like(p) * 0.1)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert isinstance(tower.patch_dropout, nn.Identity) and tower.num_prefix_tokens == (1 if pool == "cls" else 0)
    torch.testing.assert_close(tower(images), reference_vit(tower, images), rtol=1e-10, atol=1e-10)
    kept = torch.stack([torch.randperm(16)[:6] for _ in range(3)])  # a shorter sequence after the positions
    tower.patch_dropout = KeepTokens(tower.num_prefix_tokens, kept)
    masked = tower(images)
    assert tower.patch_dropout.seen == (3, tower.num_prefix_tokens + 16, 96)  # after the positions, before the blocks
    torch.testing.assert_close(masked, reference_vit(tower, images, kept), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(masked, reference_vit(tower, images))  # the masking reached the output


def test_vit_refuses_a_grid_it_was_not_built_for():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_model("clip_vit_tiny", image={"image_size": 30})
    with pytest.raises(ValueError, match="takes 32×32 images"):
        create_model("clip_vit_tiny", image=TINY_VIT).visual(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown ViT block"):
        create_model("clip_vit_tiny", image={"block": "post_ln"})


def test_cnn_tower_is_mci_without_attention_and_reparameterises(seed):
    model = create_model("clip_cnn_tiny", image={"image_size": 32}).eval()
    assert not any(isinstance(m, (AttentionBlock, RepCPE, nn.MultiheadAttention)) for m in model.visual.modules())
    assert not any("attn" in name for name, _ in model.visual.named_modules())
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(reparameterize_model(model).visual(images), model.visual(images), rtol=1e-4, atol=1e-5)


def test_presets_configs_and_old_checkpoints():
    mobileclip_tiny = json.loads((CONFIGS / "mobileclip_tiny.json").read_text())
    assert ModelConfig.from_dict({"image": "mci_tiny"}).image == ModelConfig.from_dict(mobileclip_tiny).image  # the preset is its tower
    assert TOWER_PRESETS["cnn_tiny"]["token_mixers"] == ["repmixer"] * 4
    # a configuration written before families existed (no "family") is MCi's, and writes it out now
    old = {k: v for k, v in ModelConfig.from_dict(mobileclip_tiny).to_dict()["image"].items() if k != "family"}
    assert ModelConfig.from_dict({**mobileclip_tiny, "image": old}).image.family == "mci"
    assert get_model_config("clip_vit_small").image.width == 192 and get_model_config("clip_vit_tiny").text == get_model_config("mobileclip_tiny").text
    # another family replaces the section (its defaults fill the rest); the same family merges
    vit = get_model_config("mobileclip_tiny", image={"family": "vit", "patch_size": 16})
    assert vit.image.family == "vit" and vit.image.patch_size == 16 and vit.image.width == 96
    assert get_model_config("clip_vit_tiny", image={"patch_size": 4}).image.width == 96
    assert get_model_config("clip_vit_tiny", image="cnn_tiny").image.token_mixers == ("repmixer",) * 4
    with pytest.raises(ValueError, match=r"unknown image config field\(s\) \['patch_size'\]"):
        get_model_config("mobileclip_tiny", image={"patch_size": 4})
    with pytest.raises(ValueError, match=r"unknown vit image config field\(s\) \['dims'\]"):
        get_model_config("mobileclip_tiny", image={"family": "vit", "dims": [1]})
    with pytest.raises(ValueError, match="unknown image tower 'vit_huge'"):
        get_model_config("mobileclip_tiny", image="vit_huge")
    with pytest.raises(ValueError, match="unknown image tower family 'rnn'"):
        get_model_config("mobileclip_tiny", image={"family": "rnn"})


def test_timm_tower_is_timm_features_and_a_projection_with_timm_pixels(seed, tmp_path):
    timm = pytest.importorskip("timm")
    model = create_model("clip_cnn_tiny", image=TIMM_TINY).eval()
    trunk = model.visual.trunk
    assert type(trunk).__module__.startswith("timm.") and trunk.num_classes == 0
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    reference.load_state_dict(trunk.state_dict())
    images = torch.randn(2, 3, 32, 32)
    pooled = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(model.visual(images), pooled @ model.visual.proj.weight.T)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("test_vit")
    assert model.preprocess.mean == tuple(cfg.mean) and model.preprocess.std == tuple(cfg.std) and model.preprocess.size == 32
    back = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert back.config == model.config and back.preprocess == model.preprocess
    torch.testing.assert_close(back.eval().visual(images), model.visual(images))
    # back to a siclip tower: CLIP's pixels again; a convolutional timm model takes any input size
    assert get_model_config("clip_cnn_tiny", image=TIMM_TINY).preprocess != get_model_config("clip_cnn_tiny").preprocess
    assert create_model("clip_cnn_tiny", image="timm:test_convnext").visual(torch.rand(2, 3, 48, 48)).shape == (2, 128)
    with pytest.raises(ValueError, match="timm image tower"):
        create_model("clip_cnn_tiny", image="timm:no_such_model")


def _zeroshot_folder(root: Path) -> Path:
    """Two classes of the embedded world, two images each, in class folders."""
    source = EmbeddedSource(EmbeddedConfig(image_size=32, zero_shot_per_class=2), "zeroshot")
    for i in range(len(source)):
        colour, shape = source.scene(i).objects[0].colour, source.scene(i).objects[0].shape
        if (colour, shape) in (("red", "circle"), ("blue", "square")):
            folder = root / f"{colour} {shape}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.load(i).image).save(folder / f"{i}.png")
    (root.parent / "templates.txt").write_text("a photo of a {}.\na {}.\n")  # the embedded tokenizer knows these words
    return root


# SAS-P blocks and mean pooling train the same way (the written-out and reload tests cover them).
TOWERS = {"hybrid": ("mobileclip_tiny", None, {}), "cnn": ("mobileclip_tiny", "cnn_tiny", {}), "vit": ("mobileclip_tiny", "vit_tiny", TINY_VIT),
          "timm": ("mobileclip_tiny", None, TIMM_TINY)}  # fmt: skip


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_every_tower_family_trains_saves_reloads_and_evaluates(tmp_path, tower, capsys):
    if tower == "timm":
        pytest.importorskip("timm")
    from siclip.commands.evaluate import main as evaluate

    model, preset, image = TOWERS[tower]
    overrides = {"image": {"image_size": 32, **image}, "text": {"layers": 1}}  # one text block: the towers are under test
    config = TrainConfig(model=model, image_tower=preset, model_overrides=overrides, out_dir=str(tmp_path / "run"),
                         data=DataConfig(num_train=16, batch_size=8), epochs=1, warmup_steps=1, evaluate=False)  # fmt: skip
    summary = train(config, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"]["clip"])
    saved = load_checkpoint(tmp_path / "run" / "model.pt").eval()
    family = {"hybrid": "mci", "cnn": "mci", "vit": "vit", "timm": "timm"}[tower]
    assert saved.config.image.family == family and saved.preprocess.size == 32
    folder = _zeroshot_folder(tmp_path / "zs")
    assert evaluate(["--model", str(tmp_path / "run" / "model.pt"), "--zeroshot", str(folder), "--templates", str(tmp_path / "templates.txt"),
                     "--device", "cpu"]) == 0  # fmt: skip
    assert "| zeroshot_classification | acc1 |" in capsys.readouterr().out  # evaluate prints its metrics as a table


@pytest.mark.parametrize("name,image", [("mobileclip_tiny", {}), ("clip_cnn_tiny", {}), ("clip_vit_tiny", {}), ("mobileclip_tiny", TIMM_TINY)],
                         ids=["hybrid", "cnn", "vit", "timm"])  # fmt: skip
def test_model_report_gives_each_tower_its_training_step_flops(name, image):
    if image:
        pytest.importorskip("timm")
    from siclip.analysis.flops import clip_inputs, model_report
    from siclip.blocks.flop_count import flop_counter
    from siclip.losses import ClipLoss

    model = create_model(name, image={"image_size": 32, **image}, text={"layers": 1})
    report = model_report(model, train_batch=2)
    assert report["train_batch"] == 2 and report["gflops_image"] > 0
    images, ids = clip_inputs(model, 2)
    with flop_counter() as step:  # a CLIP-loss training step on two pairs, counted by PyTorch's FlopCounterMode
        ClipLoss()(*model.train()(model_pixels((images * 255).to(torch.uint8), model.preprocess), ids)).backward()
    assert report["gflops_train_step"] * 1e9 == pytest.approx(step.get_total_flops(), rel=1e-12)
    assert step.get_total_flops() > 2 * 1e9 * (report["gflops_image"] + report["gflops_text"])  # backward included
    assert report["gflops_train_step"] == pytest.approx(2 * report["gflops_train_pair"])


def test_a_vit_siclip_student_inherits_its_vit_teacher(tmp_path):
    teacher = save_checkpoint(create_model("clip_vit_tiny", image=TINY_VIT), tmp_path / "teacher.pt")
    config = TrainConfig(model="clip_vit_tiny", model_overrides={"siclip": {}, "image": TINY_VIT}, teacher=str(teacher), objective=ObjectiveConfig(),
                         out_dir=str(tmp_path / "student"), data=DataConfig(num_train=16, batch_size=8), epochs=1, warmup_steps=1, evaluate=False)  # fmt: skip
    summary = train(config, progress=False)
    assert set(summary["final_loss"]) >= {"clip", "feature", "relation", "interactive", "pair_matching"}
    student = load_checkpoint(tmp_path / "student" / "model.pt")
    blocks = student.visual.blocks
    assert type(blocks[0]).__name__ == "SASPBlock" and blocks[0].attn.q is blocks[1].attn.q  # converted, W_Q shared
    # a student asked for a ViT tower cannot inherit from a MobileCLIP (it would become a copy of its hybrid tower)
    mobileclip = save_checkpoint(create_model("mobileclip_tiny", image={"image_size": 32}), tmp_path / "mc.pt")
    with pytest.raises(ValueError, match="image tower is a mci tower"):
        train(TrainConfig(**{**config.__dict__, "teacher": str(mobileclip), "out_dir": str(tmp_path / "refused")}), progress=False)
    with pytest.raises(ValueError, match="A pure-CNN tower has none"):
        create_model("clip_cnn_tiny", siclip={})
    with pytest.raises(ValueError, match="convert only the text tower"):
        create_model("clip_vit_tiny", image={"block": "sasp"}, siclip={})
    assert create_model("clip_cnn_tiny", siclip={"convert": ["text"]}).text.transformer[0].__class__.__name__ == "SASPBlock"


def test_the_train_command_takes_towers_budgets_noise_and_subsets(tmp_path, capsys):
    pytest.importorskip("timm")
    from siclip.commands.train import parse
    from siclip.settings import SettingError

    (tmp_path / "kept.json").write_text("[0, 2]")
    config, _ = parse(["--image-tower", "timm:resnet18", "--budget-tflops", "2.5", "--budget-measure-steps", "2", "--caption-noise", "0.5",
                       "--subset", str(tmp_path / "kept.json"), "--out", str(tmp_path / "run")])  # fmt: skip
    assert (config.image_tower, config.budget_tflops, config.budget_measure_steps) == ("timm:resnet18", 2.5, 2)
    assert (config.data.caption_noise, config.data.subset) == (0.5, str(tmp_path / "kept.json"))
    for argv, named in ((["--image-tower", "vit_huge"], "unknown image tower"), (["--image-tower", "timm:no_such_net"], "unknown timm model"), (["--budget-tflops", "1", "--epochs", "2"], "not both"),
                        (["--caption-noise", "0.5", "--data", str(tmp_path / "kept.json")], "misaligns pairs of the embedded world")):  # fmt: skip
        with pytest.raises((SystemExit, SettingError)) as refused:  # argparse's usage error, or a setting refused (status 2 either way)
            parse([*argv, "--out", str(tmp_path / "run")])
        assert named in (str(refused.value) if isinstance(refused.value, SettingError) else capsys.readouterr().err)


@pytest.mark.parametrize("image", [{}, "cnn_tiny", {"family": "vit", **TINY_VIT, "block": "sasp", "pool": "mean"}, TIMM_TINY],
                         ids=["hybrid", "cnn", "vit", "timm"])  # fmt: skip
def test_every_tower_family_reloads_from_its_checkpoint_to_the_same_outputs(tmp_path, image, seed):
    if isinstance(image, dict) and image.get("family") == "timm":
        pytest.importorskip("timm")
    model = create_model("mobileclip_tiny", image=image, text={"layers": 1}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    back = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt")).eval()
    size = model.preprocess.size
    images, ids = torch.rand(2, 3, size, size), torch.randint(1, 200, (2, 32))
    assert back.config == model.config
    for a, b in zip(back(images, ids), model(images, ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
