"""The embedded dataset: train/val/test splits and evaluation sets of the procedural world.

Each split draws its scenes from its own stream ``[seed, stream, index]``, so splits never share an
image; captions come from a separate stream, so changing caption settings leaves the images alone.

**A noisy world** (``caption_noise = f``, training split only): exactly ``k = round(f·N)`` of the ``N`` training pairs,
chosen by a permutation seeded by ``[seed, noise stream]``, carry the captions (raw and synthetic) of another training
scene instead of their own, as web alt-text belongs to another picture. The chosen pairs pass their captions round a
cycle (pair ``c_i`` takes the captions of ``c_{i+1 mod k}``), so the captions themselves are those of the clean world,
only misaligned. Each sample says whether it is noisy (``meta["noisy"]``, and ``meta["caption_of"]``, the scene whose
captions it carries); :meth:`EmbeddedSource.noisy_indices` lists them, so a quality filter's precision can be measured.
This is apart from the raw captions' own failure modes (:class:`~siclip.data.captions.RawCaptionConfig`), which stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .captions import (
    ZERO_SHOT_TEMPLATES,
    RawCaptionConfig,
    raw_caption,
    synthetic_captions,
    zero_shot_classes,
)
from .sources import RawSample
from .world import SHAPES, Scene, render_scene, sample_scene

STREAMS = {"train": 0, "val": 1, "test": 2, "zeroshot": 3}
_CAPTION_STREAM = 1000  # caption rngs live apart from scene rngs
_TWIN_STREAM = 3000
_NOISE_STREAM = 4000


def shape_twin(scene: Scene, rng: np.random.Generator, scene_id: int) -> Scene:
    """``scene`` with every object's shape replaced by a different one drawn uniformly; all else kept."""
    objects = tuple(
        replace(o, shape=SHAPES[(SHAPES.index(o.shape) + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)])
        for o in scene.objects
    )
    return replace(scene, objects=objects, scene_id=scene_id)


@dataclass(frozen=True)
class EmbeddedConfig:
    seed: int = 0
    image_size: int = 64
    num_train: int = 10_000
    num_val: int = 1_000
    num_test: int = 1_000
    num_synthetic: int = 5
    max_objects: int = 3
    raw: RawCaptionConfig = field(default_factory=RawCaptionConfig)
    zero_shot_per_class: int = 5
    # Training split only: odd scene 2j+1 is the *shape twin* of scene 2j, the same objects (colours,
    # sizes, places) and background with every shape changed. Batched together (the loader's
    # group_size 2), each twin is the other's hard negative, decided by shape alone; without them almost
    # every negative in a batch is told apart by colour or position and a small model never learns
    # shape (experiments/RESULTS.md, "What limits the demo").
    shape_twins: bool = False
    caption_noise: float = 0.0  # fraction of training pairs whose captions belong to another scene (module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be a fraction in [0, 1], got {self.caption_noise}")

    def size(self, split: str) -> int:
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        if split == "zeroshot":
            return self.zero_shot_per_class * len(zero_shot_classes())
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(STREAMS)}")
        return sizes[split]


# The largest split a command builds: a split's scenes are numbered stream·10⁹ + index, and an epoch's order is a
# permutation of the split held in memory (80 MB at this size).
MAX_SPLIT = 10_000_000


