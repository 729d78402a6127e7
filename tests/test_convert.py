import pytest
import torch
from torch import nn

from siclip.blocks import (
    BlockStack,
    PreLNBlock,
    SASPBlock,
    SASPConversion,
    convert_block,
    convert_to_sasp,
    count_parameters,
)

from helpers import padding_mask, randomize_


def _torch_layer(dim=32, heads=4, act="gelu", **kw):
    kw = {"norm_first": True, "batch_first": True, **kw}
    return nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation=act, **kw).double()


def _q_k(qkv_weight, qkv_bias, h):
    q, k, _ = torch.nn.functional.linear(h, qkv_weight, qkv_bias).chunk(3, dim=-1)
    return q, k


@pytest.mark.parametrize("layer_scale", [None, 0.3])
def test_pre_ln_conversion_keeps_inherited_parts(seed, layer_scale):
    old = randomize_(PreLNBlock(32, 4, layer_scale_init=layer_scale).double(), 0.1)
    new, report = convert_block(old)
    assert isinstance(new, SASPBlock) and new.num_heads == 4
    h = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(new.norm(h), old.norm1(h))
    q, k = _q_k(old.attn.qkv.weight, old.attn.qkv.bias, h)
    torch.testing.assert_close(new.attn.q(h), q)
    torch.testing.assert_close(new.attn.k(h), k)
    torch.testing.assert_close(new.mlp(h), old.ls2(old.mlp(h)))
    # Every original element is accounted for: inherited or dropped; only gains are new.
    assert report.count("inherited") + report.count("dropped") == count_parameters(old)
    assert report.count("new") == 3 * 4 + 2
    assert report.count("inherited") + report.count("new") == count_parameters(new)
    frame = report.to_frame()
    assert set(frame.action) == {"inherited", "dropped", "new"}
    assert set(frame[frame.action == "dropped"].parameter) >= {"attn.proj.weight", "attn.qkv.weight[v]", "norm2.weight"}


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_torch_encoder_layer_conversion_keeps_inherited_parts(seed, act):
    old = randomize_(_torch_layer(act=act), 0.1)
    new, report = convert_block(old)
    h = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(new.norm(h), old.norm1(h))
    q, k = _q_k(old.self_attn.in_proj_weight, old.self_attn.in_proj_bias, h)
    torch.testing.assert_close(new.attn.q(h), q)
    torch.testing.assert_close(new.attn.k(h), k)
    torch.testing.assert_close(new.mlp(h), old.linear2(old.activation(old.linear1(h))))
    assert report.count("inherited") + report.count("dropped") == count_parameters(old)


def test_converted_block_equals_the_sasp_formula_on_inherited_weights(seed):
    old = randomize_(PreLNBlock(32, 4).double(), 0.1)
    new, _ = convert_block(old, SASPConversion(beta_ff=0.25, beta_sa=0.5))
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    a, m = new.forward_branches(x)
    torch.testing.assert_close(m, 0.25 * old.mlp(old.norm1(x)))
    torch.testing.assert_close(new(x), a + m)
    assert not torch.allclose(a, 0.5 * old.norm1(x))  # inherited W_Q: attention is not the identity


def test_zero_query_gives_the_identity_start(seed):
    old = randomize_(_torch_layer(), 0.1)
    new, report = convert_block(old, SASPConversion(zero_query=True))
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    torch.testing.assert_close(new.forward_branches(x)[0], new.norm(x))
    assert "zeroed (zero_query)" in set(report.to_frame().note)


def test_model_wide_conversion_and_nn_transformer_encoder(seed):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 32)
            self.blocks = nn.ModuleList([PreLNBlock(32, 4), PreLNBlock(32, 4)])
            self.encoder = nn.TransformerEncoder(_torch_layer().float(), 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
            self.head = nn.Linear(32, 3)

        def forward(self, x, mask=None):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.encoder(x, src_key_padding_mask=mask))

    model = Model()
    embed = model.embed.weight.detach().clone()
    model, report = convert_to_sasp(model)
    assert all(isinstance(b, SASPBlock) for b in model.blocks)
    assert isinstance(model.encoder, BlockStack) and all(isinstance(b, SASPBlock) for b in model.encoder.blocks)
    assert report.modules == ["blocks.0", "blocks.1", "encoder.blocks.0", "encoder.blocks.1"]
    assert torch.equal(model.embed.weight, embed)
    x = torch.randn(2, 5, 8)
    assert model(x, padding_mask(2, 5)).shape == (2, 5, 3)
    assert report.summary().loc["blocks.0", "inherited"] > 0


def test_only_named_blocks_are_converted():
    model = nn.Sequential(PreLNBlock(16, 2), PreLNBlock(16, 2))
    model, report = convert_to_sasp(model, names=["1"])
    assert isinstance(model[0], PreLNBlock) and isinstance(model[1], SASPBlock)
    assert report.modules == ["1"]


def test_clear_errors():
    with pytest.raises(TypeError, match="no SAS-P converter for block type Linear"):
        convert_block(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="Linear"):
        convert_to_sasp(nn.Sequential(nn.Linear(4, 4)), names=["0"])
    with pytest.raises(ValueError, match="no convertible blocks"):
        convert_to_sasp(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="norm_first=True, batch_first=True"):
        convert_block(_torch_layer(norm_first=False))
    with pytest.raises(ValueError, match="norm_first=True, batch_first=True"):
        convert_block(_torch_layer(batch_first=False))
    with pytest.raises(ValueError, match="fold_layer_scale"):
        convert_block(PreLNBlock(16, 2, layer_scale_init=0.1), SASPConversion(fold_layer_scale=False))
