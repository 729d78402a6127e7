"""Weight initialisation shared by the blocks (GPT-2 / SAS convention: N(0, 0.02²) weights, zero biases)."""

from __future__ import annotations

from torch import nn

INIT_STD = 0.02


def init_linears(module: nn.Module, std: float = INIT_STD) -> None:
    """N(0, std²) for every linear weight below ``module``, zeros for their biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