class EmbeddedSource:
    """Split ``split`` of the embedded world as a :class:`~siclip.data.sources.Source`, rendered on demand."""

    def __init__(self, config: EmbeddedConfig = EmbeddedConfig(), split: str = "train") -> None:
        self._len = config.size(split)  # validates the split name
        self.config, self.split, self.stream = config, split, STREAMS[split]
        self._donors: dict[int, int] | None = None

    def __len__(self) -> int:
        return self._len

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for the {self.split} split of {self._len}")
        cfg = self.config
        scene_id = self.stream * 10**9 + index
        if self.split == "zeroshot":
            classes = zero_shot_classes()
            return sample_scene(cfg.seed, scene_id, label=classes[index % len(classes)])
        if cfg.shape_twins and self.split == "train" and index % 2:
            return shape_twin(self.scene(index - 1), np.random.default_rng([cfg.seed, _TWIN_STREAM, index]), scene_id)
        return sample_scene(cfg.seed, scene_id, max_objects=cfg.max_objects)

    def label(self, index: int) -> int:
        """Zero-shot class index of sample ``index`` (zeroshot split only)."""
        if self.split != "zeroshot":
            raise ValueError("labels exist for the 'zeroshot' split only")
        return index % len(zero_shot_classes())

    def _captions(self, index: int, scene: Scene) -> tuple[str, str, list[str]]:
        """``(raw caption, its kind, synthetic captions)`` of scene ``index`` as the clean world describes it."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, _CAPTION_STREAM + self.stream, index])
        offset = 1 + int(rng.integers(max(1, self._len - 1)))
        raw, kind = raw_caption(scene, rng, cfg.raw, lambda: self.scene((index + offset) % self._len))
        return raw, kind, synthetic_captions(scene, rng, cfg.num_synthetic)

    def caption_donors(self) -> dict[int, int]:
        """``{noisy index: the index whose captions it carries}``; empty without ``caption_noise`` or outside the
        training split (see the module docstring for the selection)."""
        if self._donors is None:
            count = round(self.config.caption_noise * self._len) if self.split == "train" else 0
            chosen = np.random.default_rng([self.config.seed, _NOISE_STREAM]).permutation(self._len)[:count].tolist()
            if count == 1:  # a cycle of one would be its own donor: take the next scene's captions
                self._donors = {chosen[0]: (chosen[0] + 1) % self._len}
            else:
                self._donors = {c: chosen[(i + 1) % count] for i, c in enumerate(chosen)}
        return self._donors

    def noisy_indices(self) -> np.ndarray:
        """The sorted indices of the pairs whose captions belong to another scene."""
        return np.array(sorted(self.caption_donors()), dtype=np.int64)

    def is_noisy(self, index: int) -> bool:
        return index in self.caption_donors()

    def load(self, index: int) -> RawSample:
        scene = self.scene(index)
        donor = self.caption_donors().get(index)
        raw, kind, synthetic = self._captions(index, scene) if donor is None else self._captions(donor, self.scene(donor))
        meta = {"raw_kind": kind, "objects": [(o.colour, o.shape) for o in scene.objects], "noisy": donor is not None}
        if donor is not None:
            meta["caption_of"] = donor
        return RawSample(
            key=f"{self.split}-{index:08d}",
            image=render_scene(scene, self.config.image_size),
            raw_caption=raw,
            synthetic=synthetic,
            meta=meta,
        )


def zero_shot_prompts() -> tuple[list[str], list[str]]:
    """``(class names, templates)`` of the embedded zero-shot task, e.g. "red circle" and "a photo of a {}."."""
    return [f"{c} {s}" for c, s in zero_shot_classes()], list(ZERO_SHOT_TEMPLATES)


def retrieval_set(config: EmbeddedConfig = EmbeddedConfig(), split: str = "test", captions_per_image: int = 5):
    """COCO-style retrieval: ``(source, captions)`` with ``captions[i]`` the accurate captions of image ``i``."""
    source = EmbeddedSource(config, split)
    captions = []
    for i in range(len(source)):
        rng = np.random.default_rng([config.seed, 2000 + source.stream, i])
        captions.append(synthetic_captions(source.scene(i), rng, captions_per_image))
    return source, captions


def open_source(spec: str, embedded: EmbeddedConfig = EmbeddedConfig(), split: str = "train", **csv_options):
    """A source from a spec: ``"embedded"`` (the world's ``split``), a ``.csv``/``.tsv`` file (any case;
    ``csv_options`` go to :class:`~siclip.data.tabular.CsvSource`, e.g. ``synthetic_keys``), or shards."""
    if spec == "embedded":
        return EmbeddedSource(embedded, split)
    from .tabular import CsvSource, is_table

    if is_table(spec):
        return CsvSource(spec, **csv_options)
    from .webdataset import ShardSource

    return ShardSource(spec)
