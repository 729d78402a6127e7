"""Your model, simplified (issue 22): the blocks of transformers, timm and open_clip models converted to SAS-P through the
public API, on the libraries' real classes at small random sizes.

For every family: the converted block equals a float64 SAS-P reference built from the *original* block's tensors
(which checks what was inherited), the host model runs its own forward with its padding and causal masks (changing a
padded or later token leaves the other outputs alone), gradients are finite, the report names what was dropped, and
a saved model reloads to the same outputs. Attention read from an original block equals the block's own
``output_attentions`` (eager) and puts no mass on keys a causal block never sees.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from helpers import randomize_
from siclip.analysis.divergence import divergence_report
from siclip.analysis.flops import model_report
from siclip.blocks import convert_block, convert_to_sasp, read_attention, sasp_from_parts, shaped_attention_reference
from siclip.blocks.convert import ConversionReport

D, H, T, B = 32, 4, 9, 3
TEXT = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=3, num_attention_heads=H, max_position_embeddings=16)
VISION = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=3, num_attention_heads=H, image_size=24, patch_size=8)


@dataclass
class Original:
    """What a family's block is made of, read plainly from the original module (float64)."""

    norm: nn.Module
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    mlp: Callable  # h -> the MLP branch exactly as the original computes it (its layer scale included)
    scale: float  # the original's logit scale (1/√d unless the family says otherwise)


def _mlp(fc1, act, fc2, ls=None):
    return lambda h: (fc2(act(fc1(h))) * (1 if ls is None else ls))


def sasp_reference(orig: Original, x: torch.Tensor, heads: int, *, causal: bool, padding=None, beta_ff: float = 0.1) -> torch.Tensor:
    """β_SA·(αI + β·softmax(QKᵀ/√d + M) − γC)·H + β_FF·MLP(H), H = Norm(X), α = β = γ = β_SA = 1, from the original's
    tensors; the original's own logit scale is carried into the queries."""
    h = orig.norm(x)
    q = F.linear(h, orig.wq, orig.bq) * (orig.scale * (x.shape[-1] // heads) ** 0.5)
    k = F.linear(h, orig.wk, orig.bk)
    split = lambda t: t.view(*t.shape[:2], heads, -1).transpose(1, 2)  # noqa: E731
    ones = torch.ones(heads, dtype=x.dtype)
    attn = shaped_attention_reference(split(q), split(k), split(h), ones, ones, ones, causal=causal, key_padding_mask=padding)
    return attn.transpose(1, 2).reshape(x.shape) + beta_ff * orig.mlp(h)


# ── the families ─────────────────────────────────────────────────────────────────────────────────────────────────


def _hf_eager(model):
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    return model


def clip_text(seed):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=64, eos_token_id=63, bos_token_id=62, pad_token_id=0, **TEXT)
    model = randomize_(transformers.CLIPTextModel(cfg), 0.05).double().eval()
    ids = torch.randint(1, 62, (B, T))
    ids[:, -1] = 63
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    ids[1, 5] = 63
    return model, {"input_ids": ids, "attention_mask": mask}, model.encoder.layers, True


def clip_vision(seed):
    torch.manual_seed(seed)
    model = randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), 0.05).double().eval()
    return model, {"pixel_values": torch.randn(B, 3, 24, 24, dtype=torch.float64)}, model.encoder.layers, False


def siglip_text(seed):
    torch.manual_seed(seed)
    cfg = transformers.SiglipTextConfig(vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None, **TEXT)
    model = randomize_(transformers.SiglipTextModel(cfg), 0.05).double().eval()
    ids = torch.randint(2, 64, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}, model.encoder.layers, False


def vit(seed):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=3, num_attention_heads=H, image_size=24, patch_size=8)
    model = randomize_(transformers.ViTModel(cfg, add_pooling_layer=False), 0.05).double().eval()
    return model, {"pixel_values": torch.randn(B, 3, 24, 24, dtype=torch.float64)}, model.layers, False


def gpt2(seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=D, n_layer=3, n_head=H, n_positions=16, bos_token_id=0, eos_token_id=0,
                                  scale_attn_by_inverse_layer_idx=True)  # fmt: skip
    model = randomize_(transformers.GPT2Model(cfg), 0.05).double().eval()
    ids = torch.randint(1, 64, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, model.h, True


def _standin_import(name):
    pytest.importorskip(name)  # timm and open_clip import through siclip's torchvision stand-in where torchvision cannot load
    return __import__(name)


def timm_vit(seed, parallel=False):
    timm = _standin_import("timm")
    torch.manual_seed(seed)
    kwargs = dict(img_size=24, patch_size=8, embed_dim=D, depth=3, num_heads=H, num_classes=0, init_values=0.5, qkv_bias=True)
    if parallel:
        from timm.models.vision_transformer import ParallelScalingBlock

        kwargs["block_fn"] = ParallelScalingBlock
    model = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), 0.05).double().eval()
    return model, torch.randn(B, 3, 24, 24, dtype=torch.float64), model.blocks, False


