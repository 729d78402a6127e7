"""CSV/TSV sources as open_clip reads them: one row per image, a path column and caption column(s).

Defaults follow open_clip's ``CsvDataset`` (``filepath`` and ``title``, tab-separated for ``.tsv``).
Synthetic captions come from several columns (``synthetic_keys=["syn0", "syn1"]``) or one column
holding a JSON list. Image paths are relative to the file's directory unless ``root`` is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from .sources import RawSample, SampleError, clean_captions


class CsvSource:
    def __init__(
        self,
        path: str | Path,
        *,
        image_key: str = "filepath",
        caption_key: str | None = "title",
        synthetic_keys: Sequence[str] = (),
        sep: str | None = None,
        root: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CSV file not found: {self.path}")
        sep = sep or ("\t" if self.path.suffix.lower() in (".tsv", ".tab") else ",")
        try:
            frame = pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False, on_bad_lines="error")
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{self.path}: unreadable CSV ({err})") from None
        needed = [image_key, *([caption_key] if caption_key else []), *synthetic_keys]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}; the file has {list(frame.columns)}")
        self.root = Path(root) if root is not None else self.path.parent
        self.image_paths = frame[image_key].tolist()
        self.raw = frame[caption_key].tolist() if caption_key else [None] * len(frame)
        self.synthetic = frame[list(synthetic_keys)].to_numpy().tolist() if synthetic_keys else [[] for _ in range(len(frame))]

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> RawSample:
        relative = self.image_paths[index]
        key = relative or f"{self.path.name}:row{index + 2}"
        if not relative:
            raise SampleError(key, "empty image path")
        image_path = self.root / relative
        try:
            data = image_path.read_bytes()
        except OSError as err:
            raise SampleError(key, f"missing image file {image_path} ({type(err).__name__})") from None
        synthetic = list(self.synthetic[index])
        if len(synthetic) == 1 and synthetic[0].lstrip().startswith("["):
            try:
                synthetic = json.loads(synthetic[0])
            except json.JSONDecodeError:
                raise SampleError(key, "synthetic caption column is not a JSON list") from None
        raw, synthetic = clean_captions(self.raw[index], synthetic)
        return RawSample(key, data, raw, synthetic)
