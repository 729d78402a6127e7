"""The training strategies of Scaling (Down) CLIP (issue 30): SLIP's NT-Xent and head, FLIP's token masking on siclip's,
open_clip's, timm's and transformers' ViT towers, CLIP+Data Augmentation's image and caption policies, each usable alone
and with a SiCLIP student under WI + WIKD + PM, and a resumed run bit-identical with them on."""

import copy
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import MinimalViT, clip_with_vit
from siclip.blocks.token_dropout import TokenDropout, enable_token_dropout, kept_tokens
from siclip.data import AugmentConfig, ColourConfig, augment, augment_policy, eda, names_a_side
from siclip.distill import ObjectiveConfig, SiCLIPObjective
from siclip.distill.ssl import SlipHead, slip_head_sizes
from siclip.losses import NTXentLoss

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


# ── SLIP ──────────────────────────────────────────────────────────────────────────────────────────────────────────


def ref_ntxent(a, b, tau):
    """SimCLR's NT-Xent written out: every one of the 2N views is an anchor; its positive is its image's other view,
    the denominator runs over every other view (2N − 1 terms)."""
    z = torch.cat([F.normalize(a, dim=-1), F.normalize(b, dim=-1)])
    n = a.shape[0]
    total = 0
    for k in range(2 * n):
        positive = (k + n) % (2 * n)
        others = [m for m in range(2 * n) if m != k]
        denominator = sum(torch.exp(z[k] @ z[m] / tau) for m in others)
        total = total - torch.log(torch.exp(z[k] @ z[positive] / tau) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ntxent_matches_the_published_formula(seed, tau):
    a, b = torch.randn(5, 4, dtype=D, requires_grad=True), torch.randn(5, 4, dtype=D, requires_grad=True)
    loss = NTXentLoss(tau)(a, b)
    ref = ref_ntxent(a, b, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(loss, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_ntxent_limit_and_refusals():
    """Orthogonal images whose two views agree: only the 2N − 2 others at cosine 0 remain, ℓ = log(1 + (2N − 2)e^{−1/τ})."""
    views = torch.eye(4, 6, dtype=D)
    assert NTXentLoss(0.1)(views, views).item() == pytest.approx(math.log1p(6 * math.exp(-10.0)), rel=1e-12)
    with pytest.raises(ValueError, match="temperature must be positive"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        NTXentLoss()(torch.randn(3, 4), torch.randn(2, 4))


@pytest.mark.parametrize("width,hidden,out", [(512, 4096, 256), (128, 1024, 128)])
def test_slip_head_has_slips_layers_sized_to_the_tower(width, hidden, out):
    assert slip_head_sizes(width) == (hidden, out)
    assert slip_head_sizes(768) == (4096, 256) and slip_head_sizes(64) == (512, 64)  # SLIP's own on a ViT-B; a tiny tower
    head = SlipHead(width)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, hidden), (hidden, hidden), (hidden, out)]
    assert head(torch.randn(3, width)).shape == (3, out)


def test_objective_adds_ssl_scale_times_ntxent_of_the_heads_projections(seed):
    config = ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0, ssl_scale=0.7)
    objective = SiCLIPObjective(16, config=config).double()
    image, text = F.normalize(torch.randn(6, 16, dtype=D), dim=-1), F.normalize(torch.randn(6, 16, dtype=D), dim=-1)
    views = (torch.randn(6, 16, dtype=D), torch.randn(6, 16, dtype=D))
    terms = objective((image, text, torch.tensor(10.0, dtype=D)), views=views)
    head = copy.deepcopy(objective.ssl_head)  # the same BatchNorm statistics update, on a copy
    expected = ref_ntxent(head(views[0]), head(views[1]), 0.1)
    torch.testing.assert_close(terms["ssl"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["total"], terms["clip"] + 0.7 * terms["ssl"])
    with pytest.raises(ValueError, match="no augmented views"):
        objective((image, text, 10.0))
    assert "ssl" not in SiCLIPObjective(16, config=ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))((image, text, 10.0))
    one = objective((image[:1], text[:1], 10.0), views=(views[0][:1], views[1][:1]))["ssl"]  # one image: no negative
    assert one.item() == 0.0 and one.requires_grad


# ── FLIP ──────────────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("patches,prefix", [(16, 1), (196, 1), (64, 0), (49, 5)])
def test_token_dropout_keeps_exactly_its_fraction(seed, ratio, patches, prefix):
    x = torch.randn(3, prefix + patches, 8, requires_grad=True)
    dropout = TokenDropout(ratio, prefix)
    torch.manual_seed(seed)
    y = dropout(x)
    keep = math.floor(patches * (1 - ratio))
    assert kept_tokens(patches, ratio) == keep and y.shape == (3, prefix + keep, 8)
    torch.manual_seed(seed)
    indices = dropout.draw(3, patches, x.device)  # the same draw, replayed
    assert torch.equal(indices, indices.sort(dim=1).values) and all(len(set(row.tolist())) == keep for row in indices)
    assert torch.equal(y[:, :prefix], x[:, :prefix])
    for b in range(3):
        assert torch.equal(y[b, prefix:], x[b, prefix + indices[b]])
    # the dropped tokens get no gradient, the kept ones and the prefix do
    y.backward(torch.randn_like(y))
    kept = torch.zeros(3, prefix + patches, dtype=torch.bool)
    kept[:, :prefix] = True
    kept.scatter_(1, indices + prefix, True)
    assert bool((x.grad[~kept] == 0).all()) and bool((x.grad[kept] != 0).all())
    assert torch.equal(dropout.eval()(x), x) and torch.equal(TokenDropout(0.0, prefix)(x), x)


def test_kept_indices_are_uniform_over_the_patches():
    torch.manual_seed(0)
    counts = torch.zeros(16)
    for _ in range(400):
        counts += torch.bincount(TokenDropout(0.75).draw(8, 16, torch.device("cpu")).flatten(), minlength=16)
    expected = 400 * 8 * 4 / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 37.7  # χ², 15 degrees of freedom, p = 0.001


def test_a_siclip_vit_tower_masks_in_training_only_and_dropped_patches_get_no_gradient(seed):
    tower = MinimalViT(image_size=32, patch=8)  # 16 patches
    (dropout,) = enable_token_dropout(tower, 0.5)
    assert tower.patch_dropout is dropout and dropout.num_prefix_tokens == 1
    seen = []
    tower.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    images = torch.randn(4, 3, 32, 32)
    tower.train()(images)
    tower.eval()(images)
    assert seen == [1 + 8, 1 + 16]
    # dropped patches: no gradient reaches their tokens (the positional embedding rows of patches dropped in every image)
    tower.train()
    torch.manual_seed(seed)
    tower(images[:1]).sum().backward()
    torch.manual_seed(seed)
    kept = dropout.draw(1, 16, images.device)[0] + 1
    rows = tower.pos_embed.grad[0].abs().sum(-1)
    dropped = torch.ones(17, dtype=torch.bool)
    dropped[0] = False
    dropped[kept] = False
    assert bool((rows[dropped] == 0).all()) and bool((rows[~dropped] > 0).all())


def test_open_clip_vit_with_the_same_kept_indices_gives_its_own_patch_dropouts_output(seed):
    """open_clip's ``VisionTransformer`` (a real one, tiny) with its own ``PatchDropout(0.5)``, against a copy without it
    that siclip's masker is switched on in, fed the indices open_clip draws (its ``randn(batch, tokens).topk``)."""
    from open_clip.transformer import PatchDropout, VisionTransformer

    torch.manual_seed(seed)
    theirs = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16, patch_dropout=0.5)
    assert isinstance(theirs.patch_dropout, PatchDropout)
    ours = copy.deepcopy(theirs)
    ours.patch_dropout = nn.Identity()
    (dropout,) = enable_token_dropout(ours, 0.5)
    assert ours.patch_dropout is dropout and dropout.num_prefix_tokens == 1
    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(seed + 1)
    expected = theirs.train()(images)
    torch.manual_seed(seed + 1)
    indices = torch.randn(3, 16).topk(8, dim=-1).indices  # what open_clip's PatchDropout draws after this seed
    dropout.draw = lambda batch, tokens, device: indices
    torch.testing.assert_close(ours.train()(images), expected, rtol=0, atol=0)
    torch.testing.assert_close(ours.eval()(images), theirs.eval()(images), rtol=0, atol=0)


