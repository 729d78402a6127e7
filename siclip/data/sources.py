"""The one interface every data format implements: a random-access :class:`Source` of raw samples.

A source knows how many samples it has and loads sample ``i`` as a :class:`RawSample` (an image,
decoded or as encoded bytes, a raw caption and the synthetic captions). A sample that cannot be used
(corrupt image, no caption, broken archive member) raises :class:`SampleError`; the dataset above skips
and counts it. A problem with the source itself (a missing shard, an unreadable CSV row) raises at
construction, naming the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError


class SampleError(Exception):
    """A sample that must be skipped; carries its key and the reason."""

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


def decode_image(data: np.ndarray | bytes, key: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; a corrupt or truncated encoding raises :class:`SampleError`."""
    if isinstance(data, np.ndarray):
        return data
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces the full decode: a truncated file fails here, not later
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SampleError(key, f"corrupt image ({type(err).__name__}: {err})") from None


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt.upper().replace("JPG", "JPEG"), quality=quality)
    return buffer.getvalue()


def clean_captions(raw: str | None, synthetic: list | None) -> tuple[str | None, list[str]]:
    """Blank captions become missing; synthetic captions must be a list of strings."""
    raw = raw.strip() if isinstance(raw, str) and raw.strip() else None
    synthetic = [s.strip() for s in (synthetic or []) if isinstance(s, str) and s.strip()]
    return raw, synthetic
