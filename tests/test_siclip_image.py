"""SAS-P in the image encoder: MCi's attention blocks converted with inheritance, shared, reparameterised."""

import copy

import pytest
import torch
from einops import rearrange
from torch import nn

from siclip.blocks import SASPBlock2d, SASPConversion, convert_block, count_parameters
from siclip.models import SiCLIPConfig, build_siclip, create_model, reparameterize_model
from siclip.models.fastvit import AttentionBlock, ConvFFN
from siclip.models.siclip import attention_stage

from helpers import randomized, reference_sasp2d


def test_sasp_block2d_matches_reference_in_float64(seed):
    dim, heads = 64, 4
    block = randomized(SASPBlock2d(dim, heads, ConvFFN(dim, 3 * dim), zero_query=False), seed, torch.float64).eval()
    x = torch.randn(3, dim, 5, 6, dtype=torch.float64)  # a non-square map: rows and columns must not mix up
    torch.testing.assert_close(block(x), reference_sasp2d(block, x), rtol=1e-10, atol=1e-10)
    a, f = block.forward_branches(x)
    torch.testing.assert_close(a + f, block(x))
    with pytest.raises(ValueError, match=r"SASPBlock2d expects \(batch, channels, height, width\)"):
        block(x.flatten(2))
    # Channels-last input takes the token-layout path; both give the reference, in eval and in training
    # (batch statistics over batch and positions, as BatchNorm2d).
    last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(last), reference_sasp2d(block, x), rtol=1e-10, atol=1e-10)
    block.train()
    expected = nn.functional.batch_norm(x, None, None, block.norm.weight, block.norm.bias, training=True, eps=block.norm.eps)
    for inp in (x, last):
        torch.testing.assert_close(block.normed_map(inp), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sasp_block2d_attention_takes_sdpa_fused_kernel_on_either_layout(seed, memory_format):
    """A channels-first map's token view has head_dim strided; SDPA would then take its math path (a T×T
    matrix, slower: it was 13 % of stage 4 at batch 1). The block hands it unit-stride tokens instead."""
    from siclip.analysis.traffic import trace_traffic

    block = randomized(SASPBlock2d(64, 4, ConvFFN(64, 192), zero_query=False, backend="sdpa"), seed).eval()
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=memory_format)
    with torch.no_grad():
        ops = [o.op for o in trace_traffic(lambda: block(x))]
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "bmm" not in ops and "_softmax" not in ops


def test_converted_attention_block_inherits_its_parts(seed):
    dim = 64
    old = randomized(AttentionBlock(dim, 3.0, 16, 1e-5), seed).eval()
    new, report = convert_block(old, SASPConversion())
    new.eval()
    assert isinstance(new, SASPBlock2d) and new.num_heads == old.token_mixer.num_heads
    x = torch.randn(2, dim, 4, 4)
    tokens = rearrange(x, "b c h w -> b (h w) c")
    h_old = old.norm(x)
    torch.testing.assert_close(new.normed_tokens(x), rearrange(h_old, "b c h w -> b (h w) c"))
    w_q, w_k, _ = old.token_mixer.qkv.weight.split(dim)
    torch.testing.assert_close(new.attn.q(tokens), tokens @ w_q.T)
    torch.testing.assert_close(new.attn.k(tokens), tokens @ w_k.T)
    torch.testing.assert_close(new.ffn(h_old), old.layer_scale_2 * old.convffn(h_old))  # layer scale folded
    # The per-tensor report: W_V, W_P and both layer scales dropped, 3 gains per head and 2 branch gains new.
    frame = report.to_frame().set_index("parameter")
    assert frame.loc["token_mixer.qkv.weight[v]", "action"] == "dropped" and frame.loc["token_mixer.proj.weight", "action"] == "dropped"
    assert frame.loc["ffn.fc2.weight", "note"] == "layer_scale_2 folded in"
    assert report.count("new") == 3 * 4 + 2
    assert report.count("dropped") == dim * dim + dim * dim + dim + 2 * dim
    with pytest.raises(ValueError, match="fold_layer_scale"):
        convert_block(old, SASPConversion(fold_layer_scale=False))


def test_fresh_converted_block_attention_starts_as_identity(seed):
    """With the published W_Q = 0 (zero_query) and α = β = γ = 1 the attention branch is BN(X) exactly."""
    dim = 64
    old = randomized(AttentionBlock(dim, 3.0, 16, 1e-5), seed).eval()
    new, report = convert_block(old, SASPConversion(zero_query=True))
    new.eval()
    assert torch.count_nonzero(new.attn.q.weight) == 0 and "zeroed" in report.to_frame().set_index("parameter").loc["attn.q.weight", "note"]
    x = torch.randn(2, dim, 4, 4)
    attention, ffn = new.forward_branches(x)
    torch.testing.assert_close(attention, old.norm(x))
    torch.testing.assert_close(ffn, 0.1 * old.layer_scale_2 * old.convffn(old.norm(x)))


