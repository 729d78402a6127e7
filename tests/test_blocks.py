import pytest
import torch
from torch import nn

from siclip.blocks import (
    Block2d,
    PreLNBlock,
    SASBlock,
    SASPBlock,
    count_parameters,
    create_act,
    create_norm,
    param_groups_weight_decay,
    shaped_attention_matrix,
)

from helpers import padding_mask, randomize_

NORMS = ["layernorm", "rmsnorm", "batchnorm"]


def _heads_matrix(q, k, attn, causal, mask):
    """The explicit per-head shaped matrix for projected (batch, tokens, dim) q and k."""
    b, t, d = q.shape
    h = attn.num_heads
    split = lambda x: x.view(b, t, h, d // h).transpose(1, 2)  # noqa: E731
    s = attn.shaped
    return shaped_attention_matrix(split(q), split(k), s.alpha, s.beta, s.gamma, causal=causal, key_padding_mask=mask)


def reference_shaped_mha(attn, h, causal, mask):
    """Plain ShapedMHA: per-head matrix times the head's slice of the values, heads concatenated."""
    b, t, d = h.shape
    v = h if attn.value is None else attn.value.gain_skip * h + attn.value.gain_resid * h @ attn.value.weight.T
    matrix = _heads_matrix(attn.q(h), attn.k(h), attn, causal, mask)
    heads = [matrix[:, i] @ v[..., i * d // attn.num_heads : (i + 1) * d // attn.num_heads] for i in range(attn.num_heads)]
    return torch.cat(heads, dim=-1)


def reference_sasp(block: SASPBlock, x, causal=False, mask=None):
    h = block.norm(x)
    mlp = block.mlp.fc2(block.mlp.act(block.mlp.fc1(h)))
    return block.gain_attn * reference_shaped_mha(block.attn, h, causal, mask) + block.gain_mlp * mlp


def reference_sas(block: SASBlock, x, causal=False, mask=None):
    a = block.gain_attn * reference_shaped_mha(block.attn, block.norm1(x), causal, mask)
    return a + block.gain_mlp * block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(a))))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("trainable_value", [False, True])
def test_sasp_matches_plain_reference(seed, norm, causal, padded, trainable_value):
    block = randomize_(SASPBlock(24, 4, norm=norm, trainable_value=trainable_value).double()).train()
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    mask = padding_mask(3, 11) if padded else None
    torch.testing.assert_close(block(x, mask, causal), reference_sasp(block, x, causal, mask))


@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("tokens", [3, 11])  # 3·3·96 activations < 24·96 weights < 3·11·96: β_FF scales either side
def test_sasp_gradients_match_plain_reference(seed, mlp_bias, tokens):
    """Every parameter's gradient (β_FF folded into fc2's weights or into the activations) equals the reference's."""
    block = randomize_(SASPBlock(24, 4, mlp_bias=mlp_bias).double()).train()
    x = torch.randn(3, tokens, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, tokens, 24, dtype=torch.float64)
    params = [x, *block.parameters()]
    fast = torch.autograd.grad(block(x), params, g)
    slow = torch.autograd.grad(reference_sasp(block, x, False, None), params, g)
    for name, a, b in zip(["x", *(n for n, _ in block.named_parameters())], fast, slow):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("trainable_value", [False, True])
