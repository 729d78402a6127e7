"""The map-style image–text dataset over any :class:`~siclip.data.sources.Source`, and its collate.

Sample ``(epoch, index)`` draws everything random (caption choice, augmentation) from
``numpy.random.default_rng([seed, epoch, index])`` — the caption edits (EDA) from ``[seed, epoch, index, 1]`` and
SLIP's two views from ``[seed, epoch, index, 2]``, so switching either on leaves the others' draws as they were —: the
same sample whatever the worker, the batch size or a resume in between. A sample that cannot be used comes back as :class:`Skipped` and the
collate function moves it out of the batch, so a bad file never crashes an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import eda, names_a_side
from .sources import RawSample, SampleError, Source, decode_image
from .transforms import AugmentConfig, augment


@dataclass(frozen=True)
class Skipped:
    index: int
    key: str
    reason: str


def choose_caption(sample: RawSample, rng: np.random.Generator, p_synthetic: float) -> int:
    """Caption slot to use: a synthetic one (1..K) with probability ``p_synthetic``, else the raw one (0).

    When one kind is missing the other is used; with no caption at all the sample is skipped.
    """
    slots = sample.captions()
    has_raw = slots[0] is not None
    synthetic = [i for i in range(1, len(slots)) if slots[i]]
    if not has_raw and not synthetic:
        raise SampleError(sample.key, "empty or missing caption")
    use_synthetic = rng.random() < p_synthetic
    if synthetic and (use_synthetic or not has_raw):
        return synthetic[int(rng.integers(len(synthetic)))]
    return 0


class ImageTextDataset(Dataset):
    """``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) → a sample dict or :class:`Skipped`.

    A sample holds ``image`` (3, S, S) (uint8 crops when ``augment_config.normalize`` is False: each model then
    normalises them itself), ``text`` (context,) long token ids, ``caption``, ``caption_index`` (0 raw, 1..K
    synthetic), ``key`` and ``index``; with a teacher cache also ``teacher_image`` and ``teacher_text``
    embeddings; with a ``teacher_tokenizer`` (a teacher that reads other ids than the student) ``teacher_ids``.
    """

    def __init__(
        self,
        source: Source,
        tokenizer,
        *,
        augment_config: AugmentConfig = AugmentConfig(),
        p_synthetic: float = 0.5,
        seed: int = 0,
        teacher_cache=None,
        teacher_tokenizer=None,
        text_augment: float = 0.0,
        ssl_config: AugmentConfig | None = None,
    ) -> None:
        if not 0.0 <= p_synthetic <= 1.0:
            raise ValueError(f"p_synthetic must be in [0, 1], got {p_synthetic}")
        if not 0.0 <= text_augment <= 1.0:
            raise ValueError(f"text_augment must be in [0, 1], got {text_augment}")
        self.source, self.tokenizer = source, tokenizer
        self.augment_config, self.p_synthetic, self.seed = augment_config, p_synthetic, seed
        self.teacher_cache, self.teacher_tokenizer = teacher_cache, teacher_tokenizer
        self.text_augment, self.ssl_config = text_augment, ssl_config

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict | Skipped:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        rng = np.random.default_rng([self.seed, epoch, index])
        key = f"#{index}"
        try:
            raw = self.source.load(index)
            key = raw.key
            image = decode_image(raw.image, key)
            slot = choose_caption(raw, rng, self.p_synthetic)
        except SampleError as err:
            return Skipped(index, err.key, err.reason)
        caption = raw.captions()[slot]
        may_flip = not names_a_side(*raw.captions())
        if self.text_augment:
            caption = eda(caption, np.random.default_rng([self.seed, epoch, index, 1]), self.text_augment)
        sample = {
            "image": augment(image, rng, self.augment_config, may_flip=may_flip),
            "text": self.tokenizer(caption)[0],
            "caption": caption,
            "caption_index": slot,
            "key": key,
            "index": index,
        }
        if self.ssl_config is not None:
            views = np.random.default_rng([self.seed, epoch, index, 2])
            sample["ssl_images"] = torch.stack([augment(image, views, self.ssl_config, may_flip=may_flip) for _ in range(2)])
        if self.teacher_cache is not None:
            sample["teacher_image"], sample["teacher_text"] = self.teacher_cache.lookup(key, slot)
        if self.teacher_tokenizer is not None:
            sample["teacher_ids"] = self.teacher_tokenizer(caption)[0]
        return sample


def collate_samples(items: list[dict | Skipped]) -> dict:
    """Stack tensors, list the rest; skipped samples go to ``batch["skipped"]``, ``batch["size"]`` counts the kept."""
    kept = [s for s in items if not isinstance(s, Skipped)]
    batch: dict = {"skipped": [s for s in items if isinstance(s, Skipped)], "size": len(kept)}
    if not kept:
        return batch
    for name, value in kept[0].items():
        values = [s[name] for s in kept]
        if isinstance(value, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(value, int):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch
