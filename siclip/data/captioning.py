"""Synthetic captions written into a dataset (CC12M → CC12M-SYN), resumably: WebDataset shards shard by shard, a
CSV/TSV table in chunks of rows.

    stats = recaption_shards("data/shards", captioner, out_dir="data/shards_syn", record={"captioner": "hf:blip", ...})
    stats = caption_table("train.csv", captioner, out="train_syn.csv", record={...})   # adds a synthetic_captions column

A captioner maps a list of ``(H, W, 3)`` uint8 images to one list of captions each: ``captioner(images)``, given
``keys=`` and ``seed=`` too when it takes them. The seed of each batch is derived from the run's seed, the unit's name
and the batch's first index (:func:`batch_seed`), so a unit captioned again gets the same captions. Empty captions are
dropped (counted as ``empty``); images that cannot be decoded keep their sample unchanged (``skipped``).

Each unit (a shard; a chunk of rows) is written whole (a temporary file, then a rename) and then recorded in a manifest,
``captions.json`` beside the output (the output folder, the shards' folder when they are rewritten in place, or
``OUT.parts/`` for a table), with ``record``: the captioner and its settings. A rerun with the same record skips the
units done; one with another is refused, naming both (``overwrite`` starts over). Without ``record`` nothing is recorded
and every unit is captioned. A table's chunks are kept in ``OUT.parts/`` until the last one is done; then ``OUT`` is
written whole (the input's columns and ``column``, a JSON list per row, which ``siclip train --synthetic-keys COLUMN`` reads) and the
parts go.

Nothing is replaced that this captioning did not write: a file of a unit's name already in the output folder that the
manifest does not record (as done, or as the one being written when a run stopped) is refused, as is an existing
output table; ``overwrite`` is the one switch that starts over, replacing what is there (:func:`shards_not_ours`).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import shutil
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from siclip.storage import write_text_atomic

from .sources import SampleError, decode_image
from .tabular import CsvSource, read_table
from .webdataset import IMAGE_EXTS, _write_atomic_tar, expand_shards, split_member_name

MANIFEST = "captions.json"
MANIFEST_FORMAT = "siclip-captions/1"
Captioner = Callable[..., list[list[str]]]


@dataclass(frozen=True)
class CaptionSettings:
    """How a generative captioner samples; checked on construction."""

    num_captions: int = 5  # captions per image
    temperature: float = 1.0  # softmax temperature of sampling; 0: greedy decoding (one caption per image)
    top_p: float = 0.9  # nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p
    max_new_tokens: int = 30  # longest caption, in tokens (at most the model's text context)
    seed: int = 0  # sampling seed; each batch's is derived from it, the unit and the batch

    def __post_init__(self) -> None:
        if self.num_captions < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_captions and max_new_tokens must be at least 1, got {self.num_captions} and {self.max_new_tokens}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be ≥ 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.num_captions > 1 and self.temperature == 0:
            raise ValueError(f"{self.num_captions} captions per image need sampling: greedy decoding (temperature 0) gives one; "
                             "pass a temperature above 0 or one caption")  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


def batch_seed(seed: int, unit: str, start: int) -> int:
    """The seed of the batch starting at ``start`` in ``unit``: a CRC of the three, stable across runs and machines."""
    return zlib.crc32(f"{seed}/{unit}/{start}".encode()) & 0x7FFFFFFF


def call_captioner(captioner: Captioner, images: list[np.ndarray], keys: list[str], seed: int) -> list[list[str]]:
    """``captioner``'s captions of ``images`` (with ``keys=`` and ``seed=`` when it takes them), checked: one list of
    strings per image."""
    try:
        parameters = inspect.signature(captioner).parameters
    except (TypeError, ValueError):
        parameters = {}
    extra = {name: value for name, value in (("keys", keys), ("seed", seed)) if name in parameters}
    captions = captioner(images, **extra)
    if len(captions) != len(images) or not all(isinstance(c, list) and all(isinstance(t, str) for t in c) for c in captions):
        raise ValueError(f"a captioner must return one list of strings per image; got {len(captions)} item(s) for {len(images)} images")
    return captions


class Manifest:
    """``captions.json``: the record of a captioning run and the units it finished (see the module docstring)."""

    def __init__(self, directory: Path, record: dict | None, *, overwrite: bool) -> None:
        self.path, self.record, self.units, self.writing = directory / MANIFEST, record, {}, None
        if record is None or overwrite:  # overwrite: every unit again, whatever was recorded
            return
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path}: not a captions manifest (unreadable JSON); move it away or pass --overwrite") from None
            if not isinstance(saved, dict) or saved.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"{self.path}: not a captions manifest; move it away or pass --overwrite")
            if saved.get("record") == record:
                self.units, self.writing = dict(saved.get("units", {})), saved.get("writing")
            else:
                raise ValueError(f"{self.path} records captions by {json.dumps(saved.get('record'))}, not {json.dumps(record)}: "
                                 "rerun with the same captioner and settings to continue, or pass --overwrite to caption again")  # fmt: skip

    def done(self, unit: str) -> bool:
        return unit in self.units

    def ours(self, unit: str) -> bool:
        """Whether a file named ``unit`` beside the manifest was written by this captioning: recorded as done, or the
        one being written when it stopped (a stop between the file's rename and its record)."""
        return unit in self.units or unit == self.writing

    def start(self, unit: str) -> None:
        """Record that ``unit``'s file is about to be written, so that a rerun knows it as its own."""
        self.writing = unit
        self._save()

    def add(self, unit: str, stats: dict) -> None:
        self.units[unit], self.writing = stats, None
        self._save()

    def _save(self) -> None:
        if self.record is None:
            return
        saved = {"format": MANIFEST_FORMAT, "record": self.record, "units": self.units, **({"writing": self.writing} if self.writing else {})}
        write_text_atomic(json.dumps(saved, indent=1) + "\n", self.path)


def shards_not_ours(shards: str | Path | Sequence[str | Path], out_dir: str | Path | None, record: dict | None, *,
                    overwrite: bool) -> list[str]:  # fmt: skip
    """The names of files in ``out_dir`` that captioning ``shards`` there would replace although this captioning did
    not write them (not the inputs themselves, not recorded in its ``captions.json``): refused unless ``overwrite``
    (which starts over, replacing what is there). Raises ``ValueError`` for a manifest of other settings."""
    if out_dir is None or overwrite:  # in place: the shards named are the ones rewritten, as asked
        return []
    manifest = Manifest(Path(out_dir), record, overwrite=False)
    targets = [(path, Path(out_dir) / path.name) for path in expand_shards(shards)]
    return [t.name for path, t in targets if t.exists() and t.resolve() != path.resolve() and not manifest.ours(path.name)]


def _caption_images(captioner: Captioner, images: list[np.ndarray | None], keys: list[str], batch_size: int, seed: int, unit: str,
                    stats: dict) -> list[list[str] | None]:  # fmt: skip
    """Captions of each decodable image (None for the others), in batches; counts into ``stats``."""
    out: list[list[str] | None] = [None] * len(images)
    valid = [i for i, image in enumerate(images) if image is not None]
    stats["skipped"] += len(images) - len(valid)
    for start in range(0, len(valid), batch_size):
        chunk = valid[start : start + batch_size]
        captions = call_captioner(captioner, [images[i] for i in chunk], [keys[i] for i in chunk], batch_seed(seed, unit, start))
        for i, texts in zip(chunk, captions):
            kept = [t.strip() for t in texts if t.strip()]
            stats["empty"] += len(texts) - len(kept)
            out[i] = kept
        stats["captioned"] += len(chunk)
    return out


def _new_stats() -> dict:
    return {"captioned": 0, "skipped": 0, "empty": 0, "units_done_before": 0}


def recaption_shards(shards: str | Path | Sequence[str | Path], captioner: Captioner, *, out_dir: str | Path | None = None,
                     batch_size: int = 64, mode: str = "replace", record: dict | None = None, overwrite: bool = False, seed: int = 0,
                     progress: bool = True) -> dict[str, int]:  # fmt: skip
    """Run ``captioner`` over every image of the shards and store its captions in the samples' ``.json`` members
    (``"synthetic_captions"``), replacing the synthetic captions there (``mode="replace"``) or after them (``"append"``).
    Shards are rewritten in place or written to ``out_dir``, each whole; resumable with ``record`` (module docstring)."""
    if mode not in ("replace", "append"):
        raise ValueError(f"mode must be 'replace' or 'append', got {mode!r}")
    paths = expand_shards(shards)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"shards of the same name in different folders ({sorted({n for n in names if names.count(n) > 1})[:3]}): "
                         "caption each folder on its own")  # fmt: skip
    target_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    clashes = shards_not_ours(paths, out_dir, record, overwrite=overwrite)
    if clashes:
        raise FileExistsError(f"--out {out_dir} already holds {', '.join(clashes[:3])}{' …' if len(clashes) > 3 else ''}, which this "
                              "captioning did not write: choose another --out, or pass --overwrite to start over, replacing them")  # fmt: skip
    manifest = Manifest(target_dir, record, overwrite=overwrite)
    stats = _new_stats()
    bar = tqdm(paths, desc="captioning shards", unit="shard", disable=not progress)
    for path in bar:
        target = Path(out_dir) / path.name if out_dir is not None else path
        if manifest.done(path.name) and target.is_file():
            stats["units_done_before"] += 1
            continue
        unit = _new_stats()
        members = _caption_shard(path, captioner, batch_size=batch_size, mode=mode, seed=seed, stats=unit)
        manifest.start(path.name)
        _write_atomic_tar(target, members)
        manifest.add(path.name, {k: unit[k] for k in ("captioned", "skipped", "empty")})
        for key in ("captioned", "skipped", "empty"):
            stats[key] += unit[key]
        bar.set_postfix(images=stats["captioned"])
    return stats


