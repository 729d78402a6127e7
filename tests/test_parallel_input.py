"""The fused input function of SAS-P blocks (norm → one projection → activation, with its own backward).

The unfused path (autograd composing the same ops, ``fused_input=False``) is the reference: in float64 the
outputs and every gradient must agree to rounding, whatever subset of outputs is used and whatever
parameters are frozen; under bf16 autocast both paths must stay near the float64 result; and the fused
backward must move fewer bytes than the composed one (the reason it exists).
"""

import pytest
import torch
from torch import nn

from siclip.analysis.benchmark import make_block
from siclip.analysis.traffic import trace_traffic
from siclip.blocks import SASPBlock
from siclip.blocks.parallel_input import norm_project_act

from helpers import padding_mask, randomize_


def _pair(act="gelu", *, mlp_bias=True, qk_bias=True, norm="layernorm", causal=False, dtype=torch.float64):
    fused = randomize_(SASPBlock(32, 4, act=act, mlp_bias=mlp_bias, qk_bias=qk_bias, norm=norm, causal=causal))
    unfused = SASPBlock(32, 4, act=act, mlp_bias=mlp_bias, qk_bias=qk_bias, norm=norm, causal=causal, fused_input=False)
    unfused.load_state_dict(fused.state_dict())
    return fused.to(dtype), unfused.to(dtype)


def _grads(block, x, mask, upstream):
    out = block(x, mask)
    params = [p for p in block.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, [x, *params], upstream, allow_unused=True)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("mlp_bias,qk_bias", [(True, True), (False, False), (False, True)])
def test_fused_input_equals_composed_ops_in_float64(seed, act, causal, padded, mlp_bias, qk_bias):
    fused, unfused = _pair(act, mlp_bias=mlp_bias, qk_bias=qk_bias, causal=causal)
    assert fused._fused_activation() == act and unfused._fused_activation() is None
    x = torch.randn(3, 11, 32, dtype=torch.float64, requires_grad=True) * 2 + 0.5
    mask = padding_mask(3, 11) if padded else None
    upstream = torch.randn(3, 11, 32, dtype=torch.float64)
    y, grads = _grads(fused, x, mask, upstream)
    y_ref, grads_ref = _grads(unfused, x, mask, upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_fused_input_without_norm_affine_and_with_frozen_parameters(seed):
    def norm(dim):
        return nn.LayerNorm(dim, elementwise_affine=False)

    fused, unfused = _pair(norm=norm)
    for block in (fused, unfused):
        block.attn.q.weight.requires_grad_(False)
        block.mlp.fc1.bias.requires_grad_(False)
    assert fused._fused_activation() == "gelu"
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 9, 32, dtype=torch.float64)
    for g, g_ref in zip(_grads(fused, x, None, upstream)[1], _grads(unfused, x, None, upstream)[1], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("used", [(0,), (1, 3), (2,), (3,), (0, 1, 2, 3)])
@pytest.mark.parametrize("biases", [(True, True, True), (True, False, True), (False, False, False)])
def test_unused_outputs_get_no_gradient_of_their_own(seed, used, biases):
    """Any subset of (Q, K, H, act(P)) may reach the loss; the others' gradients are zero, not garbage; a layer
    without a bias gets none."""
    norm = randomize_(nn.LayerNorm(16)).double()
    weights = [torch.randn(rows, 16, dtype=torch.float64, requires_grad=True) for rows in (16, 16, 40)]
    bias_list = [torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True) if b else None for w, b in zip(weights, biases)]
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)

    def composed(x):
        h = norm(x)
        q, k, p = (nn.functional.linear(h, w, b) for w, b in zip(weights, bias_list))
        return q, k, h, nn.functional.gelu(p)

    inputs = [x, *weights, *(b for b in bias_list if b is not None), *norm.parameters()]
    losses = []
    for outputs in (norm_project_act(x, norm, weights, bias_list, "gelu"), composed(x)):
        losses.append(sum((outputs[i] * torch.randn_like(outputs[i], generator=torch.Generator().manual_seed(i))).sum() for i in used))
    grads = [torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True) for loss in losses]
    for g, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])  # bf16: the output of a previous block
