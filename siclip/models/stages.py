"""Running an encoder as a chain of stages, storing only the activations a backward pass will use.

Two savings, both exact (gradients are unchanged):

- a **frozen prefix** (stages with no trainable parameter, fed by an input that needs no gradient) runs
  under ``no_grad``: the backward pass never reaches it, so it keeps no autograd graph and no
  activations. With weight inheritance (SiCLIP trains only its SAS-P blocks) this covers the whole image
  encoder and the text encoder's embedding and first RepMixer.
- **activation checkpointing** (Chen et al. 2016, *Training Deep Nets with Sublinear Memory Cost*) of
  every later stage: a stage keeps only its input and recomputes its activations during backward, one
  extra forward of the checkpointed stages for memory that no longer grows with depth.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def has_trainable(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` requires a gradient."""
    return any(p.requires_grad for p in module.parameters())


def train_only(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Make trainable exactly the parameters whose names start with one of ``prefixes``; freeze the rest."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def run_stages(
    stages: Iterable[nn.Module], x: Tensor, *, checkpointing: bool = False, stage_kwargs: Sequence[dict] | None = None
) -> Tensor:
    """``x`` through ``stages`` in order, with the frozen prefix untracked and later stages optionally checkpointed.

    ``stage_kwargs[i]`` are keyword arguments for stage ``i`` (e.g. a key-padding mask), passed through
    checkpointing too.

    A stage is tracked from the first one that has a trainable parameter or receives an input that
    requires a gradient; every stage after it is tracked too (a gradient has to flow back through it).
    Checkpointing is non-reentrant (``use_reentrant=False``), so it composes with stages that share
    weights and with inputs that need no gradient. Under checkpointing a BatchNorm in training mode
    sees each batch twice (forward and recompute) and updates its running statistics twice.
    """
    tracking = False
    grad = torch.is_grad_enabled()
    stages = list(stages)
    if stage_kwargs is not None and len(stage_kwargs) != len(stages):
        raise ValueError(f"stage_kwargs has {len(stage_kwargs)} entries for {len(stages)} stages")
    for stage, kwargs in zip(stages, stage_kwargs or [{}] * len(stages)):
        tracking = tracking or (grad and (x.requires_grad or has_trainable(stage)))
        if not tracking:
            with torch.no_grad():
                x = stage(x, **kwargs)
        elif checkpointing:
            x = checkpoint(stage, x, use_reentrant=False, **kwargs)
        else:
            x = stage(x, **kwargs)
    return x


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm whose parameters are all frozen in eval mode (running statistics, no updates).

    A frozen, inherited module must compute what the teacher computed: in training mode its BatchNorm
    layers would normalise by batch statistics and overwrite the inherited running averages.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not has_trainable(module):
            module.eval()
