"""Counts in words for what siclip prints: ``count(1, "thread")`` is "1 thread", ``count(2, "thread")`` "2 threads".

One helper, so no message says "1 groups" or "1 threads"; foreign-free, so any module may import it.
"""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, singular for exactly one (thousands separated: "2,000 samples"); ``plural`` where adding
    an "s" is wrong ("1 batch", "2 batches")."""
    many = plural if plural is not None else noun + "s"
    return f"{n:,} {noun if n == 1 else many}"


__all__ = ["count"]