def _caption_shard(path: Path, captioner: Captioner, *, batch_size: int, mode: str, seed: int, stats: dict) -> list[tuple[str, bytes]]:
    """The members of ``path`` with each decodable image's captions in its ``.json``."""
    with tarfile.open(path, mode="r:") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    order: list[str] = []
    by_key: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = split_member_name(name)
        if key not in by_key:
            order.append(key)
        by_key.setdefault(key, {})[ext] = data
    images = []
    for key in order:
        ext = next((e for e in IMAGE_EXTS if e in by_key[key]), None)
        try:
            images.append(decode_image(by_key[key][ext], key) if ext else None)
        except SampleError:
            images.append(None)
    captions = _caption_images(captioner, images, order, batch_size, seed, path.name, stats)
    for key, new in zip(order, captions):
        if new is None:
            continue
        files = by_key[key]
        meta = json.loads(files["json"]) if "json" in files else {"key": key}
        if isinstance(meta, list):
            meta = {"key": key, "synthetic_captions": meta}
        old = meta.get("synthetic_captions", []) if mode == "append" else []
        meta["synthetic_captions"] = [*old, *new]
        files["json"] = json.dumps(meta).encode("utf-8")
    return [(f"{k}.{ext}", data) for k in order for ext, data in by_key[k].items()]


