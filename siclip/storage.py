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

The refusal of a pickle never suggests loading it anyway: it names what the file would import, and the way out
(the tensors alone, re-saved from a copy the user trusts).

**Where a command writes** (:func:`check_output`, before any work): nothing is deleted that a command did not create.

| the destination | what happens |
|---|---|
| absent, an empty folder, or an earlier result of the same command (``ours``) | written (an earlier result replaced) |
| a folder or file holding anything else | refused, naming it and ``--overwrite``; with ``--overwrite`` replaced whole |
| one of the command's inputs, a folder holding one, or a file already in an input folder | refused (``--data X --out X``; convert over the weights it converts) |
| the folder you are in, one above it, your home or ``/`` (``--out .``) | refused: replacing it would delete where you stand |
| a device, socket, pipe or symbolic link (``/dev/full``) | refused: not a plain file or folder |
| a file where a folder is written, or the other way round | refused |

A folder is built under a hidden name beside its destination (:func:`building_directory`) and put in place by
:func:`replace_directory`: one ``renameat2(RENAME_EXCHANGE)`` swaps the new folder with the old one (Linux ≥ 3.15), so
at every instant the destination holds one complete result, and only then is the old one deleted. Where the
exchange is not available the old folder is renamed aside first; a kill in the microseconds between the two renames
leaves it complete under ``.NAME.old-*``, and the next command writing there (or :func:`recover_directory`) puts it
back. Hidden leftovers of a killed writer (``.NAME.tmp-PID-*`` of a dead PID, ``.NAME.old-*`` beside a complete
result) are ours, and are removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import secrets
import shutil
import stat
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import torch

from siclip.errors import FULL_DISK, RunFailed, UserError

