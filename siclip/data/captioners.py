"""Captioners for :mod:`siclip.data.captioning`: callables from images to caption lists.

:class:`GroundTruthCaptioner` is the reference captioner for the embedded world: instead of looking at
pixels it reads the scene behind each sample key, so its captions are exactly right. Real captioners
(BLIP, GIT, CoCa: :mod:`siclip.interop.captioners`) plug in the same way: ``captioner(images) -> list[list[str]]``.
"""

from __future__ import annotations

import numpy as np

from .captions import synthetic_captions
from .embedded import EmbeddedConfig, EmbeddedSource


class GroundTruthCaptioner:
    """Accurate captions of embedded-world images from their keys (``"<split>-<index>"``)."""

    def __init__(self, config: EmbeddedConfig = EmbeddedConfig(), num_captions: int = 5, seed: int = 0) -> None:
        self.config, self.num_captions, self.seed = config, num_captions, seed
        self._sources: dict[str, EmbeddedSource] = {}

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[list[str]]:
        out = []
        for key in keys:
            split, _, number = key.rpartition("-")
            if not number.isdigit() or not split:
                raise ValueError(f"{key!r} is not an embedded-world key such as 'train-00000012'")
            source = self._sources.get(split) or self._sources.setdefault(split, EmbeddedSource(self.config, split))
            rng = np.random.default_rng([self.config.seed, 3000 + source.stream, int(number), self.seed])
            out.append(synthetic_captions(source.scene(int(number)), rng, self.num_captions))
        return out