def test_timm_and_transformers_vits_take_the_masker(seed):
    import timm
    import transformers

    from siclip.blocks.convert import convert_to_sasp

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0, reg_tokens=2)  # fmt: skip
    (dropout,) = enable_token_dropout(vit, 0.75)
    assert vit.patch_drop is dropout and dropout.num_prefix_tokens == 3  # class + 2 registers
    seen = []
    vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    images = torch.randn(2, 3, 32, 32)
    vit.train()(images)
    vit.eval()(images)
    assert seen == [3 + 4, 3 + 16]

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                           patch_size=8)  # fmt: skip
    for model in (transformers.CLIPVisionModel(config), convert_to_sasp(transformers.CLIPVisionModel(config))[0],
                  transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                               image_size=32, patch_size=8), add_pooling_layer=False)):  # fmt: skip
        (dropout,) = enable_token_dropout(model, 0.5)
        assert enable_token_dropout(model, 0.75) == [dropout] and dropout.ratio == 0.75  # switched on once, ratio updated
        assert model.train()(pixel_values=images).last_hidden_state.shape[1] == 1 + 4
        assert model.eval()(pixel_values=images).last_hidden_state.shape[1] == 1 + 16


def test_towers_that_cannot_be_masked_are_refused_with_the_reason():
    from siclip.models import create_model

    with pytest.raises(ValueError, match="refused for MobileCLIP's MCi image tower: its attention stage mixes tokens by convolutions"):
        enable_token_dropout(create_model("mobileclip_tiny"), 0.5)
    with pytest.raises(ValueError, match="convolutional throughout"):
        enable_token_dropout(create_model("mobileclip_tiny", image={"token_mixers": ["repmixer"] * 4}), 0.5)
    with pytest.raises(ValueError, match="needs a ViT image tower; Sequential has none"):
        enable_token_dropout(nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        TokenDropout(1.0)


def test_masking_runs_inside_the_tasks_forward_so_a_steps_flops_count_it(seed):
    """A CLIP with a ViT image tower: the training step's FLOPs (forward + backward, PyTorch's counter) drop when half
    the patch tokens are masked, and the unmasked tuning switch brings them back."""
    from siclip.analysis.train_step import step_flops
    from siclip.train import TrainingTask

    # 64 patches of width 64 beside a text tower of 2 layers of width 32 on 8 tokens: the image tower is most of the step
    student = clip_with_vit(image_size=32, patch=4, dim=64, depth=2, text={"layers": 2, "width": 32, "heads": 2, "context_length": 8})
    task = TrainingTask(student, SiCLIPObjective(student.embed_dim, config=ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)),
                        token_dropout=enable_token_dropout(student, 0.5)).train()  # fmt: skip
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "text": torch.randint(1, 200, (4, 8))}

    def step():
        task(batch)["total"].backward()

    masked = step_flops(step)
    task.set_masking(False)
    unmasked = step_flops(step)
    assert 0.45 < masked / unmasked < 0.65  # 33 of 65 tokens: the blocks' cost halves, the patch embedding's stays


