"""The one interface every data format implements: a random-access :class:`Source` of raw samples.

A source knows how many samples it has and loads sample ``i`` as a :class:`RawSample` (an image,
decoded or as encoded bytes, a raw caption and the synthetic captions). A sample that cannot be used
(corrupt image, no caption, broken archive member) raises :class:`SampleError`; the dataset above skips
and counts it. A problem with the source itself (a missing shard, an unreadable CSV row) raises at
construction, naming the file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from siclip.errors import UserError


class SampleError(UserError):
    """A sample that must be skipped; carries its key and the reason (a command that cannot skip it reports it: status 2)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass
class RawSample:
    key: str
    image: np.ndarray | bytes  # (H, W, 3) uint8, or encoded JPEG/PNG bytes
    raw_caption: str | None
    synthetic: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def captions(self) -> list[str | None]:
        """Caption slots: index 0 the raw caption, 1..K the synthetic ones (the teacher cache's order)."""
        return [self.raw_caption, *self.synthetic]


class Source(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> RawSample: ...


class SubsetSource:
    """The samples ``indices`` of ``source`` (in that order) as a source, each sample's ``meta`` updated with
    ``extra_meta[j]`` for its position ``j`` (e.g. its CLIP score)."""

    def __init__(self, source: Source, indices: Sequence[int], extra_meta: Sequence[dict] | None = None) -> None:
        self.source, self.indices = source, [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(source)]
        if bad:
            raise ValueError(f"subset indices {bad[:5]} out of range for a source of {len(source)} samples")
        self.extra_meta = extra_meta

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> RawSample:
        sample = self.source.load(self.indices[index])
        if self.extra_meta is not None:
            sample.meta = {**sample.meta, **self.extra_meta[index]}
        return sample

    @property
    def problems(self) -> list:
        """What the underlying source found unreadable (the loader's skip report lists it)."""
        return list(getattr(self.source, "problems", []))


def to_rgb(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from any PIL mode and bit depth.

    PIL's ``convert("RGB")`` clips 16- and 32-bit integer images at 255 (a 16-bit scan becomes solid
    white), so wide integer modes are rescaled first: ``v8 = round(v16 / 257)`` (0…65535 → 0…255,
    values outside clipped); float images (``F``) are taken as 0…1 when their maximum is at most 1,
    else as 0…255. Alpha is dropped as CLIP's preprocessing does; palettes, CMYK, YCbCr, LAB and
    1-bit images go through PIL's own conversion.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(img.convert("RGB"))


# Decoded images larger than this are skipped (a JPEG is first reduced while decoding, see decode_image): 50 M pixels
# is 150 MB as RGB, already far beyond any training crop; a 12000² PNG of 140 KB would otherwise take 2.5 GB.
MAX_DECODED_PIXELS = 50_000_000


def decode_image(data: np.ndarray | bytes, key: str, *, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB (see :func:`to_rgb`); a corrupt or truncated encoding raises :class:`SampleError`.

    Decompression bombs are refused before decoding: an image of more than ``max_pixels`` pixels (its header says
    W × H) raises :class:`SampleError` naming its size, except a JPEG, which decodes at the largest DCT scale
    (1/2, 1/4 or 1/8, PIL's draft mode) that brings it under the limit, as its pixels are only resized down later.
    """
    if isinstance(data, np.ndarray):
        return data
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: the size check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format == "JPEG" and width * height > max_pixels:
                    scale = next((s for s in (2, 4, 8) if (width // s) * (height // s) <= max_pixels), 8)
                    img.draft("RGB", (width // scale, height // scale))
                if img.size[0] * img.size[1] > max_pixels:
                    raise SampleError(key, f"image of {width}×{height} pixels is larger than the decoding limit of {max_pixels:,} "
                                           "pixels (a decompression bomb, or a scan to downsize first)")  # fmt: skip
                img.load()  # forces the full decode: a truncated file fails here, not later
                return to_rgb(img)
    except Image.DecompressionBombError as err:  # PIL's own limit, checked as it opens the header
        raise SampleError(key, f"image larger than PIL's decoding limit ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError(key, f"corrupt image ({type(err).__name__}: {err})") from None


def sniff_image_format(data: bytes) -> str | None:
    """``"jpg"``, ``"png"``, ``"webp"``… from the encoded bytes (not from a file name), or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return {"JPEG": "jpg"}.get(fmt, fmt.lower()) if fmt else None


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt.upper().replace("JPG", "JPEG"), quality=quality)
    return buffer.getvalue()


def clean_captions(raw: str | None, synthetic: list | None) -> tuple[str | None, list[str]]:
    """Blank captions become missing; synthetic captions must be a list of strings."""
    raw = raw.strip() if isinstance(raw, str) and raw.strip() else None
    synthetic = [s.strip() for s in (synthetic or []) if isinstance(s, str) and s.strip()]
    return raw, synthetic


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (any depth, suffix in :data:`IMAGE_SUFFIXES`, any case), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(folder: str | Path, count: int | None = None) -> list[np.ndarray]:
    """The first ``count`` images of a folder (:func:`image_files` order) as ``(H, W, 3)`` uint8 arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = image_files(folder)[:count]
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        try:
            images.append(decode_image(path.read_bytes(), str(path)))
        except SampleError as err:
            raise ValueError(f"{path}: {err.reason}") from None
    return images
