"""Data quality: score every image–text pair of a source with a CLIP and keep the best (DataComp's CLIP-score filter).

    score_i = cos(f_img(x_i), f_txt(t_i)) = f_img(x_i)·f_txt(t_i) / (‖f_img(x_i)‖·‖f_txt(t_i)‖)

with ``t_i`` the pair's raw caption (the alt-text a web pair comes with; a sample without one is not scored) and the
encoders passed as callables (``encode_images(list of (H, W, 3) uint8 arrays) -> (B, D)``, ``encode_texts(list of str)
-> (B, D)``), so that the model's own preprocessing and tokenizer are theirs (:mod:`siclip.commands.filter` composes them
from any model spec). Kept: the top fraction (``k = round(f·n)`` of the ``n`` scored pairs, ties broken by index) or
every pair scoring at least a threshold.

Scores are cached in chunks of consecutive samples, each written atomically (:func:`siclip.storage.write_text_atomic`)
with a manifest naming the model and the data, so an interrupted scoring continues where it stopped and a cache of
another model or source is refused. A sample's ``meta["noisy"]`` (the noisy embedded world's flag, kept in shards
written from it) is recorded beside its score, so the filter's precision as a noise detector can be measured.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from siclip.storage import write_text_atomic

from .sources import RawSample, SampleError, Source, decode_image

MANIFEST = "manifest.json"


@dataclass
class PairScores:
    """Per sample of a source: ``keys``, ``scores`` (NaN where not scored), ``noisy`` (True/False, or None where the
    source does not say) and ``reasons`` (why a sample was not scored, else None)."""

    keys: list[str]
    scores: np.ndarray
    noisy: list[bool | None]
    reasons: list[str | None]

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.scores)


def _chunk_path(cache: Path, start: int) -> Path:
    return cache / f"scores-{start:010d}.json"


def check_cache(cache: Path, identity: dict) -> None:
    """Create the cache's manifest, or refuse (``ValueError`` naming both) a cache written for another model or data."""
    path = cache / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != identity:
            differ = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            raise ValueError(f"{cache} holds scores of another filter run ({', '.join(f'{k}: {found.get(k)!r}' for k in differ)}; "
                             f"this run: {', '.join(f'{k}: {identity.get(k)!r}' for k in differ)}): start over with --overwrite")  # fmt: skip
    else:
        write_text_atomic(json.dumps(identity, indent=1), path)


def _score_chunk(source: Source, indices: range, encode_images: Callable, encode_texts: Callable, batch_size: int) -> dict:
    keys, noisy, reasons, pairs = [], [], [], []
    for index in indices:
        key = f"#{index}"
        try:
            sample: RawSample = source.load(index)
            key = sample.key
            if sample.raw_caption is None:
                raise SampleError(key, "no raw caption to score")
            pairs.append((len(keys), decode_image(sample.image, key), sample.raw_caption))
            flag = sample.meta.get("noisy") if isinstance(sample.meta, dict) else None
            reasons.append(None)
        except SampleError as err:
            flag, key = None, err.key
            reasons.append(err.reason)
        keys.append(key)
        noisy.append(None if flag is None else bool(flag))
    scores: list[float | None] = [None] * len(keys)
    for start in range(0, len(pairs), batch_size):
        part = pairs[start : start + batch_size]
        images = np.asarray(encode_images([image for _, image, _ in part]), dtype=np.float64)
        texts = np.asarray(encode_texts([caption for _, _, caption in part]), dtype=np.float64)
        cosine = (images * texts).sum(1) / (np.linalg.norm(images, axis=1) * np.linalg.norm(texts, axis=1))
        for (slot, _, _), value in zip(part, cosine.tolist()):
            scores[slot] = value
    return {"start": indices.start, "keys": keys, "scores": scores, "noisy": noisy, "reasons": reasons}


