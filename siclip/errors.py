"""What ends a command, by whose move: the user's input, a run that stopped for a reason it names, a signal.

Exit status of a command-line script (:func:`siclip.cli.run`) by the exception that ends it:

| exception | status | meaning |
|---|---|---|
| :class:`UserError`, or a ``ValueError``/``LookupError``/``OSError`` raised inside :func:`user_input` | 2 | refused: a bad argument or input file, named in the message |
| :class:`MissingLibrary` (an ``ImportError`` from :func:`require`) | 2 | an optional library the input needs is not installed: the pip package named |
| ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError`` | 2 | the path is in the message |
| :class:`RunFailed`, an ``OSError`` of a full disk or quota | 1 | the work stopped on something it explains (a non-finite loss, data too damaged, a full disk, a lost peer) |
| :class:`Interrupted` | 128 + signal | SIGINT/SIGTERM; the message says where the state is and how to continue |
| anything else | traceback | a bug |

The classes carry their status as ``exit_status``; library exceptions take one by subclassing them next to their
usual base (``class CheckpointError(UserError, ValueError)``), so library callers still catch ``ValueError``.
This module is foreign-free: any layer may import it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
from typing import Iterator


class UserError(Exception):
    """Input the user must fix (an argument, a file, a directory in use); the message names it. Exit status 2."""

    exit_status = 2


class RunFailed(Exception):
    """Work that stopped for a reason its message names, with what was kept and where. Exit status 1."""

    exit_status = 1


class Interrupted(Exception):
    """SIGINT or SIGTERM ended the work; the message says where its state is and how to continue. Status 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


# Raised while a command reads what the user gave it, these are about that input (a missing file, a malformed table,
# an out-of-range value), not bugs: a script reports them in one line.
INPUT_ERRORS = (ValueError, LookupError, OSError)


@contextlib.contextmanager
def user_input(*more: type[BaseException]) -> Iterator[None]:
    """Mark ``ValueError``, ``LookupError`` and ``OSError`` (and the types in ``more``) escaping the block as the user's
    input errors (exit status 2).

    The exception keeps its type (library callers catch what they always caught); only ``exit_status = 2`` is set on
    it, unless it already has a status of its own (a :class:`RunFailed` stays 1)."""
    try:
        yield
    except (*INPUT_ERRORS, *more) as err:
        if exit_status(err) is None:
            err.exit_status = 2
        raise


# A file that is not there, not allowed or of the wrong kind: the message names its path wherever it comes from.
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# A full disk or quota stops the work; it is nobody's bug.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def exit_status(err: BaseException) -> int | None:
    """The status a script exits with for ``err`` (see the table above; file errors are 2, a full disk 1), or None
    for a bug (a traceback)."""
    status = getattr(err, "exit_status", None)
    if isinstance(status, int):
        return status
    if isinstance(err, FILE_ERRORS):
        return 2
    if isinstance(err, OSError) and err.errno in FULL_DISK:
        return 1
    return None


class MissingLibrary(UserError, ImportError):
    """An optional library the user's input needs is not installed; the message names the pip package. Exit status 2."""


def require(module: str, package: str, what: str):
    """Import an optional library for ``what``, or raise :class:`MissingLibrary` naming the pip package to install."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        found = False
    if not found:
        raise MissingLibrary(f"{what} needs the {package!r} package, which is not installed: pip install {package}")
    return importlib.import_module(module)
