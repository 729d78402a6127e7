"""Compute-matched training: a budget in training FLOPs sets the number of optimiser steps.

    F = FLOPs of one training step, measured      steps = max(1, round(B / (F · ranks)))      spent = steps · F · ranks

FLIP's unmasked tuning makes the last steps dearer: with ``F_m`` a masked and ``F_u`` an unmasked step and ``u(T)`` the
unmasked tail of a ``T``-step run, ``cost(T) = (T − u(T)) · F_m + u(T) · F_u`` and the steps are the ``T`` whose cost
comes nearest ``B`` (:func:`phased_budget_steps`; ``cost`` rises by ``F_m`` or ``F_u`` with each step, so a search finds it).

``F`` is what PyTorch's FLOP formulas count (:class:`siclip.blocks.flop_count.TotalFlops`, equal to ``FlopCounterMode``'s
total: 2 × multiply-adds of matrix products, convolutions and attention) over the forward and backward of the run's own :class:`TrainingTask` on
its own first batch: the student, the frozen teacher's forward, every loss term, and whatever else the task's forward
does (extra augmented views, token masking). Frozen prefixes count their forward only and checkpointed blocks their
recomputation, as they run. The optimiser's update is element-wise and not counted. On several ranks every rank runs
such a step, so a step costs ``F · ranks``.

Random token masking keeps an exact number of tokens per image, so its FLOPs do not depend on which tokens are drawn
and one measured step is exact; a strategy whose cost varies from batch to batch is averaged over
``TrainConfig.budget_measure_steps`` batches (the first batches of epoch 0), an estimate of the expected cost. The
measurement leaves the run untouched: random states, BatchNorm statistics and gradients are put back, and the loader
is not advanced (its batches are built from the dataset directly), so a run with a budget resumes bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from siclip.blocks.flop_count import TotalFlops
from siclip.data import collate_samples

from .state import rng_state, set_rng_state
from .step import forward_terms, to_device


def first_batches(loader, count: int) -> list[dict]:
    """The first ``count`` batches of epoch 0 as ``loader`` would hand them out on this rank, built from its dataset with
    its collate function without advancing it (skipped samples left out, as the loader leaves them out)."""
    order = loader.sampler.order(0)
    size = loader.batch_size
    collate = getattr(loader.loader, "collate_fn", None) or collate_samples
    batches = []
    for b in range(min(count, len(order) // size)):
        batch = collate([loader.dataset[(0, int(i))] for i in order[b * size : (b + 1) * size]])
        batch.pop("skipped", None)
        if batch["size"]:
            batches.append(batch)
    if not batches:
        raise ValueError("the budget's step cost is measured on the first batch, but it holds no usable sample")
    return batches


def measure_step_flops(task: nn.Module, batches: list[dict], *, device: torch.device, bf16: bool = False,
                       channels_last: bool = False) -> float:  # fmt: skip
    """Mean FLOPs of one training step (forward of ``task`` on a batch, backward of its total loss) over ``batches``;
    ``task``'s buffers, gradients and every random state are as they were before."""
    params = [p for p in task.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the task has no trainable parameter: a training step would cost nothing")
    buffers = list(task.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    saved_rng = rng_state()
    grads = [p.grad for p in params]
    was_training = task.training
    task.train()
    total = 0
    try:
        for batch in batches:
            batch = to_device(batch, device, channels_last=channels_last)
            with TotalFlops() as counter:
                terms = forward_terms(task, batch, bf16=bf16)
                terms["total"].backward()
            total += counter.get_total_flops()
            for p in params:
                p.grad = None
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
        for p, grad in zip(params, grads):
            p.grad = grad
        set_rng_state(saved_rng)
        task.train(was_training)
    return total / len(batches)


def budget_steps(budget_flops: float, flops_per_step: float) -> int:
    """Optimiser steps whose FLOPs come nearest the budget: ``max(1, round(B / F))``, ``F`` a step's FLOPs on all ranks."""
    if not (budget_flops > 0 and math.isfinite(budget_flops)):
        raise ValueError(f"budget_tflops must be a positive number, got {budget_flops / 1e12}")
    if flops_per_step <= 0:
        raise ValueError("a training step measured at 0 FLOPs: the budget cannot set a number of steps")
    return max(1, round(budget_flops / flops_per_step))


def phase_flops(steps: int, masked_steps: int, masked_flops: float, unmasked_flops: float) -> float:
    """FLOPs of a run's first ``steps`` steps when its first ``masked_steps`` are masked: ``min(steps, M) · F_m +
    max(0, steps − M) · F_u``."""
    masked = min(steps, masked_steps)
    return masked * masked_flops + (steps - masked) * unmasked_flops


def phased_budget_steps(budget_flops: float, masked_flops: float, unmasked_flops: float, masked_steps_of) -> int:
    """The step count ``T ≥ 1`` whose cost ``phase_flops(T, masked_steps_of(T), F_m, F_u)`` comes nearest the budget
    (on a tie the smaller).
    ``masked_steps_of(T)``: how many of ``T`` steps are masked (:func:`siclip.train.strategies.masked_steps`)."""
    budget_steps(budget_flops, min(masked_flops, unmasked_flops))  # the same checks of B and F

    def cost(steps: int) -> float:
        return phase_flops(steps, masked_steps_of(steps), masked_flops, unmasked_flops)

    low, high = 1, max(2, math.ceil(budget_flops / min(masked_flops, unmasked_flops)) + 1)  # cost(high) > B
    while high - low > 1:  # the largest T with cost(T) ≤ B (or 1)
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= budget_flops else (low, middle)
    return min((low, low + 1), key=lambda steps: (abs(cost(steps) - budget_flops), steps))
