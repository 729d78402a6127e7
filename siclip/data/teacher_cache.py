"""Teacher-embedding cache: a teacher's image and caption embeddings, computed once, read in training.

The idea of MobileCLIP's reinforced datasets (DataCompDR): distillation reads stored embeddings and
skips the teacher's forward pass. Layout of a cache directory (by default ``teacher_cache/`` next to
the shards)::

    meta.json    {"format": 1, "teacher": str, "dim": D, "num_captions": 1 + K, "count": N, "dtype": "float16",
                  "logit_scale": exp(s) of the teacher, or null, "preprocess": the teacher's view (siclip.data.Preprocess)}
    keys.json    [key_0, …, key_{N-1}]
    image.npy    (N, D)        teacher image embedding of each sample (evaluation view)
    text.npy     (N, 1 + K, D) caption slot 0 = raw caption, 1..K = synthetic; NaN where a slot is empty

Rows are L2-normalised in float32 before storage. The directory is built under a hidden temporary name and put in
place atomically when complete (:func:`siclip.storage.building_directory`), so a reader never sees half a cache and
a kill at any instant leaves one complete cache at the path. A cache replaces an earlier cache (nothing else beside
it); a folder holding anything else is refused unless ``overwrite`` (:func:`siclip.storage.check_output`). A reader that names the preprocessing it expects
(``TeacherCache(path, preprocess=teacher.preprocess)``) is refused a cache made under another one, or under none
recorded (caches written before it was recorded normalised every teacher with CLIP's mean and std).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from siclip.storage import building_directory, check_output

from .transforms import Preprocess, preprocess_image

FORMAT = 1
FILES = ("meta.json", "keys.json", "image.npy", "text.npy")


def is_teacher_cache(path: Path) -> bool:
    """Whether ``path`` holds a teacher cache and nothing else (what a new cache replaces without ``overwrite``)."""
    entries = {p.name: p for p in path.iterdir()} if path.is_dir() else {}
    return "meta.json" in entries and all(name in FILES and p.is_file() and not p.is_symlink() for name, p in entries.items())


class TeacherCacheWriter:
    def __init__(
        self, path: str | Path, *, dim: int, num_captions: int, teacher: str = "", dtype: str = "float16",
        logit_scale: float | None = None, preprocess: Preprocess | None = None, overwrite: bool = False, inputs: Iterable = (),
    ) -> None:  # fmt: skip
        self.path, self.dim, self.num_captions, self.teacher, self.dtype = Path(path), dim, num_captions, teacher, dtype
        check_output(self.path, ours=is_teacher_cache, overwrite=overwrite, inputs=inputs)
        self.logit_scale, self.preprocess = logit_scale, preprocess
        self.keys: list[str] = []
        self.images: list[np.ndarray] = []
        self.texts: list[np.ndarray] = []

    def add(self, key: str, image_embedding, text_embeddings) -> None:
        """One sample: ``image_embedding`` (D,), ``text_embeddings`` (1 + K, D) with NaN rows for empty slots."""
        image = np.asarray(image_embedding, dtype=np.float32)
        text = np.asarray(text_embeddings, dtype=np.float32)
        if image.shape != (self.dim,) or text.shape != (self.num_captions, self.dim):
            raise ValueError(
                f"{key}: expected image ({self.dim},) and text ({self.num_captions}, {self.dim}) embeddings, "
                f"got {image.shape} and {text.shape}"
            )
        self.keys.append(key)
        self.images.append(image)
        self.texts.append(text)

    def close(self) -> Path:
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("duplicate sample keys in the teacher cache")
        with building_directory(self.path) as tmp:
            np.save(tmp / "image.npy", np.stack(self.images).astype(self.dtype) if self.keys else np.zeros((0, self.dim), self.dtype))
            np.save(tmp / "text.npy", np.stack(self.texts).astype(self.dtype) if self.keys else np.zeros((0, self.num_captions, self.dim), self.dtype))
            (tmp / "keys.json").write_text(json.dumps(self.keys))
            meta = {"format": FORMAT, "teacher": self.teacher, "dim": self.dim, "num_captions": self.num_captions,
                    "count": len(self.keys), "dtype": self.dtype, "logit_scale": self.logit_scale,
                    "preprocess": self.preprocess.to_dict() if self.preprocess is not None else None}  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.path

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


class TeacherCache:
    """Read side; arrays are memory-mapped, so workers share the pages."""

    def __init__(self, path: str | Path, *, preprocess: Preprocess | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no teacher cache at {self.path} (missing meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unsupported teacher cache format {self.meta.get('format')}")
        if preprocess is not None:
            self.check_preprocess(preprocess)
        self.keys = json.loads((self.path / "keys.json").read_text())
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.image = np.load(self.path / "image.npy", mmap_mode="r")
        self.text = np.load(self.path / "text.npy", mmap_mode="r")

    def check_preprocess(self, expected: Preprocess) -> None:
        """Refuse a cache whose embeddings were computed on other pixels than ``expected`` (the teacher's own)."""
        recorded = self.meta.get("preprocess")
        if recorded is None:
            raise ValueError(f"{self.path}: this teacher cache records no preprocessing (it predates it; such caches fed every "
                             f"teacher CLIP-normalised pixels), but the teacher expects {expected}: rebuild it with cache_teacher.py")  # fmt: skip
        if Preprocess.from_dict(recorded) != expected:
            raise ValueError(f"{self.path}: the teacher cache was computed with {Preprocess.from_dict(recorded)}, but the teacher "
                             f"expects {expected}: rebuild it with cache_teacher.py")  # fmt: skip

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, key: str, caption_index: int) -> tuple[Tensor, Tensor]:
        """Float32 ``(image, text)`` embeddings of sample ``key`` and its caption slot ``caption_index``."""
        row = self.row.get(key)
        if row is None:
            raise KeyError(f"sample {key!r} is not in the teacher cache at {self.path}")
        if not 0 <= caption_index < self.text.shape[1]:
            raise IndexError(f"caption slot {caption_index} outside the cache's {self.text.shape[1]} slots")
        text = torch.from_numpy(np.array(self.text[row, caption_index], dtype=np.float32))
        if torch.isnan(text).any():
            raise KeyError(f"the teacher cache has no embedding for caption slot {caption_index} of {key!r}")
        return torch.from_numpy(np.array(self.image[row], dtype=np.float32)), text


