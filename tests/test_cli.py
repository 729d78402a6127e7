"""siclip.cli and siclip.errors: argument types, and how a script ends on each kind of exception."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siclip import cli
from siclip.errors import Interrupted, RunFailed, UserError, exit_status, user_input

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, text, problem", [
    (cli.positive_int, "0", "must be at least 1, got 0"), (cli.positive_int, "-3", "at least 1"), (cli.positive_int, "2.5", "whole number"),
    (cli.non_negative_int, "-1", "at least 0"), (cli.int_at_least(2), "1", "at least 2"),
    (cli.positive_float, "0", "greater than 0"), (cli.positive_float, "nan", "finite"), (cli.positive_float, "inf", "finite"),
    (cli.positive_float, "x", "expected a number"), (cli.fraction, "1.5", r"fraction in \[0, 1\]"), (cli.fraction, "-0.1", "fraction"),
])  # fmt: skip
def test_argument_types_refuse_out_of_range_values(kind, text, problem):
    with pytest.raises(argparse.ArgumentTypeError, match=problem):
        kind(text)


def test_argument_types_accept_their_range_and_check_paths(tmp_path):
    assert (cli.positive_int("3"), cli.non_negative_int("0"), cli.fraction("1"), cli.positive_float("1e-4")) == (3, 0, 1.0, 1e-4)
    (tmp_path / "f.txt").write_text("x")
    assert cli.existing_file(str(tmp_path / "f.txt")) == str(tmp_path / "f.txt")
    assert cli.existing_dir(str(tmp_path)) == cli.existing_path(str(tmp_path)) == str(tmp_path)
    for check, path, problem in [(cli.existing_file, tmp_path / "nope", "file not found"), (cli.existing_file, tmp_path, "is not a file"),
                                 (cli.existing_dir, tmp_path / "f.txt", "is not a directory"),
                                 (cli.existing_path, tmp_path / "nope", "file not found")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=f"{problem}"):
            check(str(path))
    checked = cli.checked(lambda text: int(text))
    with pytest.raises(argparse.ArgumentTypeError, match="invalid literal"):
        checked("x")


def _ends(main, capsys, argv=None):
    status = cli.run(main, argv)
    return status, capsys.readouterr().err


def test_run_ends_each_kind_of_exception_as_its_table_says(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])

    def raising(err):
        def main(argv):
            raise err

        return main

    assert _ends(lambda argv: 0, capsys) == (0, "") and _ends(lambda argv: None, capsys) == (0, "")
    assert _ends(raising(UserError("bad --x: try 3")), capsys) == (2, "tool.py: error: bad --x: try 3\n")
    assert _ends(raising(RunFailed("stopped at step 4\nreport line")), capsys) == (1, "tool.py: error: stopped at step 4\n  report line\n")
    assert _ends(raising(FileNotFoundError("data.csv not found")), capsys) == (2, "tool.py: error: data.csv not found\n")
    assert _ends(raising(Interrupted(signal.SIGTERM, "SIGTERM at step 3: saved")), capsys) == (143, "tool.py: SIGTERM at step 3: saved\n")
    assert _ends(raising(KeyboardInterrupt()), capsys) == (130, f"tool.py: interrupted by SIGINT: {cli.NOTHING_SAVED}\n")

    def hinted(argv):
        cli.on_interrupt(lambda: "the checkpoint is kept: continue with --resume")
        raise KeyboardInterrupt

    assert _ends(hinted, capsys) == (130, "tool.py: interrupted by SIGINT: the checkpoint is kept: continue with --resume\n")

    def reads_input(argv):
        with user_input():
            raise ValueError("rows.csv: line 3 has 2 fields")

    assert _ends(reads_input, capsys) == (2, "tool.py: error: rows.csv: line 3 has 2 fields\n")
    with pytest.raises(ValueError, match="a bug"):  # outside user_input a ValueError is a bug: its traceback stays
        cli.run(raising(ValueError("a bug")))
    assert _ends(raising(SystemExit(2)), capsys) == (2, "") and _ends(raising(SystemExit("gone")), capsys) == (1, "gone\n")
    monkeypatch.setenv("SICLIP_TRACEBACK", "1")
    status, err = _ends(raising(UserError("shown with its traceback")), capsys)
    assert status == 2 and "Traceback" in err and err.endswith("tool.py: error: shown with its traceback\n")


def test_run_turns_sigterm_into_one_line_with_the_hint_and_restores_the_handler(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])
    before = signal.getsignal(signal.SIGTERM)

    def main(argv):
        cli.on_interrupt("runs/x keeps its checkpoint: run again")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    started = time.perf_counter()
    assert _ends(main, capsys) == (143, "tool.py: interrupted by SIGTERM: runs/x keeps its checkpoint: run again\n")
    assert time.perf_counter() - started < 4 and signal.getsignal(signal.SIGTERM) == before


def test_user_input_marks_without_changing_the_type_and_keeps_a_run_failure():
    with pytest.raises(ValueError) as caught:
        with user_input():
            raise ValueError("x")
    assert exit_status(caught.value) == 2 and type(caught.value) is ValueError

    class Stopped(RunFailed, ValueError):
        pass

    with pytest.raises(Stopped) as stopped:
        with user_input():
            raise Stopped("y")
    assert exit_status(stopped.value) == 1
    assert exit_status(RuntimeError("bug")) is None and exit_status(OSError(28, "No space left on device")) == 1


def _resident_mb(status: Path) -> float:
    try:
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the child's resident size from /proc")
def test_a_ctrl_c_while_a_script_imports_ends_in_one_line(tmp_path):
    """A Ctrl-C during start-up ended in a KeyboardInterrupt traceback from inside torch's import."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train.py"), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's Ctrl-C, whatever pytest's is  # fmt: skip
    # Signal once torch is loading (its libraries take the resident size past 100 MB; siclip.cli, imported first,
    # is in by then): a fixed delay sent it before the script began when a busy machine was slow to start Python.
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and _resident_mb(status) < 100:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("train.py: interrupted by SIGINT") and len(err.strip().splitlines()) == 1, err


def test_a_ctrl_c_noted_while_importing_stops_the_script_before_main(capsys):
    """While a script imports, SIGINT is only noted (a library's broad ``except`` around an import once swallowed the
    KeyboardInterrupt and the run went on); cli.run acts on it before main. Anything but a checkout script keeps
    Python's Ctrl-C: this test process is pytest."""
    assert not cli._started_as_a_siclip_script() and signal.getsignal(signal.SIGINT) is not cli._defer_interrupt
    called = []
    cli._deferred.append(signal.SIGINT)
    try:
        status = cli.run(lambda argv: called.append(argv))
    finally:
        cli._deferred.clear()
    assert status == 130 and not called
    assert "interrupted by SIGINT: nothing was saved" in capsys.readouterr().err
