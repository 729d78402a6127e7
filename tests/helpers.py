"""Small helpers shared by the tests."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def padding_mask(batch: int, tokens: int, generator=None) -> torch.Tensor:
    """A random right-padding mask (True = padded) that keeps at least one token per sequence."""
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens - 2  # at least one row really padded
    return torch.arange(tokens)[None, :] >= lengths[:, None]


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Move every floating parameter away from its (often trivial) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module