def test_fused_input_under_bf16_autocast_stays_near_float64(seed, input_dtype):
    fused, unfused = _pair(dtype=torch.float32)
    reference = SASPBlock(32, 4, act="gelu", mlp_bias=True).double()
    reference.load_state_dict(fused.state_dict())
    # The key bias gets no gradient in exact arithmetic (softmax ignores a shift shared by all keys),
    # so its relative error means nothing: leave it out.
    reference.attn.k.bias.requires_grad_(False)
    fused.attn.k.bias.requires_grad_(False)
    unfused.attn.k.bias.requires_grad_(False)
    x = torch.randn(4, 16, 32).to(input_dtype).requires_grad_()
    upstream = torch.randn(4, 16, 32)
    y_ref, grads_ref = _grads(reference, x.detach().double().requires_grad_(), None, upstream.double())
    errors = {}
    for name, block in (("fused", fused), ("unfused", unfused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, grads = _grads(block, x, None, upstream)
        assert y.dtype == torch.bfloat16
        assert grads[0].dtype == input_dtype and all(g.dtype == torch.float32 for g in grads[1:])
        # Activations and matrix/vector gradients only: the scalar and per-head gains' gradients are sums
        # over every element with heavy cancellation, off by 5-15 % in bf16 on either path (the float64
        # test holds them exactly).
        errors[name] = [
            ((g.double() - r).norm() / r.norm()).item()
            for g, r in zip((y, *grads), (y_ref, *grads_ref), strict=True)
            if r.numel() > 16
        ]
    # bf16 keeps 8 bits: each relative error is a few 2⁻⁸ at most, and the fused path is no worse than
    # the composed one beyond that scale.
    for e_fused, e_unfused in zip(errors["fused"], errors["unfused"], strict=True):
        assert e_fused < 0.04
        assert e_fused < e_unfused + 0.01


def test_other_norms_values_and_activations_take_the_composed_path():
    assert SASPBlock(32, 4, norm="rmsnorm")._fused_activation() is None
    assert SASPBlock(32, 4, norm="batchnorm")._fused_activation() is None
    assert SASPBlock(32, 4, trainable_value=True)._fused_activation() is None
    assert SASPBlock(32, 4, act=nn.Tanh())._fused_activation() is None
    assert SASPBlock(32, 4, fused_proj=False)._fused_activation() is None
    assert SASPBlock(32, 4, act="gelu")._fused_activation() == "gelu"
    with torch.no_grad():  # inference: nothing to save for a backward, so the composed ops
        assert SASPBlock(32, 4, act="gelu")._fused_activation() is None


def test_compiled_block_takes_the_composed_path_and_matches_eager(seed):
    block = randomize_(SASPBlock(32, 4, act="gelu", mlp_bias=True))
    x = torch.randn(2, 7, 32, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(x), block(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], rtol=1e-5, atol=1e-5)


def test_fused_backward_moves_fewer_bytes_and_writes_no_activation_cat(seed):
    """The point of the function: under autocast, no ``cat`` (of weights or of gradients) and less traffic."""
    traffic = {}
    for fused_input in (True, False):
        block = make_block("sasp", 64, 4, backend="sdpa", fused_input=fused_input)
        x = torch.randn(16, 64, 64, requires_grad=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(x)
            out.float().sum().backward()

        step()
        traffic[fused_input] = trace_traffic(step)
    # The fused function multiplies by each weight on its own: no cat at all. The composed path concatenates
    # the stacked weights per call and, in its backward, the (1,024 tokens × 384) gradient of the split product.
    weight_cat_bytes = 2 * 64 * (2 * 64 + 256) * 4
    assert not [o for o in traffic[True] if o.op == "cat"]
    assert any(o.bytes > 4 * weight_cat_bytes for o in traffic[False] if o.op == "cat")
    moved = {k: sum(o.bytes for o in ops if not o.flops) for k, ops in traffic.items()}
    assert moved[True] < 0.9 * moved[False]
