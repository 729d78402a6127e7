"""What every study driver shares: a resumable study folder, and cells that are trained and evaluated once.

A study is a folder: ``preset.json`` (the preset it was started with) and one run folder per cell and seed, each
finished when its ``outcomes.npz`` (per-item evaluation outcomes, :mod:`siclip.analysis.stats`) exists. So:

- running the same command again continues it (finished runs are read, an interrupted one resumes from its checkpoint);
- more (or fewer) seeds continue the same study (``ignored`` fields of the record, e.g. the seed count, may differ);
- another preset in the same folder is refused, before any work (its finished runs belong to another study);
- ``report`` reads what has finished and trains nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from siclip.errors import UserError


class StudyRefused(UserError, ValueError):
    """The study folder cannot be used for this study (another preset's, not a folder, nothing to report)."""


def _comparable(record: dict, ignored: tuple[str, ...]) -> dict:
    """``record`` without the ``ignored`` keys, looked up at any depth (a nested preset's ``seeds`` too)."""
    return {k: _comparable(v, ignored) if isinstance(v, dict) else v for k, v in record.items() if k not in ignored}


def open_study(out: Path, record: dict, *, report: bool = False, ignored: tuple[str, ...] = ("seeds",)) -> Path:
    """Check (and, unless ``report``, create) the study folder ``out`` for the preset ``record``; returns ``out``.

    Refused (:class:`StudyRefused`, naming the folder and the file): ``out`` is not a folder, it holds a study of another
    preset (records that differ outside ``ignored``), or ``report`` is asked of a folder with no study."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyRefused(f"--out: {out} exists and is not a directory")
    saved = out / "preset.json"
    if saved.is_file():
        found = json.loads(saved.read_text())
        if _comparable(found, ignored) != _comparable(json.loads(json.dumps(record)), ignored):
            raise StudyRefused(f"{out} holds a study of another preset ({saved}): choose another --out")
    elif report:
        raise StudyRefused(f"{out} holds no study yet ({saved} is missing): nothing to report")
    if not report:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(record, indent=1))
    return out


def finished(run_dir: Path) -> bool:
    """A run is finished when its evaluation outcomes are saved (written last, atomically)."""
    return (Path(run_dir) / "outcomes.npz").is_file()


__all__ = ["StudyRefused", "finished", "open_study"]