def caption_table(table: str | Path, captioner: Captioner, *, out: str | Path, image_key: str = "filepath",
                  column: str = "synthetic_captions", mode: str = "replace", chunk_rows: int = 1000, batch_size: int = 64,
                  record: dict | None = None, overwrite: bool = False, seed: int = 0, progress: bool = True) -> dict[str, int]:  # fmt: skip
    """Caption every image of a CSV/TSV (``image_key`` paths, relative to the file) into ``out``: the same rows with
    ``column`` holding each row's captions as a JSON list (after the ones there with ``mode="append"``). Resumable in
    chunks of ``chunk_rows`` rows (module docstring); ``out`` is never the input."""
    if mode not in ("replace", "append"):
        raise ValueError(f"mode must be 'replace' or 'append', got {mode!r}")
    table, out = Path(table), Path(out)
    if out.resolve() == table.resolve():
        raise ValueError(f"--out {out} is the input table: write the captioned table to a new file")
    parts = out.with_name(out.name + ".parts")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: pass --overwrite to replace it")
    if overwrite and record is not None:
        shutil.rmtree(parts, ignore_errors=True)
    sep = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    header, rows = read_table(table, sep)
    source = CsvSource(table, image_key=image_key, caption_key=None, sep=sep)
    manifest = Manifest(parts, record, overwrite=overwrite)
    chunks = range(0, len(rows), chunk_rows)
    names = [f"chunk-{start // chunk_rows:06d}.json" for start in chunks]
    clashes = [name for name in names if (parts / name).exists() and not manifest.ours(name)]
    if clashes and not overwrite:
        raise FileExistsError(f"{parts} already holds {', '.join(clashes[:3])}, which this captioning did not write: move it away or pass "
                              "--overwrite to start over, replacing it")  # fmt: skip
    stats = _new_stats()
    bar = tqdm(chunks, desc=f"captioning {table.name}", unit="chunk", disable=not progress)
    new: list[list[str] | None] = []
    for start, name in zip(bar, names):
        if manifest.done(name) and (parts / name).is_file():
            new += json.loads((parts / name).read_text(encoding="utf-8"))
            stats["units_done_before"] += 1
            continue
        unit = _new_stats()
        indices = range(start, min(start + chunk_rows, len(rows)))
        images, keys = [], []
        for i in indices:
            try:
                sample = source.load(i)
                images.append(decode_image(sample.image, sample.key))
                keys.append(sample.key)
            except SampleError as err:
                images.append(None)
                keys.append(err.key)
        captions = _caption_images(captioner, images, keys, batch_size, seed, f"{table.name}/{name}", unit)
        manifest.start(name)
        write_text_atomic(json.dumps(captions), parts / name)
        manifest.add(name, {k: unit[k] for k in ("captioned", "skipped", "empty")})
        for key in ("captioned", "skipped", "empty"):
            stats[key] += unit[key]
        new += captions
        bar.set_postfix(images=stats["captioned"])
    write_text_atomic(_table_text(header, rows, new, column, mode, sep), out)
    for name in (*names, MANIFEST):  # only the parts this captioning wrote: anything else there stays
        (parts / name).unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:  # absent, or holding files of someone else's
        pass
    return stats


def _table_text(header: list[str], rows: list[list[str]], captions: list[list[str] | None], column: str, mode: str, sep: str) -> str:
    at = header.index(column) if column in header else None
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=sep, lineterminator="\n")
    writer.writerow(header if at is not None else [*header, column])
    for row, texts in zip(rows, captions):
        old = _listed(row[at]) if at is not None else []
        value = json.dumps(([*old, *texts] if mode == "append" else texts) if texts is not None else old)
        writer.writerow([*row[:at], value, *row[at + 1 :]] if at is not None else [*row, value])
    return buffer.getvalue()


def _listed(cell: str) -> list[str]:
    """The captions a cell holds: a JSON list, or the cell's text as one caption (none when empty)."""
    text = cell.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        return [str(v) for v in value]
    return [text] if text else []
