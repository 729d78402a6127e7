import json
from pathlib import Path

import pytest
import torch
from torch import nn

from siclip.blocks import SASPBlock, count_parameters
from siclip.models import (
    CheckpointMismatch,
    SiCLIPConfig,
    apple_key_to_siclip,
    build_siclip,
    create_model,
    frozen_modules,
    get_model_config,
    list_models,
    load_checkpoint,
    load_mobileclip_s0,
    reparameterize_model,
    save_checkpoint,
)

DATA = Path(__file__).parent / "data"


def _spec(name):
    return json.loads((DATA / name).read_text())["keys"]


def random_state_dict(spec: dict, seed: int = 0) -> dict:
    """A state dict with every key and shape of ``spec``: random weights, valid BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics, layer scales of order one: every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if "layer_scale" in name else 0.1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_registry_and_parameter_counts():
    assert set(list_models()) >= {"mobileclip_s0", "siclip_s0", "mobileclip_tiny", "siclip_tiny"}
    s0 = create_model("mobileclip_s0")
    assert count_parameters(s0.visual) == 11_406_464
    assert count_parameters(s0.text) == 42_441_216
    siclip = create_model("siclip_s0")
    saved = 1 - count_parameters(siclip) / count_parameters(s0)
    # Image: W_V, W_P (2 × 524,800) and both blocks' layer scales go, the second block's W_Q, W_K (524,288) are
    # shared; shaped gains (3 × 16, shared with the attention) and branch gains (2 per block) are new.
    assert count_parameters(siclip.visual) == 11_406_464 - 2 * 524_800 - 524_288 - 2 * 1024 + 3 * 16 + 2 * 2
    assert 0.16 < saved < 0.17  # both towers converted and shared
    text_only = create_model("siclip_s0", siclip={"convert": ["text"]})
    assert count_parameters(text_only.visual) == 11_406_464
    assert 0.13 < 1 - count_parameters(text_only) / count_parameters(s0) < 0.15  # the text-only ablation
    # Each sharing configuration, exactly: W_V, W_P and norm2 go (526,336 − 26 gains per block), then shared blocks.
    sasp_block = count_parameters(siclip.text.transformer[0])
    assert sasp_block == 3_152_384 - 526_336 + 3 * 8 + 2
    for sharing, distinct in [("none", 4), ("adjacent", 2), ("all", 1)]:
        model = create_model("mobileclip_s0", siclip={"sharing": sharing})
        assert count_parameters(model.text) == 42_441_216 - 4 * 3_152_384 + distinct * sasp_block


def test_apple_key_mapping_covers_every_key_and_shape():
    model = create_model("mobileclip_s0")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    spec = _spec("mobileclip_s0_state_dict.json")
    assert len(spec) == 893
    mapped = {apple_key_to_siclip(k): v for k, v in spec.items()}
    assert None not in mapped and len(mapped) == 893
    mapped["text.positional_embedding"] = mapped["text.positional_embedding"][2:]
    assert mapped == ours


def test_load_mobileclip_s0_round_trip():
    state = random_state_dict(_spec("mobileclip_s0_state_dict.json"))
    model = load_mobileclip_s0(state)
    assert not model.training
    loaded = model.state_dict()
    for key, value in state.items():
        name = apple_key_to_siclip(key)
        torch.testing.assert_close(loaded[name], value.reshape(loaded[name].shape), msg=key)


def test_broken_checkpoint_lists_every_problem(tmp_path):
    state = random_state_dict(_spec("mobileclip_s0_state_dict.json"))
    del state["text_encoder.transformer.2.pre_norm_ffn.1.weight"]
    state["image_encoder.model.head.extra"] = torch.zeros(3)
    state["text_encoder.projection_layer"] = torch.zeros(512, 256)
    with pytest.raises(CheckpointMismatch) as err:
        load_mobileclip_s0(state)
    message = str(err.value)
    # keys named as in the user's file, not in siclip's layout
    assert "1 missing keys: text_encoder.transformer.2.pre_norm_ffn.1.weight" in message
    assert "1 unexpected keys: image_encoder.model.head.extra" in message
    assert "text_encoder.projection_layer: checkpoint (512, 256) vs model (512, 512)" in message
    with pytest.raises(FileNotFoundError, match="mobileclip_s0.pt"):
        load_mobileclip_s0(tmp_path / "mobileclip_s0.pt")


def test_reparameterised_checkpoint_loads_into_the_inference_form():
    spec = _spec("mobileclip_s0_state_dict_reparameterized.json")
    assert len(spec) == 389
    model = load_mobileclip_s0(random_state_dict(spec))
    assert count_parameters(model) == 53_792_065
    assert not any("rbr_" in k or "lkb_origin" in k for k in model.state_dict())


@pytest.mark.parametrize("name,size", [("mobileclip_tiny", 64), ("mobileclip_s0", 64)])
def test_reparameterisation_keeps_outputs(name, size):
    model = randomize_(create_model(name).double().eval(), seed=3)
    fused = reparameterize_model(model)
    assert count_parameters(fused) < count_parameters(model)
    images = torch.rand(2, 3, size, size, dtype=torch.float64)
    ids = torch.randint(1, model.config.text.vocab_size - 1, (2, model.config.text.context_length))
    ids[:, 5] = model.config.text.vocab_size - 1
    torch.testing.assert_close(fused.encode_image(images), model.encode_image(images), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused.encode_text(ids), model.encode_text(ids), rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="eval mode"):
        reparameterize_model(model.train())


def test_features_are_unit_norm_and_text_pools_end_of_text(seed):
    model = create_model("mobileclip_tiny").eval()
    images = torch.rand(3, 3, 64, 64)
    ids = torch.randint(1, 200, (3, 32))
    eot = torch.tensor([4, 17, 31])
    ids[torch.arange(3), eot] = 255
    out = model(images, ids)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    captured = {}
    model.text.final_norm.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    raw = model.encode_text(ids, normalize=False)
    expected = captured["x"][torch.arange(3), eot] @ model.text.projection
    torch.testing.assert_close(raw, expected)


def test_siclip_inherits_and_keeps_inherited_outputs(seed):
    teacher = randomize_(create_model("mobileclip_tiny").eval(), seed=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, report = build_siclip(teacher, SiCLIPConfig(convert=("text",), sharing="adjacent"))
    student.eval()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(student.encode_image(images), teacher.encode_image(images))
    ids = torch.randint(1, 255, (2, 32))
    x = student.text.token_embedding(ids) + student.text.positional_embedding
    torch.testing.assert_close(student.text.mixer_in(x), teacher.text.mixer_in(x))
    h = torch.randn(2, 32, 128)
    old, new = teacher.text.transformer[0], student.text.transformer[0]
    assert isinstance(new, SASPBlock)
    torch.testing.assert_close(new.norm(h), old.norm1(h))
    torch.testing.assert_close(new.mlp(h), old.mlp(h))
    torch.testing.assert_close(new.attn.k(h), nn.functional.linear(h, *(t[128:256] for t in (old.attn.qkv.weight, old.attn.qkv.bias))))
    # Shared blocks share storage; only the SAS-P blocks train.
    assert student.text.transformer[0] is student.text.transformer[1]
    assert student.text.transformer[2] is student.text.transformer[3]
    assert {n for n, p in student.named_parameters() if p.requires_grad} == {
        n for n, _ in student.named_parameters() if n.startswith("text.transformer.")
    }
    assert {"visual.patch_embed", "visual.network.7", "text.mixer_in", "logit_scale"} <= set(frozen_modules(student))
    table = report.summary()
    assert table.loc["total", "new"] == 2 * (3 * 4 + 2)
    assert table.loc["total", "trainable"] == count_parameters(student.text.transformer)
    assert table.loc["total", "inherited"] + table.loc["total", "new"] == count_parameters(student)
    assert table.loc["visual.network.7", "frozen"] > 0 and "sharing blocks" in report.sharing


def test_siclip_options_and_errors():
    teacher = create_model("mobileclip_tiny")
    student, _ = build_siclip(teacher, SiCLIPConfig(sharing="optimal", sharing_max_groups=2, freeze="none"), divergence=[0.1, 0.9, 0.2])
    assert student.text.transformer[0] is student.text.transformer[1] and all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="convert must name one or both of the towers"):
        build_siclip(teacher, SiCLIPConfig(convert=("vision",)))
    with pytest.raises(ValueError, match="exactly one stage of MCi attention blocks"):
        build_siclip(student, SiCLIPConfig())  # already converted
    with pytest.raises(ValueError, match="unknown tower"):
        build_siclip(teacher, SiCLIPConfig(), divergence={"audio": [0.1]})
    with pytest.raises(ValueError, match="unknown freeze policy"):
        build_siclip(teacher, SiCLIPConfig(freeze="some"))


def test_factory_overrides_and_errors():
    model = create_model("siclip_tiny", text={"layers": 2}, siclip={"sharing": "none"}, embed_dim=64)
    assert len(model.text.transformer) == 2 and model.config.embed_dim == 64
    assert model.text.transformer[0] is not model.text.transformer[1]
    assert get_model_config("mobileclip_tiny", siclip={"sharing": "all"}).siclip.sharing == "all"
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match="unknown text config field"):
        create_model("mobileclip_tiny", text={"depth": 3})
    model = create_model("mobileclip_tiny")
    with pytest.raises(ValueError, match="does the tokenizer match"):
        model.encode_text(torch.full((1, 8), 300))
    with pytest.raises(ValueError, match="exceed the context length"):
        model.encode_text(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"images must be \(batch, 3, height, width\)"):
        model.encode_image(torch.rand(3, 64, 64))


@pytest.mark.parametrize("name", ["mobileclip_tiny", "siclip_tiny"])
def test_checkpoint_round_trip(tmp_path, name, seed):
    model = randomize_(create_model(name).eval(), seed=seed % 1000)
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.pt", step=12)
    assert not list(path.parent.glob("*.tmp"))
    again = load_checkpoint(path).eval()
    assert again.config == model.config
    images, ids = torch.rand(2, 3, 64, 64), torch.randint(1, 255, (2, 32))
    torch.testing.assert_close(again(images, ids).text_features, model(images, ids).text_features)
    torch.testing.assert_close(again.encode_image(images), model.encode_image(images))
    if name == "siclip_tiny":
        assert again.text.transformer[0] is again.text.transformer[1]
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a siclip model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
