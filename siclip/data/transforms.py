"""A model's own preprocessing, and image augmentation in torch, seeded per sample.

:class:`Preprocess` is what a model expects of its pixels (open_clip's ``preprocess_cfg``, timm's
``pretrained_cfg``): the evaluation view resizes (PIL, the model's interpolation) and centre-crops, then
``x ↦ (x/255 − mean)/std``. It travels with the model (``ModelConfig.preprocess``) and its checkpoints.

Training views: random resized crop and flip, with parameters drawn from a ``numpy.random.Generator`` the dataset
derives from (seed, epoch, index), so a sample's view is the same whichever worker loads it and after a resume. The
crop follows torchvision's ``RandomResizedCrop`` sampling (area fraction and log-uniform aspect ratio, ten tries,
then a central fallback). :func:`augment_policy` names four recipes: ``none`` (the evaluation view), ``clip`` (the
crop, today's default), ``mild`` (a crop that keeps most of the scene, flips, brightness and contrast, blur: what a
caption names survives) and ``strong`` (SimCLR's: a wide crop, flips, colour jitter, grayscale and blur,
:mod:`siclip.data.augment`). The loader hands over uint8 crops; each model normalises them with its own mean and std
(:func:`normalize_images`), so a teacher and a student that differ there see the same crop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from .augment import ColourConfig, colour_augment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash")
# Where a centre crop of S from H starts, by library: torchvision's CenterCrop (open_clip's and Apple's pipelines)
# round((H − S) / 2); transformers' image processors (H − S) // 2. They differ by one pixel when H − S is odd.
CROP_ROUNDINGS = {"round": lambda extra: int(round(extra / 2.0)), "floor": lambda extra: extra // 2}
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """A model's pixels: resize, centre crop to ``size``, then ``(x/255 − mean)/std`` per channel.

    ``resize_mode="shortest"`` scales the short side to ``resize`` (CLIP's and Apple's MobileCLIP pipelines:
    torchvision ``Resize(resize)`` on a PIL image, then ``CenterCrop(size)``); ``"squash"`` scales both sides to
    ``resize`` (SigLIP's processor). ``resize`` None means ``size``. ``size`` None is a model configuration's
    form: the model's input size fills it in (:meth:`at`). MobileCLIP's pixels are in [0, 1]: mean 0, std 1.

    ``crop_rounding``: where the centre crop starts, as the model's own library computes it (:data:`CROP_ROUNDINGS`):
    ``"round"``, torchvision's ``round((H − S) / 2)`` (open_clip, Apple's MobileCLIP, siclip's own models, and every
    record saved before the field existed), or ``"floor"``, transformers' ``(H − S) // 2`` (``hf:`` models).
    """

    size: int | None = None
    resize: int | None = None
    resize_mode: str = "shortest"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_rounding: str = "round"

    def __post_init__(self) -> None:
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding must be one of {sorted(CROP_ROUNDINGS)}, got {self.crop_rounding!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need three channels and std > 0, got mean {self.mean}, std {self.std}")
        for name in ("size", "resize"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.size is None and self.resize is not None:
            raise ValueError("a Preprocess without a size (a model configuration's) resizes to the model's size: leave resize None")

    def at(self, size: int) -> Preprocess:
        """This preprocessing for a model whose input is ``size`` pixels square (``resize`` scales along)."""
        if self.size == size:
            return self
        resize = None if self.resize is None else round(self.resize * size / self.size)
        return replace(self, size=size, resize=resize)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocess field(s) {unknown}; fields: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def preprocess_image(image: np.ndarray, preprocess: Preprocess, *, normalize: bool = True) -> Tensor:
    """The evaluation view ``(3, size, size)`` of an ``(H, W, 3)`` uint8 image: float32 normalised, or uint8.

    Resizing runs in PIL, as torchvision does for PIL images (the pipelines models are released with), with
    torchvision's sizes: the short side becomes ``resize`` and the long one ``int(resize · long / short)``; the
    crop starts at ``round((H − size) / 2)`` (torchvision) or ``(H − size) // 2`` (transformers), as
    ``preprocess.crop_rounding`` says.
    """
    if preprocess.size is None:
        raise ValueError("this Preprocess has no size: take the model's, preprocess.at(image_size)")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} and dtype {image.dtype}")
    height, width = image.shape[:2]
    size, resize = preprocess.size, preprocess.resize or preprocess.size
    if preprocess.resize_mode == "squash":
        target = (resize, resize)
    elif height <= width:
        target = (resize, int(resize * width / height))
    else:
        target = (int(resize * height / width), resize)
    pil = Image.fromarray(image)
    if target != (height, width):
        pil = pil.resize((target[1], target[0]), INTERPOLATIONS[preprocess.interpolation])
    pixels = np.asarray(pil)
    if size > min(target):  # torchvision pads a crop larger than the image; a model's view never needs it
        raise ValueError(f"crop {size} is larger than the resized image {target}: set resize ≥ size")
    offset = CROP_ROUNDINGS[preprocess.crop_rounding]
    top, left = offset(target[0] - size), offset(target[1] - size)
    crop = torch.from_numpy(pixels[top : top + size, left : left + size].copy()).permute(2, 0, 1).contiguous()  # PIL's array is read-only
    return normalize_images(crop, preprocess.mean, preprocess.std) if normalize else crop


@dataclass(frozen=True)
class AugmentConfig:
    """``flip_p`` defaults to 0: the embedded world's captions name left and right (with it on, the dataset still
    never flips a sample whose captions name a side). ``colour``: SimCLR's photometric steps after the crop, or None."""

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
    colour: ColourConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale (min, max) needs 0 < min <= max <= 1, got {tuple(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio (min, max) needs 0 < min <= max, got {tuple(self.ratio)}")


def normalize_images(images: Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """``(x/255 − mean)/std`` in float32 for uint8 images ``(…, 3, H, W)``, on their device, memory format kept."""
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_images expects uint8 images, got {images.dtype}")
    return _scale_shift_(images.float(), mean, std)


def _scale_shift_(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``x·(1/(255·std)) + (−mean/std)`` in place on float pixel values in [0, 255]."""
    scale = torch.tensor([1 / (255 * s) for s in std], device=pixels.device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=pixels.device).view(3, 1, 1)
    return pixels.mul_(scale).add_(shift)


def model_pixels(images: Tensor, preprocess: Preprocess) -> Tensor:
    """What a model takes from a batch of uint8 crops ``(B, 3, H, W)``: resized to its input size when that differs
    (bilinear, antialiased: a teacher whose size is not the student's sees the same crop), then normalised with its
    own mean and std (:func:`normalize_images`, the operations the loader workers used to run)."""
    if preprocess.size is not None and tuple(images.shape[-2:]) != (preprocess.size, preprocess.size):
        resized = F.interpolate(images.float(), size=(preprocess.size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return _scale_shift_(resized, preprocess.mean, preprocess.std)
    return normalize_images(images, preprocess.mean, preprocess.std)


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


def augment(image: np.ndarray, rng: np.random.Generator | None, config: AugmentConfig, *, may_flip: bool = True) -> Tensor:
    """A ``(3, size, size)`` float32 tensor (uint8 when ``config.normalize`` is False) from an ``(H, W, 3)`` uint8 image.

    Training: random resized crop, flip (never when ``may_flip`` is False: a caption names a side) and the photometric
    steps of ``config.colour``, all from ``rng``; evaluation (``config.train=False``): resize the short side and
    centre-crop, as CLIP's preprocessing does.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} and dtype {image.dtype}")
    pixels = torch.from_numpy(image if image.flags.writeable else image.copy())  # (H, W, 3): crops below are views
    height, width = image.shape[:2]
    size = config.image_size
    flip = False
    if config.train:
        if rng is None:
            raise ValueError("training augmentation needs a random generator")
        top, left, h, w = random_resized_crop_box(height, width, rng, config.scale, config.ratio)
        flip = rng.random() < config.flip_p and may_flip
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    x = _resize(pixels[top : top + h, left : left + w].permute(2, 0, 1), size)
    if flip:
        x = x.flip(-1)
    # The uint8 result is channels-last; making it contiguous before the float conversion is 3× cheaper than after.
    x = x.contiguous()
    if config.train and config.colour is not None:
        x = colour_augment(x, rng, config.colour)
    return normalize_images(x, config.mean, config.std) if config.normalize else x


AUGMENT_POLICIES = ("none", "clip", "mild", "strong")
STRONG_CROP_SCALE = (0.08, 1.0)  # SimCLR's and SLIP's "wide" random resized crop
# mild: a crop of at least 35 % of the area still holds most objects of a scene, and brightness / contrast / blur leave
# every pixel's hue alone; the embedded world's captions name colours and shapes, which SimCLR's hue jitter, grayscale
# and 8 % crops remove (CLIP+DA with ``strong`` collapsed to chance there at 4 TFLOPs, experiments/RESULTS.md)
MILD_CROP_SCALE = (0.35, 1.0)
MILD_COLOUR = ColourConfig(saturation=0.0, hue=0.0, grayscale_p=0.0)


def augment_policy(policy: str, image_size: int, *, scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   normalize: bool = True) -> AugmentConfig:  # fmt: skip
    """The training view of a named policy at ``image_size``:

    - ``none``: the evaluation view (short side resized, centre crop), no randomness;
    - ``clip``: random resized crop of area ``scale`` and aspect ``ratio``, no flip (the toolkit's default, unchanged);
    - ``mild``: a crop of area 35–100 %, a flip with probability ½ where no caption names a side, brightness and
      contrast jitter (``b, c ~ U[0.6, 1.4]`` with probability 0.8) and SimCLR's blur; no saturation, hue or
      grayscale, so each pixel keeps its hue (the order of its channels) and a caption's colour words stay true;
    - ``strong``: SimCLR's view — a wide crop (area 8–100 %, aspect ``ratio``), a flip with probability ½ where no
      caption names a side, colour jitter, grayscale and blur (:class:`~siclip.data.augment.ColourConfig`).
    """
    if policy == "none":
        return AugmentConfig(image_size, train=False, normalize=normalize)
    if policy == "clip":
        return AugmentConfig(image_size, scale=tuple(scale), ratio=tuple(ratio), normalize=normalize)
    if policy == "mild":
        return AugmentConfig(image_size, scale=MILD_CROP_SCALE, ratio=tuple(ratio), flip_p=0.5, normalize=normalize, colour=MILD_COLOUR)
    if policy == "strong":
        return AugmentConfig(image_size, scale=STRONG_CROP_SCALE, ratio=tuple(ratio), flip_p=0.5, normalize=normalize, colour=ColourConfig())
    raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {AUGMENT_POLICIES}")