# ── CLIP + Data Augmentation ──────────────────────────────────────────────────────────────────────────────────────


def test_captions_that_name_a_side_and_eda():
    assert names_a_side("a red circle on the left") and names_a_side(None, "in the top RIGHT corner") and names_a_side("the leftmost star")
    assert not names_a_side("a bright upright square", None, "copyright")
    rng = np.random.default_rng(3)
    caption = "a small red circle in the top left corner"
    assert eda(caption, rng, 0.0) == caption and eda("circle", rng, 0.5) == "circle"
    for trial in range(50):
        edited = eda(caption, np.random.default_rng(trial), 0.3)
        assert edited == eda(caption, np.random.default_rng(trial), 0.3)  # a function of the generator
        words, original = edited.split(), caption.split()
        deleted = len(words) < len(original)
        if deleted:  # deletion keeps the order of what it keeps
            it = iter(original)
            assert all(w in it for w in words) and words
        else:
            assert sorted(words) == sorted(original)
    with pytest.raises(ValueError, match="must be in"):
        eda(caption, rng, 1.5)


def _reference_colour(view: np.ndarray, rng: np.random.Generator, config: ColourConfig) -> np.ndarray:
    """SimCLR's photometric steps written from torchvision's formulas in float64 (colorsys for the hue), replaying the
    generator's draws in the order :func:`siclip.data.augment.colour_augment` makes them."""
    import colorsys

    x = view.astype(np.float64) / 255.0  # (3, H, W)

    def gray(t):
        return 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]

    if rng.random() < config.jitter_p:
        b, c, s = (rng.uniform(1 - v, 1 + v) for v in (config.brightness, config.contrast, config.saturation))
        h = rng.uniform(-config.hue, config.hue)
        for step in rng.permutation(4):
            if step == 0:
                x = np.clip(x * b, 0, 1)
            elif step == 1:
                x = np.clip(c * x + (1 - c) * gray(x).mean(), 0, 1)
            elif step == 2:
                x = np.clip(s * x + (1 - s) * gray(x)[None], 0, 1)
            else:
                flat = [colorsys.rgb_to_hsv(*px) for px in x.reshape(3, -1).T]
                x = np.array([colorsys.hsv_to_rgb((hh + h) % 1.0, ss, vv) for hh, ss, vv in flat]).T.reshape(x.shape)
    if rng.random() < config.grayscale_p:
        x = np.repeat(gray(x)[None], 3, axis=0)
    if rng.random() < config.blur_p:
        sigma = rng.uniform(*config.blur_sigma) * x.shape[-1] / config.blur_reference_size
        k = min(2 * math.ceil(3 * sigma) + 1, 2 * ((x.shape[-1] - 1) // 2) + 1)
        g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * sigma**2))
        g /= g.sum()
        padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="reflect")
        rows = sum(g[i] * padded[:, i : i + x.shape[1], :] for i in range(k))
        x = sum(g[j] * rows[:, :, j : j + x.shape[2]] for j in range(k))
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def test_colour_augmentation_matches_torchvisions_formulas(seed):
    from siclip.data.augment import colour_augment

    view = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 12, 12), dtype=np.uint8))
    config = ColourConfig(jitter_p=0.9, grayscale_p=0.3, blur_p=0.6, blur_sigma=(8.0, 30.0))  # blurs of 0.4–1.6 px at 12 px
    for trial in range(12):
        ours = colour_augment(view, np.random.default_rng([seed, trial]), config).numpy()
        reference = _reference_colour(view.numpy(), np.random.default_rng([seed, trial]), config)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1, trial  # float32 against float64, then rounding


