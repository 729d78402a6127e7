"""Feature gathering across ranks, in one place (the pattern of open_clip's ``gather_features``).

``gather_with_grad=True`` uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the
gradients of every rank into each rank's own features. Otherwise the gathered copies carry no gradient
and each rank's own slice is put back so that its local gradient still flows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(*features: Tensor, gather_with_grad: bool = True) -> tuple[Tensor, ...]:
    """Each tensor concatenated over ranks along the batch (rank order); unchanged on one process."""
    rank, world = distributed_info()
    if world == 1:
        return features
    out = []
    for x in features:
        if gather_with_grad:
            from torch.distributed.nn.functional import all_gather

            parts = list(all_gather(x))
        else:
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.detach())
            parts[rank] = x
        out.append(torch.cat(parts, dim=0))
    return tuple(out)
