"""The command-line scripts' shared helper: argument types that check ranges and files, and one way to end.

    import argparse
    import sys

    from siclip import cli  # import it before torch: a Ctrl-C while the rest imports then ends in one line

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--epochs", type=cli.positive_int)            # an int ≥ 1
        parser.add_argument("--workers", type=cli.non_negative_int)       # an int ≥ 0
        parser.add_argument("--batch-size", type=cli.int_at_least(2))     # any lower bound
        parser.add_argument("--count", type=cli.int_in_range(2, 4096))    # both bounds (a size allocated from it)
        parser.add_argument("--lr", type=cli.positive_float)              # a finite float > 0
        parser.add_argument("--gain", type=cli.float_in_range(0, 10, above_low=True))  # a finite float in (0, 10]
        parser.add_argument("--weight-decay", type=cli.non_negative_float)  # a finite float ≥ 0
        parser.add_argument("--device", type=cli.device)                  # auto, cpu, cuda, cuda:N (one this machine has)
        parser.add_argument("--p-synthetic", type=cli.fraction)           # a float in [0, 1]
        parser.add_argument("--classnames", type=cli.existing_file)       # a readable file (the str given)
        parser.add_argument("--images", type=cli.existing_dir)            # a directory
        parser.add_argument("--zeroshot", type=cli.existing_path)         # either
        parser.add_argument("--teacher", type=cli.checked(check_model_spec))  # any checker raising ValueError/OSError
        args = parser.parse_args(argv)                                    # a bad value: usage, exit 2
        cli.on_interrupt(f"the checkpoint in {args.out} is kept: continue with --resume")  # or a callable
        with cli.user_input():  # ValueError, LookupError, OSError raised here are the user's input: exit 2
            model = load(args.model)
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(cli.run(main))

:func:`run` calls ``main(argv)`` and ends it as :mod:`siclip.errors` says: 0 (or what ``main`` returns); 2 with
``SCRIPT: error: message`` for the user's errors; 1 with ``SCRIPT: error: message`` for a run that stopped on a
failure it names; on SIGINT or SIGTERM ``SCRIPT: message`` with where the state is and how to continue (the
exception's own message, else the hint given to :func:`on_interrupt`), and status 128 + the signal; a ``SystemExit``
(argparse's usage error, ``--help``) its code. A message's
further lines (a skip report, a list of keys) follow, indented. Any other exception is a bug and keeps its traceback;
``SICLIP_TRACEBACK=1`` prints the traceback before the line for every exception. Argument types raise
``argparse.ArgumentTypeError``: argparse's usage error, status 2. ``SCRIPT`` is the script's file name, as argparse
names it.

Importing this module installs one ``sys.excepthook`` (only over Python's default): a ``KeyboardInterrupt`` that ends
the process before :func:`run` took over (a Ctrl-C while torch imports) prints one line instead of a traceback; the
process still ends by SIGINT. Foreign-free, so a script imports it first, at no cost.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

from siclip.errors import Interrupted, RunFailed, UserError, exit_status, user_input

__all__ = ["Interrupted", "RunFailed", "UserError", "add_renamed", "checked", "device", "existing_dir", "existing_file", "existing_path", "finite_float",
           "float_in_range", "fraction", "int_at_least", "int_in_range", "non_negative_float", "non_negative_int", "on_interrupt", "positive_float",
           "note_renamed", "positive_int", "renamed", "resolved_device", "run", "script_name", "user_input"]  # fmt: skip

NOTHING_SAVED = "nothing was saved: run the command again"
_hint: str | Callable[[], str] = NOTHING_SAVED


def script_name() -> str:
    """The running script's name, as argparse names it in its messages: the file name (``train.py``), or the
    command and subcommand (``siclip train``) when :mod:`siclip.commands` dispatched it."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


# Argument types.


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int ≥ ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int ≥ {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int in [``low``, ``high``]; for a count or size something is allocated from, so an
    absurd value is refused before anything is (``1e9`` images, ``10**12`` samples)."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {value:,}")
        return value

    parse.__name__ = f"int in [{low}, {high}]"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: any finite float."""
    return _float(text)


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def float_in_range(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [``low``, ``high``] (``above_low``: in (``low``, ``high``])."""

    def parse(text: str) -> float:
        value = _float(text)
        if value < low or (above_low and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if above_low else '['}{low:g}, {high:g}], got {value:g}")
        return value

    parse.__name__ = f"float in [{low:g}, {high:g}]"
    return parse


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float ≥ 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value:g}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a float in [0, 1]."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {value:g}")
    return value


