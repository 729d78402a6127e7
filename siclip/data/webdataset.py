"""WebDataset tar shards in img2dataset's layout: ``key.jpg`` with ``key.txt`` and/or ``key.json``.

The raw caption is ``key.txt``; synthetic captions are a list in ``key.json`` under
``"synthetic_captions"`` (DataCompDR's ``"syn_text"`` and a bare JSON list are read too).

:class:`ShardSource` indexes the shards once (tar headers only: key, member offsets and sizes) and
then reads any sample by offset, so shards are a random-access source with shuffling and exact
resume. A truncated archive (cut inside a member or at a header) keeps what was indexed before the
break and records the problem in ``problems``; a sample whose image is corrupt, whose captions are empty,
whose ``.txt`` is not UTF-8 or whose ``.json`` is not an object (or a list) of string captions raises
:class:`SampleError`, so the loader skips it and reports its key.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from siclip.storage import atomic_write

from .sources import RawSample, SampleError, Source, clean_captions, decode_image, encode_image, sniff_image_format

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SYNTHETIC_FIELDS = ("synthetic_captions", "syn_text", "captions")


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a list, a directory (its ``*.tar``), a glob, or a brace range ``a-{000..009}.tar``.

    Every named shard must exist: a missing one raises :class:`FileNotFoundError` naming it.
    """
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    else:
        text = str(spec)
        match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
        if match:
            lo, hi = match.groups()
            paths = [Path(text[: match.start()] + str(i).zfill(len(lo)) + text[match.end() :]) for i in range(int(lo), int(hi) + 1)]
        elif Path(text).is_dir():
            paths = sorted(Path(text).glob("*.tar"))
            if not paths:
                raise FileNotFoundError(f"no .tar shards in directory {text}")
        elif any(c in text for c in "*?["):
            paths = [Path(p) for p in sorted(glob.glob(text))]
            if not paths:
                raise FileNotFoundError(f"no shard matches {text}")
        else:
            paths = [Path(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards not found: {listed}")
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class _Entry:
    key: str
    shard: int
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def _missing_end_marker(path: Path, offset: int) -> str | None:
    """Why the archive did not end properly at ``offset``, or None when a zero block (tar's end-of-archive
    marker) is there. ``tarfile`` silently stops at a header that is cut or garbled, which would drop
    every later member without a word."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return "archive cut off"
    return None if block == bytes(tarfile.BLOCKSIZE) else "unreadable member header"


class ShardSource:
    """Random-access :class:`~siclip.data.sources.Source` over WebDataset shards."""

    def __init__(self, shards: str | Path | Sequence[str | Path]) -> None:
        self.shards = expand_shards(shards)
        self.entries: list[_Entry] = []
        self.problems: list[tuple[str, str]] = []
        for number, path in enumerate(self.shards):
            self._index(number, path)
        self._files: dict[int, object] = {}
        self._pid = None

    def _index(self, number: int, path: Path) -> None:
        by_key: dict[str, _Entry] = {}
        size = path.stat().st_size
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    if member.offset_data + member.size > size:
                        self.problems.append((f"{path}:{member.name}", "member cut off by the end of the archive"))
                        continue
                    entry = by_key.setdefault(key, _Entry(key, number, {}))
                    entry.members[ext] = (member.offset_data, member.size)
                end = tar.offset  # where tarfile stopped looking for the next header
            cut = _missing_end_marker(path, end)
            if cut:
                last = next(reversed(by_key), None)
                self.problems.append((str(path), f"{cut} at byte {end} after {len(by_key)} samples (last key {last}): "
                                                 "the rest of the shard is lost"))  # fmt: skip
        except tarfile.ReadError as err:
            if not by_key and not self.problems:
                raise ValueError(f"{path} is not a readable tar archive ({err})") from None
            self.problems.append((str(path), f"archive broken after {len(by_key)} samples ({err})"))
        self.entries.extend(by_key.values())

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # file handles do not survive a fork into a worker
            self._files, self._pid = {}, os.getpid()
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(self.shards[shard], "rb")
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": None}

    def load(self, index: int) -> RawSample:
        entry = self.entries[index]
        members = {ext: self._read(entry.shard, *where) for ext, where in entry.members.items()}
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise SampleError(entry.key, f"no image member (has {sorted(members)})")
        try:
            raw = members["txt"].decode("utf-8") if "txt" in members else None
        except UnicodeDecodeError as err:
            raise SampleError(entry.key, f"txt member is not UTF-8 ({err})") from None
        meta, synthetic = {}, []
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SampleError(entry.key, f"broken json member ({err})") from None
            if isinstance(meta, list):
                meta, synthetic = {}, meta
            elif isinstance(meta, dict):
                field = next((f for f in SYNTHETIC_FIELDS if f in meta), None)
                synthetic = meta[field] if field else []
                if raw is None and isinstance(meta.get("caption"), str):
                    raw = meta["caption"]
            else:
                raise SampleError(entry.key, f"json member is {type(meta).__name__} {meta!r:.40}, not an object or a list of captions")
            bad = [type(c).__name__ for c in synthetic if not isinstance(c, str)] if isinstance(synthetic, list) else None
            if bad is None or bad:
                kind = type(synthetic).__name__ if bad is None else f"a list holding {sorted(set(bad))}"
                raise SampleError(entry.key, f"synthetic captions in the json member must be a list of strings, got {kind}")
        raw, synthetic = clean_captions(raw, synthetic)
        return RawSample(entry.key, members[image_ext], raw, synthetic, meta)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible archives
    tar.addfile(info, io.BytesIO(data))


def _write_atomic_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add_member(tar, name, data)


def shard_key(key: str) -> str:
    """A WebDataset key for a source key: no dots or slashes, which the reader would split on
    (``png32/01496.png`` → ``png32_01496_png``); the original key is kept in the ``.json`` member."""
    return re.sub(r"[./\\]", "_", key)


def sample_members(sample: RawSample, image_format: str = "png") -> list[tuple[str, bytes]]:
    """The tar members of one sample: image, ``.txt`` raw caption, ``.json`` with the synthetic list.

    Encoded images keep their bytes under the extension of their actual format (sniffed, not taken
    from a file name); formats the reader does not list (BMP, TIFF, GIF…) are decoded and re-encoded.
    """
    if isinstance(sample.image, bytes):
        ext = sniff_image_format(sample.image)
        image = sample.image
        if ext not in IMAGE_EXTS:  # an undecodable image raises SampleError here, and the sample is skipped
            image, ext = encode_image(decode_image(sample.image, sample.key), image_format), image_format
    else:
        image, ext = encode_image(sample.image, image_format), image_format
    key = shard_key(sample.key)
    members = [(f"{key}.{ext}", image)]
    if sample.raw_caption is not None:
        members.append((f"{key}.txt", sample.raw_caption.encode("utf-8")))
    meta = {k: v for k, v in sample.meta.items() if k not in SYNTHETIC_FIELDS}
    meta = {"key": sample.key, **meta, "synthetic_captions": list(sample.synthetic)}
    members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return members


def write_shards(
    source: Source,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "shard",
    limit: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``source`` (any source, the embedded one included) as shards ``{prefix}-000000.tar``, ….

    Each shard is written to a temporary file and renamed, so an interrupted run leaves whole shards.
    Samples the source cannot load are skipped (their keys are returned in the log of the progress bar).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(source) if limit is None else min(limit, len(source))
    paths: list[Path] = []
    written: dict[str, str] = {}  # shard key -> source key: two keys must not collapse into one sample
    for start in tqdm(range(0, total, samples_per_shard), desc="writing shards", disable=not progress):
        members: list[tuple[str, bytes]] = []
        for index in range(start, min(start + samples_per_shard, total)):
            try:
                sample = source.load(index)
                new = sample_members(sample, image_format)
            except SampleError:
                continue
            key = shard_key(sample.key)
            if written.setdefault(key, sample.key) != sample.key:
                raise ValueError(f"source keys {written[key]!r} and {sample.key!r} both become shard key {key!r}")
            members.extend(new)
        path = out / f"{prefix}-{len(paths):06d}.tar"
        _write_atomic_tar(path, members)
        paths.append(path)
    return paths
