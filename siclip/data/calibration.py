"""Calibration inputs, read from what the user gives: a caption file and an image folder.

What a model is measured on (divergences between its blocks, FLOPs, the check that a converted file reloads the
same): ``--calibration-captions FILE`` (one caption per line), ``--calibration-images DIR`` (any image files, any
depth), ``--calibration-count N`` of each. Without them, a siclip model is measured on the embedded world's
validation split (:func:`embedded_calibration`), as it always was. Each model then reads the captions through its own
tokenizer and the images in its own view; that is the model's business (:mod:`siclip.interop`), not this module's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .sources import decode_image, read_image_folder  # noqa: F401  (the image-folder reader, beside the caption file's)


def read_caption_file(path: str | Path) -> list[str]:
    """Captions, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no captions (expected one per line)")
    return texts


def embedded_calibration(count: int, image_size: int = 64) -> tuple[list[str], list[np.ndarray]]:
    """``count`` captions and images of the embedded world's validation split (a synthetic caption per image)."""
    from .embedded import EmbeddedConfig, EmbeddedSource

    source = EmbeddedSource(EmbeddedConfig(num_val=count, image_size=image_size), "val")
    samples = [source.load(i) for i in range(min(count, len(source)))]
    return [s.synthetic[0] for s in samples], [decode_image(s.image, s.key) for s in samples]


def calibration_inputs(captions_file: str | Path | None, images_dir: str | Path | None, count: int, *,
                       embedded_size: int | None = None) -> tuple[list[str] | None, list[np.ndarray] | None, str]:  # fmt: skip
    """``(captions, images, where)``: the first ``count`` lines of ``captions_file`` and images of ``images_dir``; with
    neither, and ``embedded_size`` given, the embedded world's validation split at that size; ``where`` says which."""
    if captions_file is None and images_dir is None and embedded_size is not None:
        captions, images = embedded_calibration(count, embedded_size)
        return captions, images, f"{len(captions)} captions and images of the embedded world's validation split"
    captions = read_caption_file(captions_file)[:count] if captions_file is not None else None
    images = read_image_folder(images_dir, count) if images_dir is not None else None
    said = [f"{len(captions)} captions of {captions_file}" if captions else "", f"{len(images)} images of {images_dir}" if images else ""]
    return captions, images, " and ".join(s for s in said if s) or "no calibration inputs"
