"""Structural reparameterisation helpers (RepVGG, Ding et al. 2021; MobileOne and FastViT, Vasu et al. 2023).

A convolution followed by BatchNorm in eval mode is one convolution::

    BN(W∗x) = γ·(W∗x − μ)/√(σ² + ε) + β  =  (γ/√(σ² + ε))·W ∗ x + (β − γμ/√(σ² + ε))

and parallel linear branches add their kernels (smaller kernels zero-padded to the largest; an
identity branch is a kernel with a single 1 at the centre of its own channel).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def fuse_conv_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(kernel', bias')`` of the convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, kernel_size: tuple[int, int], like: Tensor) -> Tensor:
    """The ``(channels, channels/groups, kh, kw)`` kernel of the identity map for a grouped convolution."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *kernel_size, dtype=like.dtype, device=like.device)
    kernel[torch.arange(channels), torch.arange(channels) % per_group, kernel_size[0] // 2, kernel_size[1] // 2] = 1
    return kernel


def pad_kernel(kernel: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """Zero-pad a smaller centred kernel to ``kernel_size``."""
    dh, dw = kernel_size[0] - kernel.shape[2], kernel_size[1] - kernel.shape[3]
    return F.pad(kernel, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


def conv_args(conv: nn.Conv2d) -> dict:
    """The geometry of ``conv`` as ``nn.Conv2d`` keyword arguments."""
    names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    return {n: getattr(conv, n) for n in names}


def depthwise_conv_args(channels: int, kernel_size: tuple[int, int]) -> dict:
    """Geometry of a stride-1, same-padding depthwise convolution."""
    return dict(in_channels=channels, out_channels=channels, kernel_size=kernel_size, stride=1,
                padding=(kernel_size[0] // 2, kernel_size[1] // 2), dilation=1, groups=channels)  # fmt: skip


def make_conv(args: dict, kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    """A biased convolution of geometry ``args`` carrying ``kernel`` and ``bias``."""
    conv = nn.Conv2d(**args, bias=True).to(kernel.device, kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every reparameterisable module (anything with ``reparameterize()``) into inference form.

    The model must be in eval mode: fusion uses BatchNorm's running statistics.
    """
    model = model if inplace else copy.deepcopy(model)
    if model.training:
        raise RuntimeError("reparameterize in eval mode: fusion uses BatchNorm running statistics (call model.eval())")
    with torch.no_grad():
        for module in list(model.modules()):
            if hasattr(module, "reparameterize") and module is not model:
                module.reparameterize()
    return model
