"""Augmentation beyond the crop: SimCLR's photometric distortions (with kornia) and EDA's caption edits.

Both draw every random choice from the sample's own ``numpy.random.Generator`` (seeded by seed, epoch and index in
:class:`~siclip.data.ImageTextDataset`), so a sample's augmentation is the same in any worker, in a fresh process and
after a resume. kornia applies the operations; nothing here touches torch's global RNG.

**Photometric** (:func:`colour_augment`, SimCLR's recipe as SLIP uses it; Chen et al. 2020, appendix A), on a
``(3, S, S)`` uint8 view ``x`` scaled to [0, 1], each step clamped to [0, 1], the result rounded back to uint8:

- with probability 0.8, colour jitter in a random order of four steps (torchvision's ``ColorJitter`` formulas, which
  kornia's ``ColorJitter`` follows): brightness ``x·b``, contrast ``c·x + (1 − c)·mean(gray(x))``, saturation
  ``s·x + (1 − s)·gray(x)``, hue rotated by ``h`` turns; ``b, c, s ~ U[1 − 0.4, 1 + 0.4]``, ``h ~ U[−0.1, 0.1]``;
- with probability 0.2, grayscale (ITU-R 601 luma in all three channels);
- with probability 0.5, a Gaussian blur of σ ~ U[0.1, 2.0] pixels *at 224 px*, scaled with the view's side S
  (σ·S/224: the same blur relative to the image as SimCLR's at ImageNet size; the tiny models see 32–64 px), kernel
  2⌈3σ⌉ + 1 with reflected borders.

**Captions** (:func:`eda`, Wei & Zou 2019's random deletion and random swap at rate α): one of the two edits, chosen
with equal probability, per caption — deletion drops each word with probability α (keeping one word if it would drop
all), swap exchanges two random words ``max(1, round(α·n))`` times.

**Flips and captions**: a caption that names a side (``left``, ``right``, ``leftmost`` …) describes the unflipped
image; :func:`names_a_side` tells the dataset not to flip such a sample (the embedded world's captions carry
positions, ``siclip.data.captions``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SIDE_WORDS = re.compile(r"\b(left|right)", re.IGNORECASE)


def names_a_side(*captions: str | None) -> bool:
    """Whether any caption names left or right (word starts: ``left``, ``rightmost``, ``left-hand``; not ``bright``)."""
    return any(caption and SIDE_WORDS.search(caption) for caption in captions)


@dataclass(frozen=True)
class ColourConfig:
    """SimCLR's photometric augmentation (see the module docstring); probabilities and ranges as SimCLR and SLIP."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at blur_reference_size
    blur_reference_size: int = 224

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("colour jitter strengths must not be negative, and hue must be in [0, 0.5]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma (min, max) needs 0 < min <= max, got {tuple(self.blur_sigma)}")


def kornia_library():
    """kornia, or an ImportError naming the package to install (it is the ``augment`` extra, installed by ``make setup``)."""
    from siclip.errors import require

    return require("kornia", "kornia", "the 'strong' augmentation and SLIP's views")


def colour_augment(view: Tensor, rng: np.random.Generator, config: ColourConfig) -> Tensor:
    """SimCLR's colour jitter, grayscale and blur of a ``(3, S, S)`` uint8 view, drawn from ``rng``; uint8 out."""
    kornia = kornia_library()
    enhance = kornia.enhance
    x = view.float().div_(255.0)[None]
    if rng.random() < config.jitter_p:

        def factor(strength: float) -> float:
            return float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))

        steps = (
            lambda t, f: enhance.adjust_brightness_accumulative(t, f),
            lambda t, f: _contrast(kornia, t, f),
            lambda t, f: enhance.adjust_saturation_with_gray_subtraction(t, f),
            lambda t, f: enhance.adjust_hue(t, f * 2 * math.pi).clamp(0.0, 1.0),  # hue in turns, kornia's in radians
        )  # fmt: skip
        factors = (factor(config.brightness), factor(config.contrast), factor(config.saturation),
                   float(rng.uniform(-config.hue, config.hue)))  # fmt: skip
        for step in rng.permutation(4):
            x = steps[step](x, factors[step])
    if rng.random() < config.grayscale_p:
        x = kornia.color.rgb_to_grayscale(x).expand(-1, 3, -1, -1)
    if rng.random() < config.blur_p:
        sigma = float(rng.uniform(*config.blur_sigma)) * x.shape[-1] / config.blur_reference_size
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((x.shape[-1] - 1) // 2) + 1)  # reflect padding needs it < S
        x = kornia.filters.gaussian_blur2d(x, (kernel, kernel), (sigma, sigma), border_type="reflect")
    return (x[0] * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _contrast(kornia, x: Tensor, factor: float) -> Tensor:
    """``c·x + (1 − c)·mean(gray(x))`` clamped to [0, 1] (kornia's ``adjust_contrast_with_mean_subtraction``), with the
    mean taken by numpy in float64: torch's parallel sum depends on the thread count, and the view must not."""
    mean = float(np.mean(kornia.color.rgb_to_grayscale(x).numpy(), dtype=np.float64))
    return (x * factor + mean * (1.0 - factor)).clamp_(0.0, 1.0)


def eda(caption: str, rng: np.random.Generator, rate: float) -> str:
    """EDA's random deletion or random swap of ``caption``'s words at rate α = ``rate`` (see the module docstring)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the text augmentation rate must be in [0, 1], got {rate}")
    words = caption.split()
    if rate == 0.0 or len(words) < 2:
        return caption
    if rng.random() < 0.5:
        kept = [word for word in words if rng.random() >= rate]
        return " ".join(kept or [words[int(rng.integers(len(words)))]])
    for _ in range(max(1, round(rate * len(words)))):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)