def _existing(text: str, is_kind: Callable[[Path], bool], kind: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{kind} not found: {text}")
    if not is_kind(path):
        raise argparse.ArgumentTypeError(f"{text} is not a {kind}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
    return text


def existing_file(text: str) -> str:
    """An argparse type: the path of a readable file (returned as given)."""
    return _existing(text, Path.is_file, "file")


def existing_dir(text: str) -> str:
    """An argparse type: the path of a readable directory (returned as given)."""
    return _existing(text, Path.is_dir, "directory")


def existing_path(text: str) -> str:
    """An argparse type: a readable file or a directory (returned as given)."""
    return existing_dir(text) if Path(text).is_dir() else existing_file(text)


def resolved_device(text: str):
    """The ``torch.device`` a :func:`device`-checked argument names: ``auto`` is CUDA when available, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else torch.device(text)


def device(text: str) -> str:
    """An argparse type: ``auto`` (CUDA when there is one) or a device torch knows and this machine has (``cpu``,
    ``cuda``, ``cuda:1``); the text as given. Imports torch only when called."""
    if text == "auto":
        return text
    import torch

    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (auto, cpu, cuda, cuda:1, …)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"device {text}: no CUDA device is available here (use cpu)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def checked(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from any checker: ``check(text)``'s result, its ``ValueError``/``OSError`` a usage error."""

    def parse(text: str):
        try:
            return check(text)
        except (ValueError, OSError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


# Renamed flags.


def note_renamed(prog: str, change: str, old: str = "spelling") -> None:
    """Say once, on stderr, that an argument changed (``change``: "--x is now --y"), and that the old ``old`` (spelling,
    form) goes in the next release: the one wording of every renamed flag and positional argument."""
    print(f"{prog}: note: {change}; the old {old} goes in the next release", file=sys.stderr, flush=True)


def renamed(new: str) -> type[argparse.Action]:
    """An argparse action for an old spelling of ``new``: it stores the value as ``new`` does and says once, on stderr,
    that the spelling changed, so a script keeps working for one release and its author learns the new name."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            note_renamed(parser.prog, f"{option_string} is now {new}")
            setattr(namespace, self.dest, values)

    return Renamed


def add_renamed(parser, *old: str, new: str, dest: str, **options) -> None:
    """Keep ``old`` spellings of the flag ``new`` working, out of the help (``options``: its type, nargs…)."""
    parser.add_argument(*old, dest=dest, action=renamed(new), help=argparse.SUPPRESS, default=options.pop("default", None), **options)


# Ending.


def on_interrupt(hint: str | Callable[[], str]) -> None:
    """What a SIGINT or SIGTERM leaves behind and how to continue, said when one ends the script (a callable is
    asked then, so it can look at the disk). :func:`run` starts with "nothing was saved: run the command again"."""
    global _hint
    _hint = hint


def _hint_text() -> str:
    return _hint() if callable(_hint) else _hint


class _Signal(Interrupted):
    """A signal that reached the script outside any code that saves its state: :func:`on_interrupt`'s hint says more."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum, f"interrupted by {signal.Signals(signum).name}")


def _raise_on_signal(signum: int, frame) -> None:
    raise _Signal(signum)


def _line(prog: str, err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, _Signal):
        text = f"{text}: {_hint_text()}"
    first, *rest = text.splitlines()
    head = f"{prog}: {first}" if isinstance(err, Interrupted) else f"{prog}: error: {first}"
    return "\n".join([head, *(f"  {line}" for line in rest)])


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)``'s status, every ending turned into one line on stderr (see the module docstring)."""
    on_interrupt(NOTHING_SAVED)
    prog = script_name()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGINT) is _defer_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C interrupts where it lands
    previous = signal.signal(signal.SIGTERM, _raise_on_signal) if in_main_thread else None
    try:
        if _deferred:  # a Ctrl-C while the script imported: nothing has started
            raise KeyboardInterrupt
        return main(argv) or 0
    except SystemExit as done:  # argparse's usage error (2), --help (0), or the script's own sys.exit
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr, flush=True)
        return 1
    except BaseException as caught:  # noqa: BLE001 - sorted below; a bug is raised again
        err = _Signal(signal.SIGINT) if isinstance(caught, KeyboardInterrupt) else caught
        status = exit_status(err)
        if status is None:
            raise
        if os.environ.get("SICLIP_TRACEBACK"):
            traceback.print_exception(caught)
        print(_line(prog, err), file=sys.stderr, flush=True)
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_interrupt(kind, value, tb) -> None:
    """sys.excepthook: a KeyboardInterrupt before :func:`run` took over is one line; the rest as Python prints them."""
    if issubclass(kind, KeyboardInterrupt):
        print(f"{script_name()}: interrupted by SIGINT while starting: {NOTHING_SAVED}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # end by SIGINT, as Python itself ends on an uncaught Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
        return
    sys.__excepthook__(kind, value, tb)


if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _one_line_interrupt


# A Ctrl-C that lands inside a library's import can be swallowed there (a broad ``except`` around an optional import)
# and the script then runs on as if nothing happened. So while a siclip script imports, SIGINT is only noted, and
# :func:`run` acts on it before ``main`` starts. Only for the `siclip` command and this checkout's scripts (``experiments/``, ``benchmarks/``),
# all of which end through :func:`run`: anything else importing this module keeps Python's Ctrl-C.
_deferred: list[int] = []


def _defer_interrupt(signum: int, frame) -> None:
    _deferred.append(signum)


def _started_as_a_siclip_script() -> bool:
    file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not file:
        return False
    script = Path(file).resolve()
    if script.name in ("siclip", "siclip.exe") or script == Path(__file__).resolve().parent / "__main__.py":  # the console command
        return True
    return script.parent.name in ("experiments", "benchmarks") and script.parent.parent == Path(__file__).resolve().parent.parent


if (threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and _started_as_a_siclip_script()):  # fmt: skip
    signal.signal(signal.SIGINT, _defer_interrupt)
