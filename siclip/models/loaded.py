"""A loaded CLIP: any model with siclip's CLIP interface (``encode_image``, ``encode_text``, ``scale()``,
``preprocess``, ``embed_dim``; see :mod:`siclip.interop`), its tokenizer, and the spec it was loaded from.

Foreign-free, below both :mod:`siclip.interop` (which builds it for foreign models and model specs) and
:mod:`siclip.deploy` (which builds it for exported ONNX encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .clip import CLIP


@dataclass
class LoadedClip:
    """A CLIP with the interface above, its tokenizer, and where it came from (``spec``)."""

    model: Any
    tokenizer: Any
    spec: str
    tokenizer_spec: dict | None = None  # siclip tokenizers: what rebuilds it (saved with a student that uses it)

    @property
    def is_siclip(self) -> bool:
        """A model of this package (which a SiCLIP student can inherit weights from)."""
        return isinstance(self.model, CLIP)


__all__ = ["LoadedClip"]