def score_pairs(source: Source, encode_images: Callable[[list[np.ndarray]], object], encode_texts: Callable[[list[str]], object],
                cache: str | Path, *, identity: dict | None = None, chunk_size: int = 512, batch_size: int = 64,
                progress: bool = True) -> PairScores:  # fmt: skip
    """Every pair of ``source`` scored (see the module docstring), through the chunk cache in ``cache``: chunks already
    there are read, the rest computed and written one by one. ``identity`` (what the scores depend on: the model, the
    data) goes into the cache's manifest with the chunk size; a cache of another identity is refused."""
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be at least 1, got {chunk_size} and {batch_size}")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    check_cache(cache, {**(identity or {}), "samples": len(source), "chunk_size": chunk_size})
    starts = range(0, len(source), chunk_size)
    done = [s for s in starts if _chunk_path(cache, s).is_file()]
    chunks: dict[int, dict] = {}
    with tqdm(total=len(source), initial=sum(min(chunk_size, len(source) - s) for s in done), desc="scoring pairs",
              unit="pair", disable=not progress) as bar:  # fmt: skip
        for start in starts:
            path = _chunk_path(cache, start)
            if path.is_file():
                chunks[start] = json.loads(path.read_text())
                continue
            chunk = _score_chunk(source, range(start, min(start + chunk_size, len(source))), encode_images, encode_texts, batch_size)
            write_text_atomic(json.dumps(chunk), path)
            chunks[start] = chunk
            bar.update(len(chunk["keys"]))
    keys = [k for s in starts for k in chunks[s]["keys"]]
    scores = np.array([math.nan if v is None else v for s in starts for v in chunks[s]["scores"]], dtype=np.float64)
    noisy = [v for s in starts for v in chunks[s]["noisy"]]
    reasons = [v for s in starts for v in chunks[s]["reasons"]]
    return PairScores(keys, scores, noisy, reasons)


def select_pairs(scores: np.ndarray, *, keep_fraction: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Sorted indices of the kept pairs: the ``round(f·n)`` best of the ``n`` scored ones (``keep_fraction`` f; equal
    scores in index order), or those scoring at least ``threshold``. Unscored pairs (NaN) are never kept."""
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of keep_fraction and threshold")
    valid = np.flatnonzero(~np.isnan(scores))
    if threshold is not None:
        return valid[scores[valid] >= threshold]
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    order = valid[np.argsort(-scores[valid], kind="stable")]
    return np.sort(order[: round(keep_fraction * len(valid))])


def noise_report(pairs: PairScores, kept: np.ndarray) -> dict | None:
    """The filter as a detector of noisy pairs, when every scored pair says whether it is noisy: ``precision`` (of the
    scored pairs it dropped, the fraction noisy), ``recall`` (of the noisy pairs, the fraction dropped), and the noise
    fraction before and after. None when the source does not flag its pairs."""
    scored = np.flatnonzero(pairs.scored)
    flags = [pairs.noisy[i] for i in scored]
    if not len(scored) or any(f is None for f in flags):
        return None
    noisy = np.zeros(len(pairs.scores), dtype=bool)
    noisy[scored] = flags
    dropped = np.setdiff1d(scored, kept)
    return {"noisy_scored": int(noisy[scored].sum()), "dropped": int(len(dropped)),
            "precision": float(noisy[dropped].mean()) if len(dropped) else math.nan,
            "recall": float(noisy[dropped].sum() / noisy[scored].sum()) if noisy[scored].any() else math.nan,
            "noise_before": float(noisy[scored].mean()), "noise_after": float(noisy[kept].mean()) if len(kept) else math.nan}  # fmt: skip


def write_csv_subset(source, kept: np.ndarray, scores: np.ndarray, path: str | Path, *, score_column: str = "clip_score") -> Path:
    """The kept rows of a :class:`~siclip.data.tabular.CsvSource`, in their order, with every original column and the
    score column, written atomically (tab-separated for ``.tsv``). Relative image paths are rewritten relative to the new
    file's directory, so they still name the same images."""
    import csv
    import io

    path = Path(path)
    header = list(source.columns)
    if score_column in header:
        raise ValueError(f"{source.path} already has a column {score_column!r}")
    rows = []
    for i in kept:
        row = [source.columns[name][i] for name in header]
        image = source.columns[source.image_key][i]
        if image and not os.path.isabs(image):
            row[header.index(source.image_key)] = os.path.relpath((source.root / image).resolve(), path.parent.resolve())
        rows.append([*row, repr(float(scores[i]))])
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if path.suffix.lower() in (".tsv", ".tab") else ",", lineterminator="\n")
    writer.writerow([*header, score_column])
    writer.writerows(rows)
    return write_text_atomic(buffer.getvalue(), path)


def write_indices(indices: np.ndarray, path: str | Path) -> Path:
    """A subset as a JSON list of sample indices (what ``DataConfig.subset`` reads), written atomically."""
    return write_text_atomic(json.dumps([int(i) for i in indices]), path)


def read_indices(path: str | Path, size: int) -> list[int]:
    """The sample indices a subset file lists (a JSON list of distinct integers in ``[0, size)``); a ``ValueError``
    naming the file otherwise."""
    path = Path(path)
    try:
        indices = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON list of sample indices ({err})") from None
    if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{path}: expected a non-empty JSON list of sample indices (integers), as siclip filter writes")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"{path}: indices {bad[:5]} are outside the source's {size} samples: a subset of other data?")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{path}: an index is listed twice")
    return indices