def test_a_caption_naming_a_side_is_never_flipped():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, :4] = 255  # bright left edge
    config = AugmentConfig(16, scale=(1, 1), ratio=(1, 1), flip_p=1.0, normalize=False)
    rng = np.random.default_rng(0)
    assert augment(image, rng, config)[0, 0, -1] == 255  # flipped: the bright edge is on the right
    assert augment(image, rng, config, may_flip=False)[0, 0, 0] == 255
    assert augment_policy("strong", 16).flip_p == 0.5 and augment_policy("clip", 16).flip_p == 0.0
    assert augment_policy("mild", 16).flip_p == 0.5


def test_the_mild_policy_keeps_every_pixels_hue_where_strong_does_not(seed):
    # a scene of random colour patches: under brightness, contrast (a grey added to all three channels) and blur of
    # a uniform patch, each pixel inside a patch keeps the order of its channels; hue jitter and grayscale do not
    rng = np.random.default_rng(seed)
    colours = rng.permutation(np.array([[220, 40, 90], [30, 200, 120], [60, 80, 230], [240, 180, 20]], dtype=np.uint8))
    image = np.repeat(np.repeat(colours.reshape(2, 2, 3), 24, axis=0), 24, axis=1)  # (48, 48, 3): four patches
    order = {tuple(np.argsort(c)) for c in colours}

    def kept_fraction(policy: str) -> float:
        config = dataclasses.replace(augment_policy(policy, 24, normalize=False), scale=(1.0, 1.0), ratio=(1.0, 1.0))  # no crop: patch interiors known
        kept = []
        for trial in range(40):
            view = augment(image, np.random.default_rng([seed, trial]), config).numpy()
            interior = np.concatenate([view[:, 3:9, 3:9], view[:, 3:9, 15:21], view[:, 15:21, 3:9], view[:, 15:21, 15:21]], axis=1)
            pixels = interior.reshape(3, -1).T.astype(int)
            distinct = (np.diff(np.sort(pixels, axis=1), axis=1) > 0).all(axis=1)  # channels apart after rounding
            kept.append(all(tuple(np.argsort(p)) in order for p in pixels[distinct]) and distinct.mean() > 0.5)
        return float(np.mean(kept))

    assert kept_fraction("mild") == 1.0
    assert kept_fraction("strong") < 0.95  # grayscale alone (p 0.2) or a hue turn changes some of 40 views
    crop = augment_policy("mild", 24).scale
    assert crop == (0.35, 1.0) and augment_policy("strong", 24).scale[0] < crop[0]