# torch.save's legacy (pre-1.6, non-zip) format opens with this number, pickled with protocol 2 (torch/serialization.py).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
TRUST_HINT = "save only its tensors (a state_dict) from a copy whose source you trust, and pass that file"


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that cannot be used; the message names the file, the problem and what to do."""


class OutputRefused(UserError, FileExistsError):
    """A destination a command will not write: it holds what the command did not write, is one of its inputs, or
    is no plain file or folder; the message names it and the way out (another path, or ``--overwrite``)."""


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
    refuse_special(path, "file")
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
        interrupt = _interrupt_in_chain(err)
        if interrupt is not None and interrupt is not err:
            # A signal that landed inside torch.save's zip writer comes out as the writer's own error when it closes
            # the half-written archive ("enforce fail at inline_container.cc … unexpected pos"): the write was
            # abandoned and the previous file is intact; what ends the command is the signal.
            raise interrupt from None
        raise


def _interrupt_in_chain(err: BaseException) -> BaseException | None:
    """The ``KeyboardInterrupt`` (or :class:`~siclip.errors.Interrupted`) that ``err`` is, or was raised while handling."""
    from siclip.errors import Interrupted

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            return err
        err = err.__context__
    return None


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
    # Only what it would import: torch's advice that follows (allow-listing the global) is no advice for a file handed over.
    return named[0].split(". Please")[0].split(" was not an allowed global")[0].rstrip(".") if named else None


def _unreadable(what: str, path: Path, size: int, kind: str, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    if kind in ("zip", "legacy"):
        return (f"{what} {path} ({size} bytes) is damaged: a torch.save {'archive' if kind == 'zip' else 'file'} that cannot be "
                f"read ({type(err).__name__}: {first}); it was truncated or overwritten")  # fmt: skip
    return f"{what} {path} ({size} bytes) is not a PyTorch weights file: it holds {kind}"


# Destinations.

_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFIFO: "a named pipe",
          stat.S_IFLNK: "a symbolic link"}  # fmt: skip


def refuse_special(path: Path, kind: str, flag: str = "") -> None:
    """Refuse ``path`` when it exists as anything but a plain file or folder: a rename over a device replaces the
    device (as root, ``/dev/full`` became a regular file), one over a symbolic link the link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    what = _KINDS.get(stat.S_IFMT(mode), "not a plain file or folder")
    name = f"{flag} {path}" if flag else str(path)
    raise OutputRefused(f"{name} is {what}, not a plain {kind}: name a {kind} to write")


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _contents(path: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output(path: str | Path, *, kind: str = "folder", ours: Callable[[Path], bool] | None = None, overwrite: bool = False,
                 inputs: Iterable[str | Path | None] = (), flag: str = "--out") -> Path:  # fmt: skip
    """``path`` when a command may write its result there (see the module docstring's table), else
    :class:`OutputRefused` naming it, the flag and ``--overwrite``; checked before any work.

    ``kind``: ``"folder"`` (replaced whole) or ``"file"``. ``ours(path)``: whether what is there is an earlier result
    of this command (replaced without ``--overwrite``). ``inputs``: paths the command reads (None entries ignored)."""
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
    path = Path(path)
    refuse_special(path, kind, flag)
    target = _resolved(path)
    if kind == "folder":
        recover_directory(path)
        here = _resolved(Path.cwd())
        if here == target or here.is_relative_to(target) or target == _resolved(Path.home()) or target.parent == target:
            raise OutputRefused(f"{flag} {path} is {'the folder you are in' if here == target else 'a folder holding the one you are in'}: "
                                f"its contents would be replaced; name a new folder for the result (e.g. {flag} {Path(path, 'result')})")  # fmt: skip
    for source in inputs:
        if source is None or not str(source):
            continue
        source = _resolved(source)
        inside_input = source.is_dir() and target.is_relative_to(source) and path.exists()  # a file of the input, replaced
        if source == target or (kind == "folder" and source.is_relative_to(target)) or inside_input:
            what = ("is one of this command's inputs" if source == target else f"is in {source}, one of this command's inputs" if inside_input
                    else f"holds {source}, one of this command's inputs")  # fmt: skip
            raise OutputRefused(f"{flag} {path} {what}: writing there would destroy what it reads; choose another {flag}")
    if not path.exists():
        return path
    if kind == "folder" and not path.is_dir():
        raise OutputRefused(f"{flag} {path} exists and is a file, not a folder: name a folder to write")
    if kind == "file" and path.is_dir():
        raise OutputRefused(f"{flag} {path} is a folder: name the file to write")
    empty = kind == "folder" and not any(path.iterdir())
    if empty or overwrite or (ours is not None and ours(path)):
        return path
    held = f"holds files it did not write ({_contents(path)})" if kind == "folder" else "is a file it did not write"
    replaced = "the folder and everything in it" if kind == "folder" else "the file"
    raise OutputRefused(f"{flag} {path} {held}: choose another {flag}, or pass --overwrite to replace {replaced}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(built: str | Path, out: str | Path) -> Path:
    """Put the complete folder ``built`` at ``out`` (a sibling of it), replacing what is there so that ``out`` always
    holds one complete result: an atomic exchange, then the old folder deleted (module docstring). The caller has
    checked ``out`` (:func:`check_output`)."""
    built, out = Path(built), Path(out)
    recover_directory(out)
    if not out.exists():
        os.rename(built, out)
        return out
    if out.is_dir() and _exchange(built, out):
        shutil.rmtree(built)  # the old result, now under the temporary name
        return out
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, old)
    os.rename(built, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out


def recover_directory(out: str | Path) -> None:
    """Undo what a killed :func:`replace_directory` left: ``out`` missing and the old result under ``.NAME.old-*``
    (put back); old results beside a complete ``out``, and temporary folders of writers no longer running, removed."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    old_prefix, tmp_prefix = f".{out.name}.old-", f".{out.name}.tmp-"
    entries = [p for p in parent.iterdir() if p.name.startswith((old_prefix, tmp_prefix)) and p.is_dir() and not p.is_symlink()]
    olds = sorted((p for p in entries if p.name.startswith(old_prefix)), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.rename(olds.pop(), out)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (p for p in entries if p.name.startswith(tmp_prefix)):
        pid = tmp.name.removeprefix(tmp_prefix).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def building_directory(out: str | Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` (``.NAME.tmp-PID-XXXXXXXX``) to build a result in; put at ``out`` by
    :func:`replace_directory` when the block ends normally, removed otherwise (a signal included)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    built.mkdir()  # mkdir, not mkdtemp: the user's umask applies
    try:
        yield built
        replace_directory(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
