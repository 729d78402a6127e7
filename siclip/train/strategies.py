"""The training strategies of *Scaling (Down) CLIP* (Li, Xie, Cubuk 2024) as settings of one run, checked together.

| strategy | setting | what a step computes |
|---|---|---|
| CLIP | (defaults) | the image tower on one view, the text tower, the CLIP loss |
| SLIP | ``objective.ssl_scale`` (1.0) | + the image tower on two more views, SLIP's head, NT-Xent (:mod:`siclip.distill.ssl`) |
| FLIP | ``mask_ratio`` (0.5, 0.75), ``unmasked_steps`` / ``unmasked_fraction`` | the image tower's blocks on the kept tokens (:mod:`siclip.blocks.token_dropout`) |
| CLIP+Data Augmentation | ``data.augment`` ("mild", "strong"), ``data.text_augment`` (α) | the loader's views and captions (:mod:`siclip.data.augment`) |

Each combines with the others and with WI, WIKD and PM (a SiCLIP student and its teacher).
"""

from __future__ import annotations

import math

from siclip.data import AUGMENT_POLICIES

from .config import TrainConfig


def check_strategies(config: TrainConfig) -> None:
    """Raise a ValueError naming the first strategy setting of ``config`` that is out of range or contradicts another."""
    data = config.data
    if data.augment not in AUGMENT_POLICIES:
        raise ValueError(f"data.augment must be one of {AUGMENT_POLICIES}, got {data.augment!r}")
    if not 0.0 <= data.text_augment <= 1.0:
        raise ValueError(f"data.text_augment (EDA's rate) must be in [0, 1], got {data.text_augment}")
    if not 0.0 <= config.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {config.mask_ratio}")
    if config.unmasked_steps < 0 or not 0.0 <= config.unmasked_fraction < 1.0:
        raise ValueError(f"unmasked_steps must be ≥ 0 and unmasked_fraction in [0, 1), got {config.unmasked_steps} and {config.unmasked_fraction}")
    if config.unmasked_steps and config.unmasked_fraction:
        raise ValueError("give the unmasked tuning phase as unmasked_steps or as unmasked_fraction, not both")
    if (config.unmasked_steps or config.unmasked_fraction) and config.mask_ratio == 0:
        raise ValueError("an unmasked tuning phase (unmasked_steps / unmasked_fraction) follows masked training: set mask_ratio too")


def masked_steps(config: TrainConfig, total_steps: int) -> int:
    """How many of a run's ``total_steps`` train with masking: all but the last ``unmasked_steps`` (or the last
    ``⌈unmasked_fraction · total⌉``) steps, FLIP's unmasked tuning; 0 without masking."""
    if config.mask_ratio == 0:
        return 0
    unmasked = config.unmasked_steps or math.ceil(config.unmasked_fraction * total_steps)
    return max(0, total_steps - unmasked)