def _dataset_hash(seed, epoch, indices, text_augment=0.3):
    from siclip.data import EmbeddedConfig, ImageTextDataset, create_tokenizer, open_source

    source = open_source("embedded", EmbeddedConfig(num_train=16, num_synthetic=2, seed=5))
    dataset = ImageTextDataset(source, create_tokenizer("embedded"), augment_config=augment_policy("strong", 32, normalize=False), seed=seed,
                               text_augment=text_augment, ssl_config=augment_policy("strong", 32, normalize=False))  # fmt: skip
    digest = hashlib.sha256()
    for index in indices:
        sample = dataset[(epoch, index)]
        for key in ("image", "ssl_images", "text"):
            digest.update(sample[key].numpy().tobytes())
        digest.update(sample["caption"].encode())
    return digest.hexdigest()


def test_the_same_sample_seed_and_epoch_give_the_same_pixels_in_a_fresh_process(seed):
    """Image views, SLIP's views and EDA's captions, computed here and in a new interpreter with other thread counts."""
    here = _dataset_hash(seed % 1000, 3, range(6))
    assert here != _dataset_hash(seed % 1000, 4, range(6))  # another epoch, other views
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'tests')!r}); torch.set_num_threads(3); "
            f"from test_strategies import _dataset_hash; print(_dataset_hash({seed % 1000}, 3, range(6)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == here


# ── Training runs: each strategy alone and with a SiCLIP student (WI + WIKD + PM), exact resume ────────────────────


def _tiny(tmp_path, name, **kw):
    from siclip.train import DataConfig, TrainConfig

    data = kw.pop("data", {})
    base = dict(model="mobileclip_tiny", model_overrides={"image": {"layers": [1, 1, 1, 1], "image_size": 32}}, out_dir=str(tmp_path / name),
                data=DataConfig(**{"num_train": 16, "batch_size": 8, **data}), epochs=1, warmup_steps=1, evaluate=False,
                objective=ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from siclip.models import create_model, save_checkpoint

    torch.manual_seed(0)
    return str(save_checkpoint(create_model("mobileclip_tiny", image={"layers": [1, 1, 1, 1], "image_size": 32}),
                               tmp_path_factory.mktemp("teacher") / "teacher.pt"))  # fmt: skip


@pytest.fixture(scope="module")
def converted_clip(tmp_path_factory):
    """``(spec of a random transformers CLIPModel, a file of it with every encoder layer converted to SAS-P)``: a ViT
    student a converted run trains (its SAS-P blocks), and its original as teacher."""
    from foreign_models import save_hf_clip
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, original_preprocess, save_converted

    root = tmp_path_factory.mktemp("hf")
    spec = f"hf:{save_hf_clip(root / 'clip', 'clip', seed=4)}"
    original = load_original(spec)
    blocks = [name for name, module in original.named_modules() if type(module).__name__ == "CLIPEncoderLayer"]
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, original), blocks=blocks,
                             preprocess=original_preprocess(spec, original).to_dict())  # fmt: skip
    convert(original, recipe)
    return spec, str(save_converted(original, recipe, root / "converted.pt"))


WIKD_PM = ObjectiveConfig()  # feature, relation, interactive distillation and pair matching at SiCLIP's weights


