"""Image augmentation in torch, seeded per sample: random resized crop, flip, normalise.

Parameters are drawn from a ``numpy.random.Generator`` the dataset derives from (seed, epoch, index),
so a sample's view is the same whichever worker loads it and after a resume. The crop follows
torchvision's ``RandomResizedCrop`` sampling (area fraction and log-uniform aspect ratio, ten tries,
then a central fallback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AugmentConfig:
    """``flip_p`` defaults to 0: the embedded world's captions name left and right."""

    image_size: int = 64
    train: bool = True
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # False: return the uint8 crop and leave (x/255 − mean)/std to :func:`normalize_images` on the GPU,
    # which moves a quarter of the bytes between loader workers and to the device.
    normalize: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale (min, max) needs 0 < min <= max <= 1, got {tuple(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio (min, max) needs 0 < min <= max, got {tuple(self.ratio)}")


def normalize_images(images: Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """``(x/255 − mean)/std`` in float32 for uint8 images ``(…, 3, H, W)``, on their device, memory format kept."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_images expects uint8 images, got {images.dtype}")
    scale = torch.tensor([1 / (255 * s) for s in std], device=images.device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(3, 1, 1)
    return images.float().mul_(scale).add_(shift)


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` as torchvision's RandomResizedCrop draws them."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest central crop within the ratio bounds
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize of a ``(3, h, w)`` uint8 view in channels-last memory.

    Resizing uint8 before the float conversion takes PyTorch's vectorised uint8 kernel (about 3× the
    float path on a CPU); the result differs from the float path by at most one grey level.
    """
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def augment(image: np.ndarray, rng: np.random.Generator | None, config: AugmentConfig) -> Tensor:
    """A ``(3, size, size)`` float32 tensor (uint8 when ``config.normalize`` is False) from an ``(H, W, 3)`` uint8 image.

    Training: random resized crop and flip from ``rng``; evaluation (``config.train=False``): resize
    the short side and centre-crop, as CLIP's preprocessing does.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} and dtype {image.dtype}")
    pixels = torch.from_numpy(image)  # (H, W, 3): crops below are views
    height, width = image.shape[:2]
    size = config.image_size
    flip = False
    if config.train:
        if rng is None:
            raise ValueError("training augmentation needs a random generator")
        top, left, h, w = random_resized_crop_box(height, width, rng, config.scale, config.ratio)
        flip = rng.random() < config.flip_p
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    x = _resize(pixels[top : top + h, left : left + w].permute(2, 0, 1), size)
    if flip:
        x = x.flip(-1)
    # The uint8 result is channels-last; making it contiguous before the float conversion is 3× cheaper than after.
    x = x.contiguous()
    return normalize_images(x, config.mean, config.std) if config.normalize else x