@pytest.mark.parametrize("tokens", [3, 11])
def test_sasp_inference_path_matches_plain_reference(seed, no_autograd, trainable_value, tokens):
    """Without autograd the block takes separate projections (no stacked weight copy): the same function."""
    block = randomize_(SASPBlock(24, 4, trainable_value=trainable_value, mlp_bias=True).double()).eval()
    x = torch.randn(3, tokens, 24, dtype=torch.float64)
    mask = padding_mask(3, tokens)
    expected = reference_sasp(block, x, True, mask).detach()
    with no_autograd():
        torch.testing.assert_close(block(x, mask, True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal,padded", [(False, True), (True, False)])
def test_sas_matches_plain_reference(seed, causal, padded):
    block = randomize_(SASBlock(24, 4, causal=causal, trainable_value=True).double())
    x = torch.randn(3, 11, 24, dtype=torch.float64)
    mask = padding_mask(3, 11) if padded else None
    torch.testing.assert_close(block(x, mask), reference_sas(block, x, causal, mask))


@pytest.mark.parametrize("trainable_value", [False, True])
def test_fused_projection_equals_separate_projections(seed, trainable_value):
    fused = randomize_(SASPBlock(32, 4, trainable_value=trainable_value, mlp_bias=True).double())
    separate = SASPBlock(32, 4, trainable_value=trainable_value, mlp_bias=True, fused_proj=False).double()
    separate.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    y1, y2 = fused(x), separate(x)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    torch.testing.assert_close(torch.autograd.grad(y1, x, g), torch.autograd.grad(y2, x, g))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("trainable_value", [False, True])
def test_fresh_sasp_attention_branch_is_its_normalised_input(seed, norm, causal, padded, trainable_value):
    block = SASPBlock(32, 4, norm=norm, causal=causal, trainable_value=trainable_value).double()
    with torch.no_grad():  # a trained norm, so the identity is not a coincidence of unit gains
        for p in block.norm.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 13, 32, dtype=torch.float64) * 3 + 1
    mask = padding_mask(2, 13) if padded else None
    attn_branch, mlp_branch = block.forward_branches(x, mask)
    torch.testing.assert_close(attn_branch, block.norm(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mlp_branch, 0.1 * block.mlp(block.norm(x)))
    torch.testing.assert_close(block(x, mask), attn_branch + mlp_branch)


def test_fresh_sas_attention_sub_block_is_identity(seed):
    block = SASBlock(32, 4).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    h = block.norm1(x)
    torch.testing.assert_close(block.attn(h, gain=block.gain_attn), h, rtol=1e-12, atol=1e-12)


def test_published_initialisation():
    block = SASPBlock(64, 8, trainable_value=True)
    attn = block.attn
    assert torch.count_nonzero(attn.q.weight) == 0
    assert 0.015 < attn.k.weight.std().item() < 0.025
    for gain in (attn.shaped.alpha, attn.shaped.beta, attn.shaped.gamma):
        assert gain.shape == (8,) and torch.all(gain == 1)
    assert block.gain_attn.item() == 1.0 and block.gain_mlp.item() == pytest.approx(0.1)
    assert torch.count_nonzero(attn.value.weight) == 0
    assert attn.value.gain_skip.item() == 1.0 and attn.value.gain_resid.item() == 1.0
    assert block.mlp.fc1.bias is None and isinstance(block.mlp.act, nn.ReLU)


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("padded", [False, True])
def test_pre_ln_block_matches_torch_encoder_layer(seed, act, padded):
    ours = PreLNBlock(32, 4, act=act).double().eval()
    ref = nn.TransformerEncoderLayer(32, 4, 128, dropout=0.0, activation=act, norm_first=True, batch_first=True)
    ref = ref.double().eval()
    randomize_(ours, 0.1)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(ours.attn.proj.state_dict())
        ref.linear1.load_state_dict(ours.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(ours.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    mask = padding_mask(3, 10) if padded else None
    torch.testing.assert_close(ours(x, mask), ref(x, src_key_padding_mask=mask))
    torch.testing.assert_close(ours(x, src_key_padding_mask=mask), ref(x, src_key_padding_mask=mask))


@pytest.mark.parametrize("causal", [False, True])
def test_pre_ln_fused_and_explicit_attention_agree(seed, causal):
    fused = randomize_(PreLNBlock(32, 4, causal=causal, layer_scale_init=0.5).double())
    explicit = PreLNBlock(32, 4, causal=causal, layer_scale_init=0.5, fused_attn=False).double()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = padding_mask(2, 9)
    torch.testing.assert_close(fused(x, mask), explicit(x, mask))


@pytest.mark.parametrize("dim,heads", [(512, 8), (768, 12)])
def test_sasp_has_15_to_20_percent_fewer_parameters(dim, heads):
    pre, sasp = PreLNBlock(dim, heads), SASPBlock(dim, heads, mlp_bias=True)
    n_pre, n_sasp = count_parameters(pre), count_parameters(sasp)
    assert n_pre == 12 * dim * dim + 13 * dim  # qkv, proj, fc1, fc2 (+ biases) and two LayerNorms
    assert n_pre - n_sasp == 2 * dim * dim + 2 * dim + 2 * dim - 3 * heads - 2  # W_V, W_P, norm2 out; gains in
    assert 0.15 <= 1 - n_sasp / n_pre <= 0.20


def test_weight_decay_groups_exclude_gains_norms_biases():
    model = nn.Sequential(SASPBlock(16, 2, trainable_value=True, mlp_bias=True), PreLNBlock(16, 2, layer_scale_init=1e-5))
    model[1].mlp.fc2.weight.requires_grad_(False)
    decay, no_decay = param_groups_weight_decay(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {
        "0.attn.q.weight", "0.attn.k.weight", "0.attn.value.weight", "0.mlp.fc1.weight", "0.mlp.fc2.weight",
        "1.attn.qkv.weight", "1.attn.proj.weight", "1.mlp.fc1.weight",
    }  # fmt: skip
    assert {"0.attn.shaped.alpha", "0.gain_mlp", "0.attn.value.gain_skip", "0.norm.weight", "1.ls1.gamma"} <= kept
    assert "1.mlp.fc2.weight" not in decayed | kept  # frozen
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("block_cls", [PreLNBlock, SASBlock, SASPBlock])
def test_block2d_runs_token_block_on_feature_maps(seed, block_cls):
    block = randomize_(block_cls(16, 2, norm="batchnorm").double())
    wrapped = Block2d(block)
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)
    expected = block(tokens).transpose(1, 2).reshape(2, 16, 3, 5)
    torch.testing.assert_close(wrapped(x), expected)


@pytest.mark.parametrize("training", [True, False])
def test_token_batchnorm_equals_batchnorm2d(seed, training):
    bn2d = nn.BatchNorm2d(8).double()
    ours = create_norm("batchnorm", 8).double()
    randomize_(bn2d)
    with torch.no_grad():
        bn2d.running_mean.normal_()
        bn2d.running_var.uniform_(0.5, 2)
    ours.load_state_dict(bn2d.state_dict())
    bn2d.train(training), ours.train(training)
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    expected = bn2d(x)
    got = ours(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.running_mean, bn2d.running_mean)


def test_gradcheck_sasp_block(seed):
    block = randomize_(SASPBlock(8, 2, trainable_value=True, causal=True).double())
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        SASPBlock(30, 4)
    with pytest.raises(ValueError, match="not divisible"):
        PreLNBlock(30, 4)
    with pytest.raises(ValueError, match="unknown norm"):
        create_norm("groupnorm", 8)
    with pytest.raises(ValueError, match="unknown activation"):
        create_act("swish9")
    block = SASPBlock(16, 2)
    with pytest.raises(NotImplementedError, match="src_mask"):
        block(torch.randn(1, 4, 16), src_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        block(torch.randn(2, 4, 16), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="Block2d expects"):
        Block2d(block)(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="channels last"):
        create_norm("batchnorm", 16)(torch.randn(2, 4, 8))
