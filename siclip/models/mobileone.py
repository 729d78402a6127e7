"""MobileOne-style reparameterisable convolutions (Vasu et al., *MobileOne*, CVPR 2023) and helpers.

Train-time form: parallel branches (k×k conv+BN, optional 1×1 conv+BN "scale", optional BN identity)
summed, then optional squeeze-excite and activation. ``reparameterize()`` folds the branches into one
biased convolution ``reparam_conv`` with identical outputs (BatchNorm in eval mode).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .reparam import conv_args, fuse_conv_bn, identity_kernel, make_conv, pad_kernel

Size2 = int | tuple[int, int]


def _pair(size: Size2) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def conv_bn(in_ch: int, out_ch: int, kernel: Size2, stride: int, padding: Size2, groups: int) -> nn.Sequential:
    """Bias-free conv followed by BatchNorm, as ``Sequential(conv=…, bn=…)``."""
    from collections import OrderedDict

    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_ch)))


class SqueezeExcite(nn.Module):
    """x · σ(fc2(ReLU(fc1(mean_hw(x))))) (Hu et al. 2018) with 1×1 convolutions and biases."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class MobileOneBlock(nn.Module):
    """Branches ``rbr_conv`` (k×k conv+BN), ``rbr_scale`` (1×1 conv+BN, if k > 1), ``rbr_skip`` (BN, if shapes allow)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: Size2,
        stride: int = 1,
        padding: Size2 = 0,
        groups: int = 1,
        *,
        use_se: bool = False,
        se_reduced: int | None = None,
        use_act: bool = True,
        use_scale_branch: bool = True,
        use_conv_branch: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel)
        self.in_ch, self.groups = in_ch, groups
        self.se = SqueezeExcite(out_ch, se_reduced or out_ch // 16) if use_se else nn.Identity()
        self.act = nn.GELU() if use_act else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(in_ch, out_ch, kernel, stride, padding, groups)]) if use_conv_branch else None
        # Apple's code adds the scale branch only when the first kernel dimension exceeds 1 (so the
        # text encoder's 1×11 mixers have none); requiring both dimensions > 1 gives the same layouts.
        has_scale = use_scale_branch and min(self.kernel_size) > 1
        self.rbr_scale = conv_bn(in_ch, out_ch, 1, stride, 0, groups) if has_scale else None
        self._conv = dict(in_channels=in_ch, out_channels=out_ch, kernel_size=self.kernel_size, stride=stride,
                          padding=_pair(padding), dilation=1, groups=groups)  # fmt: skip
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_conv is not None:
            for branch in self.rbr_conv:
                out = out + branch(x)
        return self.act(self.se(out))

    def fused_kernel_bias(self) -> tuple[Tensor, Tensor]:
        like = next(self.parameters())
        shape = (self._conv["out_channels"], self.in_ch // self.groups, *self.kernel_size)
        kernel = torch.zeros(shape, dtype=like.dtype, device=like.device)
        bias = torch.zeros(kernel.shape[0], dtype=like.dtype, device=like.device)
        for branch in [*(self.rbr_conv or []), *([self.rbr_scale] if self.rbr_scale is not None else [])]:
            k, b = fuse_conv_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + pad_kernel(k, self.kernel_size), bias + b
        if self.rbr_skip is not None:
            k, b = fuse_conv_bn(identity_kernel(self.in_ch, self.groups, self.kernel_size, like), self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        self.reparam_conv = make_conv(self._conv, kernel, bias)
        self.rbr_skip = self.rbr_conv = self.rbr_scale = None


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet (Ding et al. 2022): large depthwise conv+BN plus a small conv+BN, then SE and GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, small_kernel: int, *, use_se: bool = False) -> None:
        super().__init__()
        self.kernel_size = (kernel, kernel)
        self.lkb_origin = conv_bn(in_ch, out_ch, kernel, stride, kernel // 2, in_ch)
        self.small_conv = conv_bn(in_ch, out_ch, small_kernel, stride, small_kernel // 2, in_ch)
        self.se = SqueezeExcite(out_ch, out_ch // 4) if use_se else nn.Identity()
        self.act = nn.GELU()
        self.lkb_reparam: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.lkb_reparam(x) if self.lkb_reparam is not None else self.lkb_origin(x) + self.small_conv(x)
        return self.act(self.se(out))

    def reparameterize(self) -> None:
        if self.lkb_reparam is not None:
            return
        k1, b1 = fuse_conv_bn(self.lkb_origin.conv.weight, self.lkb_origin.bn)
        k2, b2 = fuse_conv_bn(self.small_conv.conv.weight, self.small_conv.bn)
        self.lkb_reparam = make_conv(conv_args(self.lkb_origin.conv), k1 + pad_kernel(k2, self.kernel_size), b1 + b2)
        self.lkb_origin = self.small_conv = None
