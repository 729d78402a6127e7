"""CSV/TSV sources as open_clip reads them: one row per image, a path column and caption column(s).

Defaults follow open_clip's ``CsvDataset`` (``filepath`` and ``title``, tab-separated for ``.tsv``,
any case of the suffix). Synthetic captions come from several columns (``synthetic_keys=["syn0",
"syn1"]``) or one column holding a JSON list. Image paths are relative to the file's directory unless
``root`` is given. Every row must have as many fields as the header (the first row too): a ragged row
is an error naming the file and line, never silently shifted or padded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

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
        header, rows = read_table(self.path, sep)
        needed = [image_key, *([caption_key] if caption_key else []), *synthetic_keys]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}; the file has {header}")
        column = {name: i for i, name in enumerate(header)}
        self.root = Path(root) if root is not None else self.path.parent
        self.columns = {name: [row[i] for row in rows] for name, i in column.items()}
        self.image_key = image_key
        self.image_paths = self.columns[image_key]
        self.raw = self.columns[caption_key] if caption_key else [None] * len(rows)
        self.synthetic = [[row[column[k]] for k in synthetic_keys] for row in rows]

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


def read_table(path: Path, sep: str) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a delimited file; blank lines are skipped, a row with another field count raises."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: empty file, expected a header row")
            rows = []
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}: unreadable CSV: line {reader.line_num} has {len(row)} fields but the header has {len(header)} ({header})"
                    )
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: unreadable CSV ({err})") from None
    return [h.strip() for h in header], rows


def is_table(path: str | Path) -> bool:
    """A ``.csv``/``.tsv``/``.tab`` file name, in any case."""
    return Path(str(path)).suffix.lower() in (".csv", ".tsv", ".tab")
