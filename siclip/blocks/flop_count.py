"""Counting the FLOPs of what siclip's blocks run, with PyTorch's formulas, taught the CPU attention kernel.

    with flop_counter() as counter:
        loss = model(x).sum(); loss.backward()
    counter.get_total_flops()    # 2 × multiply-adds of matrix products, convolutions and attention, forward and backward

- :func:`flop_counter`: PyTorch's ``FlopCounterMode`` (per-module breakdown, ``get_flop_counts()``).
- :class:`TotalFlops`: the same formulas and total without the per-module bookkeeping. ``FlopCounterMode`` tracks the
  module hierarchy with hooks on every module call and runs every operator it has no formula for through its Python
  decomposition; on a model of many small modules (MCi) that costs several times the step itself. A compute budget and
  the tests that count whole training runs use this one (tested equal to ``FlopCounterMode`` on every tower family).

PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel ``scaled_dot_product_attention`` takes
on a CPU; :data:`CPU_ATTENTION_FLOPS` counts it the way PyTorch counts the others (QKᵀ and the weighted sum of V, and
their backward). Element-wise work (norms, activations, the optimiser's update) is not counted.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no display) that counts the CPU attention kernel too."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


class TotalFlops(TorchDispatchMode):
    """``with TotalFlops() as counter: …; counter.get_total_flops()``: FLOPs (2 × multiply-adds) of every operator with
    a formula in PyTorch's ``flop_registry`` or :data:`CPU_ATTENTION_FLOPS`, run inside the block, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        self.formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in CPU_ATTENTION_FLOPS.items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out

    def get_total_flops(self) -> int:
        return self.total