@pytest.mark.parametrize("strategy", ["slip", "augment", "flip", "all"])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["alone", "siclip-student-wikd-pm"])
def test_each_strategy_trains_alone_and_with_a_siclip_student(tmp_path, teacher, converted_clip, strategy, with_teacher):
    """Two steps of each strategy, on MobileCLIP-tiny / its SiCLIP student (WI + WIKD + PM), FLIP on a converted
    transformers ViT CLIP (alone, and distilled from its original under WIKD + PM); "all": SLIP, FLIP at 0.75 and CLIP +
    Data Augmentation together on the converted CLIP."""
    from siclip.train import train

    objective = WIKD_PM if with_teacher else ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)
    settings = {"slip": dict(objective=dataclasses_replace(objective, ssl_scale=1.0)),
                "augment": dict(objective=objective, data={"augment": "strong", "text_augment": 0.2}),
                "flip": dict(objective=objective, model=converted_clip[1], model_overrides={}, mask_ratio=0.5, unmasked_steps=1),
                "all": dict(objective=dataclasses_replace(objective, ssl_scale=1.0), model=converted_clip[1], model_overrides={},
                            mask_ratio=0.75, data={"augment": "strong", "text_augment": 0.2})}[strategy]  # fmt: skip
    if with_teacher:
        settings["teacher"] = converted_clip[0] if strategy in ("flip", "all") else teacher
        settings.setdefault("model", "siclip_tiny")
    summary = train(_tiny(tmp_path, strategy, **settings), progress=False)
    expected = {"clip", "total"} | ({"ssl"} if strategy in ("slip", "all") else set())
    expected |= {"feature", "relation", "interactive", "pair_matching"} if with_teacher else set()
    assert summary["steps"] == 2 and set(summary["final_loss"]) == expected
    assert all(math.isfinite(v) for v in summary["final_loss"].values())


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_unmasked_tuning_phase_and_strategy_checks():
    from siclip.train import TrainConfig
    from siclip.train.strategies import check_strategies, masked_steps

    assert masked_steps(TrainConfig(mask_ratio=0.5, unmasked_steps=3), 10) == 7
    assert masked_steps(TrainConfig(mask_ratio=0.5, unmasked_fraction=0.25), 10) == 7  # ⌈2.5⌉ steps unmasked
    assert masked_steps(TrainConfig(mask_ratio=0.5), 10) == 10 and masked_steps(TrainConfig(), 10) == 0
    for bad, message in ((TrainConfig(unmasked_steps=2), "set mask_ratio too"), (TrainConfig(mask_ratio=1.0), "mask_ratio must be"),
                         (TrainConfig(mask_ratio=0.5, unmasked_steps=1, unmasked_fraction=0.1), "not both")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            check_strategies(bad)


@pytest.mark.slow  # 12 steps of three image-tower passes each (about 5 s of one core)
def test_a_resumed_run_with_slip_strong_and_text_augmentation_is_bit_identical(tmp_path):
    from siclip.models import load_checkpoint
    from siclip.train import train

    def config(name):
        return _tiny(tmp_path, name, data={"num_train": 24, "augment": "strong", "text_augment": 0.2}, epochs=2,
                     objective=ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0, ssl_scale=1.0))  # fmt: skip

    straight = train(config("straight"), progress=False)
    assert straight["steps"] == 6
    assert train(config("resumed"), max_steps=2, progress=False)["steps"] == 2  # stops inside epoch 0
    assert train(config("resumed"), resume=True, progress=False)["steps"] == 6
    a, b = (load_checkpoint(tmp_path / name / "model.pt").state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    head = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["task"]["objective"] for name in ("straight", "resumed")]
    assert head[0].keys() == head[1].keys() and all(torch.equal(head[0][k], head[1][k]) for k in head[0])  # SLIP's head too


