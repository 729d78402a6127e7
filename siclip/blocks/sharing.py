"""Weight sharing between adjacent blocks of a stack (SiCLIP, after Xiao et al. 2019).

A :class:`SharingPlan` partitions a stack of ``n`` blocks into runs of *adjacent* blocks; every run
uses one set of weights, by module reuse, so gradients from every position accumulate in the shared
parameters. Plans come from fixed strategies (none, all, adjacent pairs) or from measured
divergences between blocks (a threshold on adjacent divergences, or the optimal partition into at
most K groups). Divergences are given either as the ``n−1`` adjacent values ``d[i] = D(i, i+1)`` or as
a full symmetric ``n×n`` matrix; a group's cost is the sum of its adjacent divergences (vector) or of
all its pairwise divergences (matrix).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

STRATEGIES = ("none", "all", "adjacent", "threshold", "optimal")
SCOPES = ("block", "attention")


@dataclass(frozen=True)
class SharingPlan:
    """A partition of blocks ``0..n-1`` into runs of adjacent blocks, e.g. ``((0, 1), (2, 3))``."""

    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        groups = tuple(tuple(int(i) for i in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        flat = [i for g in groups for i in g]
        if not groups or any(not g for g in groups) or flat != list(range(len(flat))):
            raise ValueError(
                f"a sharing plan must split blocks 0..n-1 into non-empty runs of adjacent blocks, in order; got {groups}"
            )

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> SharingPlan:
        """``from_sizes([2, 2])`` is ``((0, 1), (2, 3))``."""
        bounds = np.cumsum([0, *sizes])
        return cls(tuple(tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])))

    @property
    def num_blocks(self) -> int:
        return self.groups[-1][-1] + 1

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def owner(self, index: int) -> int:
        """The block whose weights block ``index`` uses (the first of its group)."""
        for g in self.groups:
            if index in g:
                return g[0]
        raise IndexError(f"block {index} is not in a plan of {self.num_blocks} blocks")

    def __str__(self) -> str:
        return " ".join("[" + ",".join(map(str, g)) + "]" for g in self.groups)


def plan_none(num_blocks: int) -> SharingPlan:
    return SharingPlan.from_sizes([1] * num_blocks)


def plan_all(num_blocks: int) -> SharingPlan:
    return SharingPlan.from_sizes([num_blocks])


def plan_adjacent_pairs(num_blocks: int) -> SharingPlan:
    """(0,1), (2,3), …; an odd last block stays alone. SiCLIP's reading for the four MCt layers."""
    return SharingPlan.from_sizes([2] * (num_blocks // 2) + [1] * (num_blocks % 2))


def _as_divergence(divergence, num_blocks: int | None = None) -> tuple[np.ndarray, int]:
    """Validate divergences; returns the array and the number of blocks it describes."""
    d = np.asarray(divergence.detach().cpu() if isinstance(divergence, torch.Tensor) else divergence, dtype=float)
    if d.ndim == 1:
        n = d.shape[0] + 1
    elif d.ndim == 2 and d.shape[0] == d.shape[1]:
        n = d.shape[0]
        if not np.allclose(d, d.T, equal_nan=False):
            raise ValueError("a divergence matrix must be symmetric (use the Jensen–Shannon divergence)")
    else:
        raise ValueError(f"divergences must be a vector of n−1 adjacent values or an n×n matrix, got shape {d.shape}")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("divergences must be finite and non-negative")
    if num_blocks is not None and n != num_blocks:
        raise ValueError(f"divergences describe {n} blocks but the stack has {num_blocks}")
    return d, n


def adjacent_divergences(divergence) -> np.ndarray:
    """The ``n−1`` values D(i, i+1) from either accepted form."""
    d, _ = _as_divergence(divergence)
    return d if d.ndim == 1 else np.diagonal(d, offset=1).copy()


def group_cost(divergence, start: int, stop: int) -> float:
    """Summed within-group divergence of blocks ``start..stop-1``."""
    d, _ = _as_divergence(divergence)
    if d.ndim == 1:
        return float(d[start : stop - 1].sum())
    return float(np.triu(d[start:stop, start:stop], k=1).sum())


def plan_cost(divergence, plan: SharingPlan) -> float:
    return sum(group_cost(divergence, g[0], g[-1] + 1) for g in plan.groups)


def plan_threshold(divergence, threshold: float, max_group_size: int | None = None) -> SharingPlan:
    """Join block i+1 to block i's group while D(i, i+1) ≤ ``threshold`` (and the group has room)."""
    adjacent = adjacent_divergences(divergence)
    if max_group_size is not None and max_group_size < 1:
        raise ValueError(f"max_group_size must be at least 1, got {max_group_size}")
    sizes = [1]
    for value in adjacent:
        if value <= threshold and (max_group_size is None or sizes[-1] < max_group_size):
            sizes[-1] += 1
        else:
            sizes.append(1)
    return SharingPlan.from_sizes(sizes)


def plan_optimal(divergence, max_groups: int) -> SharingPlan:
    """The partition into at most ``max_groups`` runs with the least summed within-group divergence.

    Dynamic programming over prefixes, O(K·n²) group costs: ``best[k][j]`` is the cheapest split of
    the first ``j`` blocks into ``k`` runs. Costs are non-negative, so more groups never cost more and
    the answer uses ``min(max_groups, n)`` groups; ties go to the earliest split.
    """
    d, n = _as_divergence(divergence)
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    groups = min(max_groups, n)
    cost = [[group_cost(d, i, j) if j > i else np.inf for j in range(n + 1)] for i in range(n + 1)]
    best = np.full((groups + 1, n + 1), np.inf)
    split = np.zeros((groups + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, groups + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                candidate = best[k - 1][i] + cost[i][j]
                if candidate < best[k][j]:
                    best[k][j], split[k][j] = candidate, i
    k = int(np.argmin(best[:, n]))
    sizes, j = [], n
    while k > 0:
        i = split[k][j]
        sizes.append(j - i)
        j, k = i, k - 1
    return SharingPlan.from_sizes(sizes[::-1])


def plan_brute_force(divergence, max_groups: int) -> tuple[SharingPlan, float]:
    """Exhaustive search over all 2^(n−1) partitions into runs (small n only): the check for :func:`plan_optimal`."""
    d, n = _as_divergence(divergence)
    best: tuple[SharingPlan, float] | None = None
    for cuts in itertools.product((False, True), repeat=n - 1):
        if sum(cuts) + 1 > max_groups:
            continue
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        plan = SharingPlan.from_sizes([*sizes, size])
        c = plan_cost(d, plan)
        if best is None or c < best[1]:
            best = (plan, c)
    assert best is not None
    return best


def plan_sharing(
    strategy: str,
    num_blocks: int,
    divergence=None,
    *,
    threshold: float | None = None,
    max_groups: int | None = None,
    max_group_size: int | None = None,
) -> SharingPlan:
    """A plan by strategy name: ``none``, ``all``, ``adjacent``, ``threshold`` or ``optimal``."""
    if strategy == "none":
        return plan_none(num_blocks)
    if strategy == "all":
        return plan_all(num_blocks)
    if strategy == "adjacent":
        return plan_adjacent_pairs(num_blocks)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharing strategy {strategy!r}; choose one of {STRATEGIES}")
    if divergence is None:
        raise ValueError(f"strategy {strategy!r} needs measured divergences between the blocks")
    _as_divergence(divergence, num_blocks)
    if strategy == "threshold":
        if threshold is None:
            raise ValueError("strategy 'threshold' needs threshold=")
        return plan_threshold(divergence, threshold, max_group_size)
    if max_groups is None:
        raise ValueError("strategy 'optimal' needs max_groups=")
    return plan_optimal(divergence, max_groups)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each, however many modules share them."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class SharingReport:
    plan: SharingPlan
    scope: str
    params_before: int
    params_after: int

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    def __str__(self) -> str:
        share = self.params_saved / self.params_before if self.params_before else 0.0
        return (
            f"sharing {self.scope}s as {self.plan}: {self.params_before:,} -> {self.params_after:,} parameters "
            f"(-{self.params_saved:,}, -{share:.1%})"
        )


def _check_same_layout(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if type(a) is not type(b) or {k: v.shape for k, v in sa.items()} != {k: v.shape for k, v in sb.items()}:
        raise ValueError(f"cannot share {what}: {type(a).__name__} and {type(b).__name__} differ in layout")


@torch.no_grad()
def apply_sharing(
    blocks: nn.ModuleList | nn.Sequential,
    plan: SharingPlan,
    *,
    scope: str = "block",
    attention_attr: str = "attn",
    merge: str = "first",
) -> SharingReport:
    """Tie the weights of each group of ``plan`` in place, by module reuse.

    Args:
        blocks: the stack; its entries are replaced (``scope="block"``) or their ``attention_attr``
            submodule is (``scope="attention"``, sharing only W_Q, W_K and the shaped gains of SAS-P).
        merge: which weights the group keeps: those of its first block (``"first"``), or the mean of
            the group's floating-point weights (``"mean"``), a neutral start for pretrained blocks.
            Sharing whole blocks that hold BatchNorm also shares its running statistics.
    """
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"blocks must be an nn.ModuleList or nn.Sequential, got {type(blocks).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"unknown sharing scope {scope!r}; choose one of {SCOPES}")
    if merge not in ("first", "mean"):
        raise ValueError(f"merge must be 'first' or 'mean', got {merge!r}")
    if plan.num_blocks != len(blocks):
        raise ValueError(f"the plan covers {plan.num_blocks} blocks but the stack has {len(blocks)}")

    def attention_path(block: nn.Module) -> str:
        # A block converted inside a foreign model keeps its SAS-P block under ``sasp`` (siclip.interop).
        return f"sasp.{attention_attr}" if not hasattr(block, attention_attr) and hasattr(block, "sasp") else attention_attr

    def part(i: int) -> nn.Module:
        if scope == "block":
            return blocks[i]
        try:
            return blocks[i].get_submodule(attention_path(blocks[i]))
        except AttributeError:
            raise AttributeError(f"block {i} ({type(blocks[i]).__name__}) has no attention submodule {attention_attr!r}") from None

    before = count_parameters(blocks)
    for group in plan.groups:
        owner = part(group[0])
        members = [part(i) for i in group]
        for i, member in zip(group[1:], members[1:]):
            _check_same_layout(owner, member, f"block {group[0]} with block {i}")
        if merge == "mean" and len(group) > 1:
            states = [m.state_dict() for m in members]
            for key, value in owner.state_dict().items():
                if value.is_floating_point():
                    value.copy_(torch.stack([s[key] for s in states]).mean(0))
        for i in group[1:]:
            if scope == "block":
                blocks[i] = owner
            else:
                parent, _, name = attention_path(blocks[i]).rpartition(".")
                setattr(blocks[i].get_submodule(parent) if parent else blocks[i], name, owner)
    return SharingReport(plan, scope, before, count_parameters(blocks))