def open_clip_towers(seed):
    open_clip = _standin_import("open_clip")
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=24, layers=3, width=D, patch_size=8, head_width=D // H, ls_init_value=0.5),
                           text_cfg=dict(context_length=T, vocab_size=64, width=D, heads=H, layers=3))  # fmt: skip
    model = randomize_(model, 0.05).double().eval()
    return model, (torch.randn(B, 3, 24, 24, dtype=torch.float64), torch.randint(1, 64, (B, T))), None, None


def original_parts(block: nn.Module) -> tuple[Original, bool | None]:
    """The family's own tensors, read plainly (not through siclip's converters)."""
    name = type(block).__name__
    if name in ("CLIPEncoderLayer", "SiglipEncoderLayer"):
        a, m = block.self_attn, block.mlp
        return Original(block.layer_norm1, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                        _mlp(m.fc1, m.activation_fn, m.fc2), a.scale), None  # fmt: skip
    if name == "ViTLayer":
        a, m = block.attention, block.mlp
        return Original(block.layernorm_before, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias,
                        _mlp(m.fc1, m.activation_fn, m.fc2), a.scaling), None  # fmt: skip
    if name == "GPT2Block":
        a, m = block.attn, block.mlp
        w, b = a.c_attn.weight.t().split(D), a.c_attn.bias.split(D)
        return Original(block.ln_1, w[0], b[0], w[1], b[1], lambda h: m.c_proj(m.act(m.c_fc(h))), a.scaling), True
    if name == "Block":
        a, m = block.attn, block.mlp
        w, b = a.qkv.weight.split(D), a.qkv.bias.split(D)
        return Original(block.norm1, w[0], b[0], w[1], b[1], _mlp(m.fc1, m.act, m.fc2, block.ls2.gamma), a.scale), None
    if name == "ParallelScalingBlock":
        hidden = block.in_split[0]
        w, b = block.in_proj.weight.split(block.in_split), block.in_proj.bias.split(block.in_split)
        mlp = lambda h: block.mlp_out_proj(block.mlp_act(F.linear(h, w[0], b[0]))) * block.ls.gamma  # noqa: E731
        assert hidden == w[0].shape[0]
        return Original(block.in_norm, w[1], b[1], w[2], b[2], mlp, block.scale), None
    if name == "ResidualAttentionBlock":
        a, m = block.attn, block.mlp
        w, b = a.in_proj_weight.split(D), a.in_proj_bias.split(D)
        return Original(block.ln_1, w[0], b[0], w[1], b[1], _mlp(m.c_fc, m.gelu, m.c_proj, getattr(block.ls_2, "gamma", None)), (D // H) ** -0.5), None
    raise AssertionError(name)


DROPPED = {
    "CLIPEncoderLayer": {"self_attn.v_proj.weight", "self_attn.out_proj.weight", "layer_norm2.weight"},
    "SiglipEncoderLayer": {"self_attn.v_proj.weight", "self_attn.out_proj.weight", "layer_norm2.weight"},
    "ViTLayer": {"attention.v_proj.weight", "attention.o_proj.weight", "layernorm_after.weight"},
    "GPT2Block": {"attn.c_attn.weight[v]", "attn.c_proj.weight", "ln_2.weight"},
    "Block": {"attn.qkv.weight[v]", "attn.proj.weight", "norm2.weight", "ls1.gamma"},
    "ParallelScalingBlock": {"in_proj.weight[v]", "attn_out_proj.weight", "ls.gamma"},
    "ResidualAttentionBlock": {"attn.in_proj_weight[v]", "attn.out_proj.weight", "ln_2.weight", "ls_1.gamma"},
}
FAMILIES = {"clip_text": clip_text, "clip_vision": clip_vision, "siglip_text": siglip_text, "vit": vit, "gpt2": gpt2,
            "timm_block": timm_vit, "timm_parallel": lambda s: timm_vit(s, parallel=True)}  # fmt: skip


def _run(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return torch.cat([o.flatten() for o in out])
    return out.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_block_equals_the_sasp_reference_of_the_original(family, seed):
    model, inputs, blocks, causal_default = FAMILIES[family](seed)
    calls = []
    handle = blocks[1].register_forward_hook(lambda m, a, k, o: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        _run(model, inputs)
    handle.remove()
    (args, kwargs), = calls
    orig, causal_family = original_parts(blocks[1])
    new, report = convert_block(blocks[1])
    assert isinstance(report, ConversionReport) and DROPPED[type(blocks[1]).__name__] <= {r["parameter"] for r in report.rows if r["action"] == "dropped"}
    with torch.no_grad():
        out = new(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        x = args[0]
        causal = bool(causal_family or kwargs.get("is_causal") or causal_default)
        from siclip.blocks.masking import decode_attention_mask

        mask = args[1] if len(args) > 1 and type(blocks[1]).__name__ != "GPT2Block" else (args[2] if len(args) > 2 else kwargs.get("attention_mask", kwargs.get("attn_mask")))
        _, padding = decode_attention_mask(mask, x.shape[0], x.shape[1], causal)
        expected = sasp_reference(orig, x, H, causal=causal, padding=padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_host_model_runs_its_own_forward_converted(family, seed, tmp_path):
    model, inputs, blocks, causal = FAMILIES[family](seed)
    n = len(blocks)
    model, report = convert_to_sasp(model)
    assert len(report.modules) == n and report.count("dropped") > 0
    out = _first_tensor(_run(model, inputs))
    assert torch.isfinite(out).all()
    if isinstance(inputs, dict) and "input_ids" in inputs:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        changed = dict(inputs, input_ids=ids.clone())
        row = int((mask == 0).any(1).nonzero()[0])
        changed["input_ids"][row, -1] = (ids[row, -1] + 1) % 60 + 1  # a padded token
        again = _run(model, changed).last_hidden_state
        real = mask[row].bool()
        torch.testing.assert_close(again[row, real], out[row, real], rtol=0, atol=1e-12)
        if causal:
            later = dict(inputs, input_ids=ids.clone())
            later["input_ids"][0, -2] = (ids[0, -2] + 1) % 60 + 1
            moved = _run(model, later).last_hidden_state
            torch.testing.assert_close(moved[0, : T - 2], out[0, : T - 2], rtol=0, atol=1e-12)  # earlier tokens never see it
            assert not torch.allclose(moved[0, T - 2], out[0, T - 2])
    if family in ("clip_text", "clip_vision", "siglip_text", "vit", "gpt2"):  # saved as data, rebuilt, the same outputs
        from siclip.interop.converted import ConvertedRecipe, load_converted, save_converted
        from siclip.interop.transformers import architecture_of

        recipe = ConvertedRecipe(origin="hf:unused", architecture=architecture_of(model), blocks=list(report.modules))
        reloaded, _ = load_converted(save_converted(model, recipe, tmp_path / "converted.pt"))
        with torch.no_grad():
            torch.testing.assert_close(_first_tensor(_run(reloaded, inputs)), out, rtol=0, atol=1e-12)  # out ran with autograd (fused projections)
    model.train()
    loss = _first_tensor(_run(model, inputs)).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["clip_text", "siglip_text", "vit", "gpt2"])
def test_attention_read_from_an_original_block_equals_its_own_output_attentions(family, seed):
    model, inputs, blocks, causal = FAMILIES[family](seed)
    _hf_eager(model)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, k, o: calls.append((m, a, k)), with_kwargs=True) for b in blocks]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    assert len(out.attentions) == len(blocks) == len(calls)
    for (block, args, kwargs), own in zip(calls, out.attentions):
        read = read_attention(block, args, kwargs)
        valid = ~(inputs.get("attention_mask", torch.ones(1, 1)) == 0) if "attention_mask" in inputs else None
        if valid is not None:  # rows of padded queries are the library's to fill; compare the tokens' rows
            torch.testing.assert_close(read[valid[:, None, :, None].expand_as(read)], own[valid[:, None, :, None].expand_as(own)], rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(read, own, rtol=0, atol=1e-6)
        if causal:
            assert read.triu(1).abs().max() == 0  # no mass on keys the causal block never sees


def test_converted_layers_record_hidden_states_and_shaped_attentions(seed):
    model, inputs, blocks, _ = clip_text(seed)
    n = len(blocks)
    model, _ = convert_to_sasp(model)
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    matrix = out.attentions[0]  # A = α·I + β·softmax − γ·C at initialisation: rows sum to α + β − γ = 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(matrix.sum(-1)[real[:, None, :].expand(-1, H, -1)], torch.ones(int(real.sum()) * H, dtype=matrix.dtype))
    assert matrix.triu(1).abs().max() == 0


def test_open_clip_towers_convert_and_read(seed):
    model, (images, ids), _, _ = open_clip_towers(seed)
    report = divergence_report(model, (images, ids))
    assert set(report.groups) == {"visual.transformer.resblocks", "transformer.resblocks"}
    calls = []
    handle = model.transformer.resblocks[0].register_forward_hook(lambda m, a, k, o: calls.append((m, a, k)), with_kwargs=True)
    with torch.no_grad():
        model.encode_text(ids)
    handle.remove()
    (block, args, kwargs), = calls
    probs = read_attention(block, args, kwargs)
    assert probs.triu(1).abs().max() == 0  # the text tower is causal
    orig, _ = original_parts(block)
    x = args[0]
    new, _ = convert_block(block)
    torch.testing.assert_close(new(*args, **kwargs), sasp_reference(orig, x, H, causal=True), rtol=1e-10, atol=1e-10)
    visual = model.visual.transformer.resblocks[0]
    vx = torch.randn(B, 10, D, dtype=torch.float64)
    orig_v, _ = original_parts(visual)
    torch.testing.assert_close(convert_block(visual)[0](vx), sasp_reference(orig_v, vx, H, causal=False), rtol=1e-10, atol=1e-10)
    model, report = convert_to_sasp(model)
    assert len(report.modules) == 6 and model.transformer.get_cast_dtype() == torch.float64
    assert torch.isfinite(model.encode_text(ids)).all() and torch.isfinite(model.encode_image(images)).all()


def test_post_ln_blocks_are_refused_with_the_reason():
    layer = transformers.models.bert.modeling_bert.BertLayer(transformers.BertConfig(hidden_size=D, num_attention_heads=H, intermediate_size=2 * D))
    with pytest.raises(TypeError, match="Post-LN block .* no pre-norm for both branches to share"):
        convert_block(layer)


def test_sasp_from_parts_converts_a_block_nobody_registered(seed):
    class MyBlock(nn.Module):  # a Pre-LN block written by hand
        def __init__(self):
            super().__init__()
            self.ln, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
            self.ff = nn.Sequential(nn.Linear(D, 3 * D), nn.SiLU(), nn.Linear(3 * D, D))

    mine = randomize_(MyBlock().double(), 0.1)
    block, report = sasp_from_parts(norm=mine.ln, q=mine.q, k=mine.k, fc1=mine.ff[0], act=mine.ff[1], fc2=mine.ff[2], num_heads=H)
    report.add("", {"v.weight": mine.v.weight, "o.weight": mine.o.weight, "ln2.weight": mine.ln2.weight}, "dropped")
    x = torch.randn(B, T, D, dtype=torch.float64)
    orig = Original(mine.ln, mine.q.weight, mine.q.bias, mine.k.weight, mine.k.bias, lambda h: mine.ff(h), (D // H) ** -0.5)
    torch.testing.assert_close(block(x), sasp_reference(orig, x, H, causal=False), rtol=1e-10, atol=1e-10)
    assert report.count("dropped") == 2 * D * D + D
    with pytest.raises(ValueError, match="not divisible"):
        sasp_from_parts(norm=mine.ln, q=mine.q, k=mine.k, fc1=mine.ff[0], act=mine.ff[1], fc2=mine.ff[2], num_heads=5)


def test_divergence_report_and_flops_on_a_model_someone_else_wrote(seed, tmp_path):
    model, inputs, blocks, _ = gpt2(seed)
    report = divergence_report(model, inputs, max_groups=2)
    g = report.groups["h"]
    assert g["attention"].shape == (3, 3) and torch.allclose(g["attention"], g["attention"].T) and (g["attention"].diagonal() == 0).all()
    assert g["plan"].num_groups == 2 and len(report.table()) == 2
    paths = report.save(tmp_path)
    assert all(p.stat().st_size > 0 for p in paths) and "| h | 0-1 |" in str(report)
    before = model_report(model, inputs)
    step = model_report(model, inputs, output="last_hidden_state", backward=True)
    assert step["gflops"] > 2 * before["gflops"]  # backward costs about twice the forward
    converted, _ = convert_to_sasp(model)
    after = model_report(converted, inputs)
    # Per token and block: 4d² (QKV, W_P) + 2·d·4d (MLP)… minus W_V, W_P: the FLOP ratio of the blocks is (2 + 8)/(4 + 8)
    assert after["gflops"] < before["gflops"] and after["params"] < before["params"]
    assert math.isclose(before["gflops_by_module"]["h"] - after["gflops_by_module"]["h"], 2 * 3 * B * T * 2 * D * D / 1e9, rel_tol=1e-9)