def test_train_command_strategy_flags(tmp_path):
    """The named flags reach TrainConfig; a mask ratio on MobileCLIP's hybrid tower is one line, status 2."""
    from siclip.commands.train import parse

    config, _ = parse(["--wikd", "--slip", "--mask-ratio", "0.75", "--unmasked-fraction", "0.1", "--augment", "strong", "--text-augment", "0.1"])
    assert (config.objective.ssl_scale, config.objective.feature, config.mask_ratio, config.unmasked_fraction) == (1.0, 4000.0, 0.75, 0.1)
    assert (config.data.augment, config.data.text_augment) == ("strong", 0.1)
    assert parse(["--ssl-scale", "0.5"])[0].objective.ssl_scale == 0.5
    defaults = parse([])[0]
    assert (defaults.objective.ssl_scale, defaults.mask_ratio, defaults.data.augment, defaults.data.text_augment) == (0.0, 0.0, "clip", 0.0)
    done = subprocess.run([sys.executable, "-m", "siclip", "train", "--mask-ratio", "0.5", "--num-train", "16", "--batch-size", "8",
                           "--no-eval", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "siclip train: error: token masking (FLIP) is refused for MobileCLIP's MCi image tower: its attention stage mixes tokens by "
        "convolutions and BatchNorm over the full grid, which dropping tokens breaks, and masking its attention blocks (14.5 % of "
        "MCi0's FLOPs) would save at most 7 %; use a ViT image tower"]  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_flip_speed_benchmark_smoke():
    """``benchmarks/flip_speed.py --smoke``: the tower and the whole training step, masked and unmasked, timed and counted."""
    done = subprocess.run([sys.executable, "benchmarks/flip_speed.py", "--smoke", "--threads", "1"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| image tower forward + backward |" in done.stdout and "| training step |" in done.stdout and "≥ 1.6×" in done.stdout


@pytest.mark.slow  # twenty training runs assembled as the loop assembles them (a transformers CLIP built and converted among them), each stepped, counted and timed: about 10 s of one core
def test_strategies_benchmark_smoke(tmp_path, capsys, monkeypatch):
    """``benchmarks/strategies.py --smoke``: every strategy × tower cell trains a step through the loop's own assembly or is
    refused with the project's reason, its FLOPs counted (SLIP above CLIP, FLIP below it, augmentation equal) and timed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("strategies_benchmark", ROOT / "benchmarks" / "strategies.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "cells.json")]) == 0
    table = capsys.readouterr().out
    assert "| | MobileCLIP-tiny (hybrid) | CNN tower | ViT-tiny | converted transformers ViT |" in table and "| SLIP | yes, " in table
    saved = json.loads((tmp_path / "cells.json").read_text())
    assert (saved["batch"], saved["image_size"], saved["rounds"]) == (4, 32, 2)
    cells = {(c["strategy"], c["tower"]): c for c in saved["cells"]}
    assert len(cells) == 20
    refused = {key for key, c in cells.items() if c["works"] != "yes"}
    assert refused == {("FLIP 0.5", "MobileCLIP-tiny (hybrid)"), ("FLIP 0.5", "CNN tower")}
    assert "refused for MobileCLIP's MCi image tower" in cells["FLIP 0.5", "MobileCLIP-tiny (hybrid)"]["error"]
    assert "convolutional throughout" in cells["FLIP 0.5", "CNN tower"]["error"]
    for key, cell in cells.items():
        if key not in refused:
            assert cell["gflops_per_step"] > 0 and 0 < cell["images_per_s"] < math.inf, key
    for tower in ("MobileCLIP-tiny (hybrid)", "CNN tower", "ViT-tiny", "converted transformers ViT"):
        flops = {strategy: cells[strategy, tower]["gflops_per_step"] for strategy in ("CLIP", "SLIP", "FLIP 0.5", "CLIP+DA (strong)")}
        assert flops["SLIP"] > flops["CLIP"] == flops["CLIP+DA (strong)"]  # two more views through the tower; augmentation costs no model FLOPs
        if flops["FLIP 0.5"] is not None:
            assert flops["FLIP 0.5"] < flops["CLIP"]
        assert set(cells["SLIP", tower]["loss_terms"].split()) == {"clip", "ssl", "total"}
        student = set(cells["+ WIKD and PM (SiCLIP student)", tower]["loss_terms"].split())
        assert student == {"clip", "feature", "relation", "interactive", "pair_matching", "total"}, tower
    assert [row["rows"] for row in saved["loaders"]] == ["CLIP", "SLIP", "CLIP+DA (strong)"]
