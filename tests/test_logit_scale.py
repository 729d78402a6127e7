"""The CLIP temperature: unclamped in forward, its parameter bounded in place after each optimiser step."""

import math

import torch
from torch.nn import functional as F

from siclip.losses import ClipLoss, SigLipLoss
from siclip.models import create_model
from siclip.train.step import backward_and_step, create_optimizer, logit_scale_parameters


def test_scale_at_the_bound_keeps_its_gradient_and_is_clamped_after_the_step(seed):
    model = create_model("mobileclip_tiny")
    model.requires_grad_(False).logit_scale.requires_grad_(True)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    assert abs(model.scale().item() - 100.0) < 1e-4
    # At the bound the CLIP loss still reaches the scale (a clamp inside forward would give exactly 0 here).
    v, t = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    (grad,) = torch.autograd.grad(ClipLoss()(v, t, model.scale()), model.logit_scale)
    scale = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    (reference,) = torch.autograd.grad(ClipLoss()(v.double(), t.double(), scale), scale)
    assert grad.abs() > 0
    torch.testing.assert_close(grad.double(), 100.0 * reference, rtol=1e-4, atol=1e-7)  # d/ds = exp(s)·d/d exp(s)
    # A loss that pushes the scale up: the step moves it above ln 100, the optimiser's hook clamps it back.
    optimizer = create_optimizer(model, lr=0.1, weight_decay=0.0)
    backward_and_step(-model.scale(), optimizer, model.parameters(), grad_clip=None)
    assert model.logit_scale.item() == torch.tensor(math.log(100.0)).item()
    # and one that pushes it down (a fresh optimiser: no momentum upwards) moves it freely below the bound.
    backward_and_step(model.scale(), create_optimizer(model, lr=0.1, weight_decay=0.0), model.parameters(), grad_clip=None)
    assert 4.0 < model.logit_scale.item() < math.log(100.0) - 0.05


def test_logit_scale_parameters_and_siglip_unclamped(seed):
    model = create_model("mobileclip_tiny")
    siglip = SigLipLoss(init_scale=200.0)
    holder = torch.nn.ModuleDict({"model": model, "loss": siglip})
    assert [id(p) for p in logit_scale_parameters(holder)] == [id(model.logit_scale), id(siglip.logit_scale)]
    v, t = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    logits = 200.0 * v @ t.T + siglip.logit_bias
    signs = 2 * torch.eye(4) - 1
    torch.testing.assert_close(siglip(v, t), -F.logsigmoid(signs * logits).sum() / 4)  # 200, not 100
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    create_optimizer(holder, lr=0.0, weight_decay=0.0).step()
    assert model.logit_scale.item() == 0.0 and siglip.logit_scale.item() == torch.tensor(math.log(100.0)).item()
