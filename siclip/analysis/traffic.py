"""Memory traffic and a roofline estimate of eager execution, op by op, on any device.

Eager PyTorch runs one kernel per aten op, and most of a transformer block's ops besides the matrix
products are memory-bound. So an op-level model predicts eager time well from two figures (Williams et
al. 2009, *Roofline*):

    t ≈ Σ_ops max(FLOPs_op / P, bytes_op / B) + n_ops · t_launch

where P is the device's matrix rate and B its memory bandwidth. ``bytes_op`` counts every distinct input
element read once and every output element written once: a lower bound that fused kernels approach.
View ops and allocations (no data moved) are skipped; an ``out=`` destination, and the destination of a
write-only op (``copy_``, ``zero_``, ``fill_``), counts as written, not read. A broadcast (stride-0) input counts its distinct elements only.
FLOPs come from ``torch.utils.flop_counter``'s formulas, so matrix products, convolutions and
attention kernels carry them.

This is a model for choosing between designs before a GPU is at hand. It counts the kernels the
tracing device dispatches (the CPU's fused attention stands in for the GPU's). It is not a measurement:
quote it as a prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


@dataclass(frozen=True)
class OpTraffic:
    op: str
    bytes: int
    flops: int


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view covers (broadcast dimensions count once)."""
    elements = math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) if t.dim() else 1
    return elements * t.element_size()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# Ops that return an alias, only relabel a tensor's shape or allocate: no bytes move.
_NO_DATA = (torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten._unsafe_view, torch.ops.aten.empty)
# In-place ops that overwrite ``self`` without reading it.
_WRITE_ONLY = (torch.ops.aten.copy_, torch.ops.aten.zero_, torch.ops.aten.fill_)


def _read_arguments(func, args: tuple, kwargs: dict) -> list:
    """The arguments an op reads: all but its ``out=`` destinations (and a write-only op's ``self``)."""
    schema = func._schema.arguments
    written = {a.name for a in schema if a.is_out}
    if func.overloadpacket in _WRITE_ONLY:
        written.add(schema[0].name)
    positional = [v for a, v in zip(schema, args) if a.name not in written]
    return positional + [v for name, v in kwargs.items() if name not in written]


class TrafficCounter(TorchDispatchMode):
    """Records an :class:`OpTraffic` for every data-moving aten op run under it (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpTraffic] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in _NO_DATA:
            return out
        tensors = _tensors(_read_arguments(func, args, kwargs)) + _tensors(out)
        moved = sum(distinct_bytes(t) for t in tensors)
        flops = 0
        counter = flop_registry.get(func.overloadpacket)
        if counter is not None:
            flops = int(counter(*args, **kwargs, out_val=out))
        self.ops.append(OpTraffic(str(func.overloadpacket).removeprefix("aten."), moved, flops))
        return out


def trace_traffic(fn: Callable[[], object]) -> list[OpTraffic]:
    """The ops ``fn()`` dispatches, with the bytes each moves and the FLOPs each does."""
    with TrafficCounter() as counter:
        fn()
    return counter.ops


def extrapolate(small: list[OpTraffic], large: list[OpTraffic], factor: float) -> list[OpTraffic]:
    """Per op, ``small + factor·(large − small)``: traces at batches b₁ < b₂ predict batch b₁ + factor·(b₂ − b₁).

    Activation traffic is linear in the batch and weight traffic constant, so two small traces predict a
    large batch exactly, for a fraction of the compute. The two traces must dispatch the same ops.
    """
    if [o.op for o in small] != [o.op for o in large]:
        raise ValueError("the two traces dispatch different ops; extrapolate needs the same program at two batch sizes")
    return [
        OpTraffic(s.op, round(s.bytes + factor * (g.bytes - s.bytes)), round(s.flops + factor * (g.flops - s.flops)))
        for s, g in zip(small, large)
    ]


def roofline_ms(ops: list[OpTraffic], *, tflops: float, tbytes_per_s: float, launch_us: float = 4.0) -> float:
    """Predicted eager milliseconds: per op the slower of compute and memory, plus a launch cost per op."""
    per_op = (max(o.flops / (tflops * 1e12), o.bytes / (tbytes_per_s * 1e12)) for o in ops)
    return 1e3 * sum(per_op) + len(ops) * launch_us / 1e3
