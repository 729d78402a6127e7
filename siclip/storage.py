"""Files on disk: one atomic writer and one weights-only reader, for every checkpoint, model and record siclip writes.

    with atomic_write(path) as f:            # a unique temporary file beside ``path``, renamed over it when complete
        f.write(data)
    save_atomic({"step": 3, ...}, path)      # torch.save through atomic_write
    payload = load_weights(path, what="teacher", hint="pass a siclip checkpoint or Apple's mobileclip_s0.pt")

**Writing.** The temporary file has a unique name (``.NAME.XXXXXXXX.tmp`` in the same directory, so two writers never
share one and the rename stays on one file system); it is flushed and fsync'ed, then renamed over ``path``, so a
reader sees the old file or the new one, never half of one. If anything fails (an exception, a signal's
``KeyboardInterrupt``) the temporary file is removed and ``path`` is untouched; a full disk or quota raises
:class:`DiskFull`: "no space left on device while writing PATH; the previous file is intact".

**Reading.** :func:`load_weights` is ``torch.load(weights_only=True)`` on the CPU, so nothing in the file can run code;
torch's legacy (non-zip) format loads too, never through ``mmap`` (which refuses it). A file it cannot use raises one
:class:`CheckpointError` naming the file, what is wrong with it, and the caller's ``hint`` (what to do):

| the file | the message says |
|---|---|
| missing, a directory | not found / is a directory |
| 0 bytes | empty: cut off while being written, or never written |
| objects other than tensors and plain values (a pickle that would run code) | refused; what it would import; how to re-save trusted weights |
| a torch archive (zip or legacy) that fails to read | damaged: truncated or overwritten |
| anything else (random bytes, text, a plain pickle) | not a PyTorch weights file (what it starts with) |
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from siclip.errors import FULL_DISK, RunFailed, UserError

# torch.save's legacy (pre-1.6, non-zip) format opens with this number, pickled with protocol 2 (torch/serialization.py).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
TRUST_HINT = ("if you trust its source, load it with torch.load(path, weights_only=False) in your own code and "
              "torch.save its state_dict()")  # fmt: skip


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that cannot be used; the message names the file, the problem and what to do."""


class DiskFull(RunFailed, OSError):
    """A write ran out of space (or quota); the file it would have replaced is intact."""

    errno = errno.ENOSPC


def _full_disk(err: BaseException) -> bool:
    """A full disk anywhere in ``err``'s chain (torch.save wraps the OSError in a RuntimeError of its zip writer)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            return True
        err = err.__cause__ or err.__context__
    return False


def _create_unique(path: Path) -> tuple[int, Path]:
    """A new file ``.NAME.<random>.tmp`` beside ``path``, opened for writing; created with mode 0o666 so the umask
    applies as to any file (``tempfile.mkstemp`` would make it 0o600, unreadable to the group)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # another writer's name: draw again
            continue


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file object writing a unique temporary file beside ``path``, renamed over ``path`` when the block ends
    normally, removed otherwise (see the module docstring); the parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_unique(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _full_disk(err):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written there"
            raise DiskFull(f"no space left on device while writing {path}; {kept}") from None
        raise


def save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to ``path`` through :func:`atomic_write`: never half a file, never a shared temporary."""
    with atomic_write(path) as f:
        torch.save(payload, f)
    return Path(path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def _kind(path: Path, head: bytes) -> str:
    """"zip", "legacy" (torch.save's two formats) or a short description of what the file starts with."""
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):  # a cut archive keeps its first header
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if head[:1] == b"\x80":
        return "a Python pickle that torch.save did not write"
    if head.lstrip()[:1] in (b"{", b"["):
        return "text that looks like JSON"
    printable = sum(32 <= b < 127 or b in b"\t\r\n" for b in head)
    return "text" if head and printable == len(head) else f"bytes starting {head[:8].hex(' ')}"


def load_weights(path: str | Path, *, what: str = "weights file", hint: str = "", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``; every file it cannot use raises one
    :class:`CheckpointError` (or ``FileNotFoundError``): "``what`` PATH …: the problem; ``hint``" (module docstring).
    ``mmap``: a zip archive's tensors are mapped from the file, not read (a header look at a large file); a legacy
    file, which cannot be mapped, is read whole."""
    path = Path(path)
    do = f"; {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}{do}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file{do}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): it was cut off while being written or never written{do}")
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _kind(path, head) == "zip")
    except pickle.UnpicklingError as err:
        problem = _unpickling_problem(err)
        kind = _kind(path, head)
        if kind in ("zip", "legacy") and problem is not None:
            raise CheckpointError(f"{what} {path} holds objects other than tensors and plain values ({problem}); it was not loaded, "
                                  f"since loading it could run code from the file: {TRUST_HINT}{do}") from None  # fmt: skip
        raise CheckpointError(_unreadable(what, path, size, kind, err) + do) from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes fail anywhere in the unpickler (EOFError, KeyError, struct.error…)
        raise CheckpointError(_unreadable(what, path, size, _kind(path, head), err) + do) from None


def _unpickling_problem(err: pickle.UnpicklingError) -> str | None:
    """The line of a weights-only refusal that names what the file would import or build, or None when the
    unpickler stopped on an opcode it does not know (bytes that are no torch pickle)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.split(" ")[:4] or "Unsupported class" in line]
    return named[0].rstrip(".") if named else None


def _unreadable(what: str, path: Path, size: int, kind: str, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    if kind in ("zip", "legacy"):
        return (f"{what} {path} ({size} bytes) is damaged: a torch.save {'archive' if kind == 'zip' else 'file'} that cannot be "
                f"read ({type(err).__name__}: {first}); it was truncated or overwritten")  # fmt: skip
    return f"{what} {path} ({size} bytes) is not a PyTorch weights file: it holds {kind}"