def test_siclip_image_tower_inherits_and_shares(seed):
    teacher = randomized(create_model("mobileclip_tiny"), seed).eval()
    student, report = build_siclip(teacher, SiCLIPConfig())
    student.eval()
    name, blocks = attention_stage(teacher)
    stage = student.get_submodule(name)
    assert name == "visual.network.7" and len(stage) == 2 and all(isinstance(b, SASPBlock2d) for b in stage)
    # Everything before the attention stage is inherited unchanged: the stage's input is the teacher's.
    images = torch.rand(2, 3, 64, 64)
    prefix = lambda model: nn.Sequential(model.visual.patch_embed, *model.visual.network[:7])  # noqa: E731
    torch.testing.assert_close(prefix(student)(images), prefix(teacher)(images))
    # W_Q, W_K (and the shaped gains) are one module in both blocks; the ConvFFNs stay separate.
    assert stage[0].attn is stage[1].attn and stage[0].attn.q.weight.data_ptr() == stage[1].attn.q.weight.data_ptr()
    assert stage[0].ffn.fc1.weight.data_ptr() != stage[1].ffn.fc1.weight.data_ptr()
    torch.testing.assert_close(stage[1].attn.k.weight, blocks[0].token_mixer.qkv.weight[128:256])  # the first block's
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in student.named_parameters() if n.startswith(("text.transformer.", "visual.network.7."))}
    assert "image: sharing attentions as [0,1]" in report.sharing
    table = report.summary()
    assert table.loc["total", "inherited"] + table.loc["total", "new"] == count_parameters(student)
    assert table.loc["visual.network.7", "new"] == 3 * 4 + 2 * 2


def test_shared_image_attention_accumulates_gradients_over_both_blocks(seed):
    """The shared W_Q, W_K and gains get the sum of what two unshared copies of them receive."""
    teacher = randomized(create_model("mobileclip_tiny"), seed).eval()
    shared_stage = build_siclip(teacher, SiCLIPConfig(freeze="none"))[0].visual.network[7]
    with torch.no_grad():
        shared_stage[0].attn.q.weight.normal_(std=0.1)  # inherited W_Q: not zero, so W_K gets a gradient too
    unshared_stage = copy.deepcopy(shared_stage)
    unshared_stage[1].attn = copy.deepcopy(unshared_stage[0].attn)
    x, upstream = torch.randn(2, 128, 2, 2), torch.randn(2, 128, 2, 2)
    for stage in (shared_stage, unshared_stage):
        (stage.train()(x) * upstream).sum().backward()
    for name, p in shared_stage[0].attn.named_parameters():
        parts = [blk.attn.get_parameter(name).grad for blk in unshared_stage]
        assert all(g.abs().sum() > 0 for g in parts), name
        torch.testing.assert_close(p.grad, parts[0] + parts[1])


def test_reparameterised_converted_image_tower_keeps_outputs_in_float64(seed):
    teacher = randomized(create_model("mobileclip_tiny"), seed, torch.float64).eval()
    student, _ = build_siclip(teacher, SiCLIPConfig())
    student = randomized(student, seed + 1, torch.float64).eval()  # trained-looking SAS-P blocks too
    fused = reparameterize_model(student)
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(fused.encode_image(images), student.encode_image(images), rtol=1e-10, atol=1e-10)
    assert count_parameters(fused.visual) < count_parameters(student.visual)
    assert fused.visual.network[7][0].attn is fused.visual.network[7][1].attn  # fusion keeps the sharing


def test_text_only_conversion_keeps_the_image_encoder(seed):
    teacher = randomized(create_model("mobileclip_tiny"), seed).eval()
    student, report = build_siclip(teacher, SiCLIPConfig(convert=("text",)))
    student.eval()
    assert all(isinstance(b, AttentionBlock) for b in student.visual.network[7]) and "image" not in report.sharing
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(student.encode_image(images), teacher.encode_image(images))


def test_image_sharing_chosen_by_divergence(seed):
    teacher = create_model("mobileclip_tiny").eval()
    config = SiCLIPConfig(image_sharing="threshold", image_sharing_threshold=0.1, image_sharing_scope="block")
    student, _ = build_siclip(teacher, config, divergence={"image": [0.05]})
    assert student.visual.network[7][0] is student.visual.network[7][1]
    student, _ = build_siclip(teacher, config, divergence={"image": [0.5]})
    assert student.visual.network[7][0] is not student.visual.network[7][1]
    with pytest.raises(ValueError, match="needs measured divergences"):
        build_siclip(teacher, config, divergence=[0.1, 0.2, 0.3])  # a bare array is the text tower's
    assert config.measured_towers() == ["image"]
    assert copy.deepcopy(config) == config


def test_training_measures_image_divergences_on_the_teacher(seed):
    from siclip.train import TrainConfig
    from siclip.data import EmbeddedConfig, EmbeddedSource
    from siclip.train.inputs import RunInputs
    from siclip.train.loop import calibration_image_divergence

    teacher = create_model("mobileclip_tiny").eval()
    source = EmbeddedSource(EmbeddedConfig(num_train=8, image_size=teacher.config.image.image_size), "train")  # the training images
    inputs = RunInputs(source=source, tokenizer=None, teacher=teacher, unknown_rate=0.0)
    d = calibration_image_divergence(teacher, TrainConfig(calibration_captions=4), inputs)
    assert d.shape == (2, 2) and d[0, 1] == d[1, 0] > 0 and d[0, 0] == 0
    config = SiCLIPConfig(image_sharing="optimal", image_sharing_max_groups=1)
    student, report = build_siclip(teacher, config, divergence={"image": d})
    assert student.visual.network[7][0].attn is student.visual.network[7][1].attn and "image: sharing attentions as [0,1]" in report.sharing