@torch.no_grad()
def build_teacher_cache(
    source,
    encode_images,
    encode_texts,
    tokenizer,
    path: str | Path,
    *,
    preprocess: Preprocess,
    batch_size: int = 256,
    teacher: str = "",
    dtype: str = "float16",
    logit_scale: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Embed every sample of ``source`` with a teacher and write the cache.

    ``path`` is checked before any work (:func:`siclip.storage.check_output`): an earlier cache is replaced, a
    folder holding anything else only with ``overwrite``, never one of ``inputs`` (the files the source and the
    teacher are read from) or a folder holding one.

    ``encode_images(images (B, 3, S, S)) -> (B, D)`` and ``encode_texts(tokens (B, L)) -> (B, D)`` are
    the teacher's encoders (e.g. ``model.encode_image``); outputs are L2-normalised here. Images go
    through ``preprocess``, the teacher's own evaluation view (recorded in the cache). Samples the source cannot
    load are left out of the cache. ``dtype="float32"`` stores exact embeddings (twice the disk).
    """
    from tqdm.auto import tqdm

    from .sources import SampleError, decode_image

    check_output(path, ours=is_teacher_cache, overwrite=overwrite, inputs=inputs)
    writer: TeacherCacheWriter | None = None
    pending: list = []

    def flush() -> None:
        nonlocal writer
        images = torch.stack([preprocess_image(decode_image(s.image, s.key), preprocess) for s in pending])
        image_emb = torch.nn.functional.normalize(encode_images(images).float(), dim=-1)
        slots = [s.captions() for s in pending]
        width = max(len(c) for c in slots)
        texts = [t for c in slots for t in c if t]
        text_emb = torch.nn.functional.normalize(encode_texts(tokenizer(texts)).float(), dim=-1) if texts else None
        if writer is None:
            writer = TeacherCacheWriter(path, dim=image_emb.shape[1], num_captions=width, teacher=teacher, dtype=dtype,
                                        logit_scale=logit_scale, preprocess=preprocess, overwrite=overwrite, inputs=inputs)
        row = 0
        for s, caps, img in zip(pending, slots, image_emb):
            table = np.full((writer.num_captions, writer.dim), np.nan, dtype=np.float32)
            for j, caption in enumerate(caps[: writer.num_captions]):
                if caption:
                    table[j] = text_emb[row].numpy()
                    row += 1
            row += sum(1 for c in caps[writer.num_captions :] if c)
            writer.add(s.key, img.numpy(), table)
        pending.clear()

    for index in tqdm(range(len(source)), desc="teacher cache", disable=not progress):
        try:
            sample = source.load(index)
            decode_image(sample.image, sample.key)
        except SampleError:
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if writer is None:
        raise ValueError("no sample of the source could be loaded; nothing to cache")
    return writer.close()
