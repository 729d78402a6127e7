"""Fault injection: attack the command-line scripts as a hostile world would; print what survived, per category.

    python benchmarks/fault_injection.py                          # every category once: 160+ cases
    python benchmarks/fault_injection.py --rounds 2               # the process faults (kills, signals…) twice
    python benchmarks/fault_injection.py --categories nan,bad-file --work /tmp/fi

Runs from a fresh clone (``PYTHONPATH`` is set to the checkout; nothing is downloaded). Training runs are
``experiments/train.py`` on a MobileCLIP-tiny (64 embedded samples, batch 16, 2 epochs = 8 steps); an uninterrupted
one gives the reference weights. Process faults run each script as its own process:

- ``sigkill``: SIGKILL after a random number of steps (a checkpoint every step, so kills land in writes too);
  ``--resume`` until the run finishes.
- ``sigint`` / ``sigterm``: the signal after a random number of steps: status 130 / 143, one line naming the step and
  the checkpoint, which holds that step; ``--resume`` finishes.
- ``second-sigint``: two Ctrl-Cs in a row: status 130 and one line; the checkpoint on disk stays readable.
- ``startup-signal``: SIGINT (or SIGTERM) while the script imports, parses or reads its inputs: one line (a SIGTERM
  before the script took over ends it as the default action does, silently), then the run still completes.
- ``corrupt``: the checkpoint truncated, emptied, overwritten with random bytes or JSON, or replaced by a pickle that
  runs code: ``--resume`` refuses in one line naming the file (status 2), runs nothing, and ``--overwrite`` starts over.
- ``nan``: an lr whose update overflows float32 (any step at it is non-finite, by construction): status 1, one line,
  no non-finite checkpoint; a NaN loss in step k + 1: the checkpoint written then is step k's true state, and
  ``--resume`` (the loss intact) ends on the reference weights; a teacher holding NaN: status 2, naming the file.
- ``second-run``: two runs started together in one directory: one trains, the other refuses naming its PID.
- ``disk-full``: the disk fills (writes of a checkpoint or model go to ``/dev/full``, ENOSPC from the kernel) after
  N checkpoints: status 1, "no space left on device while writing PATH; the previous checkpoint.pt is intact", no
  temporary file left; ``--resume`` on a free disk finishes.
- ``eval-signal``: SIGTERM during the final evaluation: status 143 at once; ``--resume`` evaluates.
- ``ddp-peer``: ``torchrun`` with two gloo ranks, one SIGKILLed mid-run: the other ends in one line.

Input faults run each script's ``main`` in this process, through :func:`siclip.cli.run` as its ``__main__`` does:

- ``bad-argument``: out-of-range values, missing files, contradictory flags, for every script: status 2, one line
  naming the argument, nothing created.
- ``bad-file``: pickles that would run code, in torch's zip and legacy formats, through every loader and every script
  that reads weights; empty, text, random, truncated and JSON files in their place: status 2, one line naming the file.
- ``bad-data``: Latin-1 and ragged CSVs, missing columns and images, decompression bombs, empty captions, cut shards,
  malformed benchmarks, ``--overwrite`` over a finished run with bad inputs: a clear refusal or a run that skips and
  reports; the old run is never deleted by a refused one.

A case **survives** when it ends as described, and, where it trains, with weights bit-identical to the reference.
**Lost**: a step the run had saved that could not be recovered (an unreadable checkpoint it wrote, metrics rows
written twice or missing, an old run deleted by a refused one). **Unclear**: a traceback, a status other than the
expected one, or no single ``SCRIPT: …`` line naming the argument or file. **Executed**: a malicious pickle ran.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from siclip import cli  # noqa: E402
from siclip.models import create_model, load_checkpoint, save_checkpoint  # noqa: E402
from siclip.storage import CheckpointError  # noqa: E402
from siclip.train.state import load_training_checkpoint  # noqa: E402

PROCESS = ("sigkill", "sigint", "sigterm", "second-sigint", "startup-signal", "corrupt", "nan", "second-run", "disk-full",
           "eval-signal", "ddp-peer")  # fmt: skip
INPUT = ("bad-argument", "bad-file", "bad-data")
CATEGORIES = PROCESS + INPUT
STEPS = 8
OVERFLOWING_LR = "1e300"  # AdamW's float32 update cannot be written at this lr: non-finite by construction
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@dataclass
class Outcome:
    survived: bool
    lost: bool = False
    unclear: bool = False
    executed: bool = False
    note: str = ""


# Running scripts.


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "train.py"), "--model", "mobileclip_tiny", "--num-train", "64",
            "--batch-size", "16", "--epochs", "2", "--out", str(out), "--no-eval", "--log-every", "1", *extra]  # fmt: skip


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *extra), capture_output=True, text=True, env=ENV)


def rows(out: Path) -> list[int]:
    path = out / "metrics.csv"
    try:
        return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:] if line]
    except (OSError, ValueError):
        return []


def rows_once(out: Path) -> bool:
    return rows(out) == list(range(1, STEPS + 1))


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def signal_after_rows(proc: subprocess.Popen, out: Path, signum: int, after_rows: int, then: float | None = None) -> tuple[int, str, int]:
    """Send ``signum`` once ``after_rows`` metrics rows exist (and again ``then`` seconds later); (status, stderr, rows when sent)."""
    while proc.poll() is None and len(rows(out)) < after_rows:
        time.sleep(0.02)
    done = len(rows(out))
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
        if then is not None:
            time.sleep(then)
            proc.send_signal(signum)
    _, err = proc.communicate()
    return proc.returncode, err, done


def last_line(err: str) -> str:
    lines = [line.split("\r")[-1] for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def message(err: str, script: str) -> str | None:
    """The script's closing message: its last line starting ``SCRIPT: ``, with the indented lines after it (a skip
    report), or None when anything else follows it or there is none."""
    lines = [line.split("\r")[-1] for line in err.rstrip().splitlines()]
    heads = [i for i, line in enumerate(lines) if line.startswith(f"{script}: ")]
    if not heads or not all(line.startswith("  ") for line in lines[heads[-1] + 1 :]):
        return None
    return "\n".join(lines[heads[-1] :])


def clear(err: str, status: int, expected: tuple[int, ...], script: str, *named: str, error: bool = True) -> bool:
    """No traceback, an expected status, and a closing ``SCRIPT: [error: ]…`` message naming everything in ``named``."""
    text = message(err, script)
    head = f"{script}: error: " if error else f"{script}: "
    return "Traceback" not in err and status in expected and text is not None and text.startswith(head) and all(str(n) in text for n in named)


def same_weights(out: Path, reference: dict) -> bool:
    try:
        weights = load_checkpoint(out / "model.pt").state_dict()
    except (OSError, ValueError):
        return False
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


def readable(path: Path) -> bool:
    if not path.exists():
        return True
    try:
        load_training_checkpoint(path)
        return True
    except CheckpointError:
        return False


def resume_until_done(out: Path) -> tuple[bool, bool]:
    """--resume until the run finishes; (every resume exited 0, every stderr free of tracebacks)."""
    for _ in range(3):
        done = run(out, "--resume")
        if done.returncode != 0 or "Traceback" in done.stderr:
            return False, "Traceback" not in done.stderr
        if (out / "model.pt").exists():
            return True, True
    return False, True


def finished(out: Path, reference: dict) -> tuple[bool, bool]:
    """(resumed to the reference weights with each row once, a resume was unclear)."""
    ok, tidy = resume_until_done(out)
    return ok and same_weights(out, reference) and rows_once(out), not tidy


# Process faults.


def fault_sigkill(out: Path, reference: dict, rng: random.Random) -> Outcome:
    proc = start(command(out, "--checkpoint-every", "1"))
    signal_after_rows(proc, out, signal.SIGKILL, rng.randint(1, STEPS - 2))
    intact = readable(out / "checkpoint.pt")
    ok, unclear = finished(out, reference)
    return Outcome(ok and intact, lost=not intact or not rows_once(out), unclear=unclear)


def fault_signal(signum: int) -> Callable:
    def inject(out: Path, reference: dict, rng: random.Random) -> Outcome:
        status, err, done = signal_after_rows(start(command(out, "--checkpoint-every", "100")), out, signum, rng.randint(1, STEPS - 2))
        if (out / "model.pt").exists():  # the signal came after the last step: nothing to save, the run is done
            return Outcome(same_weights(out, reference), lost=not rows_once(out))
        saved = load_training_checkpoint(out / "checkpoint.pt")["step"]
        name = signal.Signals(signum).name
        tidy = clear(err, status, (128 + signum,), "train.py", f"{name} at step {saved}", out / "checkpoint.pt", error=False)
        ok, unclear = finished(out, reference)
        return Outcome(tidy and ok, lost=saved < done or not rows_once(out), unclear=not tidy or unclear)

    return inject


def fault_second_sigint(out: Path, reference: dict, rng: random.Random) -> Outcome:
    status, err, _ = signal_after_rows(start(command(out, "--checkpoint-every", "1")), out, signal.SIGINT, rng.randint(1, STEPS - 2),
                                       then=rng.choice([0.0, 0.05, 0.2]))  # fmt: skip
    if (out / "model.pt").exists():
        return Outcome(same_weights(out, reference), lost=not rows_once(out))
    tidy = clear(err, status, (130, -signal.SIGINT), "train.py", "SIGINT", error=False)
    intact = readable(out / "checkpoint.pt")
    ok, unclear = finished(out, reference)
    return Outcome(tidy and intact and ok, lost=not intact or not rows_once(out), unclear=not tidy or unclear)


def fault_startup_signal(out: Path, reference: dict, rng: random.Random) -> Outcome:
    signum = rng.choice([signal.SIGINT, signal.SIGINT, signal.SIGTERM])
    proc = start(command(out, "--checkpoint-every", "1"))
    delay = rng.uniform(0.3, 2.5)
    time.sleep(delay)  # imports, parsing, the inputs' checks
    if proc.poll() is not None:  # it finished first (a quick machine)
        return Outcome(proc.returncode == 0 and same_weights(out, reference), note="finished before the signal")
    proc.send_signal(signum)
    _, err = proc.communicate()
    status = proc.returncode
    silent_default = signum == signal.SIGTERM and status == -signal.SIGTERM and not err.strip()  # before cli.run took over
    tidy = silent_default or clear(err, status, (128 + signum, -signum), "train.py", signal.Signals(signum).name, error=False)
    note = "" if tidy else f"{signal.Signals(signum).name} after {delay:.2f} s: status {status}: {err[-300:]!r}"
    intact = readable(out / "checkpoint.pt")
    if not (out / "model.pt").exists():
        done = run(out, "--resume") if (out / "checkpoint.pt").exists() else run(out, "--overwrite")
        tidy = tidy and done.returncode == 0
    return Outcome(tidy and intact and same_weights(out, reference) and rows_once(out), lost=not intact, unclear=not tidy, note=note)


class _RunsCode:
    """Unpickled, it creates ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def fault_corrupt(out: Path, reference: dict, rng: random.Random, how: str) -> Outcome:
    signal_after_rows(start(command(out, "--checkpoint-every", "100")), out, signal.SIGTERM, rng.randint(1, STEPS - 2))
    path = out / "checkpoint.pt"
    if not path.exists():
        return Outcome(False, note="no checkpoint to corrupt")
    data, marker = path.read_bytes(), out.parent / f"{out.name}.executed"
    if how == "evil":
        torch.save({"task": {}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": _RunsCode(str(marker)), "step": 1}, path,
                   _use_new_zipfile_serialization=rng.random() < 0.5)  # fmt: skip
    else:
        path.write_bytes({"truncate": data[: rng.randrange(1, len(data))], "zero": b"", "random": rng.randbytes(len(data)),
                          "json": b'{"step": 3}'}[how])  # fmt: skip
    refused = run(out, "--resume")
    tidy = clear(refused.stderr, refused.returncode, (2,), "train.py", path)
    restarted = run(out, "--overwrite")
    ok = restarted.returncode == 0 and same_weights(out, reference) and rows_once(out)
    return Outcome(tidy and ok, unclear=not tidy or "Traceback" in restarted.stderr, executed=marker.exists())


def fault_nan(out: Path, reference: dict, rng: random.Random, how: str) -> Outcome:
    if how == "late":  # the loss goes NaN in step k + 1: the checkpoint written then is step k's true state
        k = rng.randint(1, STEPS - 2)
        done = run_wrapped(out, NAN_LOSS.format(call=k + 1), "--checkpoint-every", rng.choice(["1", "100"]))
        tidy = clear(done.stderr, done.returncode, (1,), "train.py", f"became non-finite in step {k + 1}", f"(after step {k})")
        intact = readable(out / "checkpoint.pt") and load_training_checkpoint(out / "checkpoint.pt")["step"] == k
        ok, unclear = finished(out, reference)  # resumed without the jump: the uninterrupted run's weights
        return Outcome(tidy and intact and ok, lost=not intact, unclear=not tidy or unclear)
    if how == "lr":
        done = run(out, "--lr", OVERFLOWING_LR, "--checkpoint-every", "1")
        tidy = clear(done.stderr, done.returncode, (1,), "train.py", "became non-finite in step 1")
        finite = True
        if (out / "checkpoint.pt").exists():
            state = load_training_checkpoint(out / "checkpoint.pt")
            tensors = [*state["task"]["student"].values(), *state["task"]["objective"].values()]
            finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        return Outcome(tidy and finite, lost=not finite, unclear=not tidy)
    teacher = create_model("mobileclip_tiny")
    with torch.no_grad():
        teacher.text.positional_embedding.view(-1)[rng.randrange(100)] = float("nan")
    path = save_checkpoint(teacher, out.parent / f"{out.name}_teacher.pt")
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--model", "siclip_tiny", "--teacher", str(path),
                           "--out", str(out), "--no-eval"], capture_output=True, text=True, env=ENV)  # fmt: skip
    tidy = clear(done.stderr, done.returncode, (2,), "train.py", path, "NaN or Inf")
    return Outcome(tidy and not (out / "checkpoint.pt").exists(), unclear=not tidy)


def fault_second_run(out: Path, reference: dict, rng: random.Random) -> Outcome:
    procs = [start(command(out)) for _ in range(2)]
    errs = [p.communicate()[1] for p in procs]
    winners = [i for i, p in enumerate(procs) if p.returncode == 0]
    if len(winners) != 1:
        return Outcome(False, lost=True, note=f"statuses {[p.returncode for p in procs]}")
    loser = 1 - winners[0]
    tidy = clear(errs[loser], procs[loser].returncode, (2,), "train.py", f"PID {procs[winners[0]].pid}")
    return Outcome(tidy and same_weights(out, reference) and rows_once(out), lost=not rows_once(out), unclear=not tidy)


# train.py with one function of siclip replaced (``PATCH`` sets it), run as its __main__ runs it.
WRAPPED = """
import os, sys
sys.argv = [{script!r}, *{argv!r}]
from siclip import cli
{patch}
sys.path.insert(0, {experiments!r})
import train
sys.exit(cli.run(train.main, sys.argv[1:]))
"""
FULL_DISK = """
from siclip import storage
real, counts = storage._create_unique, {{}}
def create(path):
    fd, tmp = real(path)
    counts[path.name] = counts.get(path.name, 0) + 1
    if path.name == {name!r} and counts[path.name] > {after}:
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp
    return fd, tmp
storage._create_unique = create
"""
NAN_LOSS = """
from siclip.losses import ClipLoss
forward, calls = ClipLoss.forward, [0]
def nan_at(self, *args):
    calls[0] += 1
    loss = forward(self, *args)
    return loss * float("nan") if calls[0] == {call} else loss
ClipLoss.forward = nan_at
"""


def run_wrapped(out: Path, patch: str, *extra: str) -> subprocess.CompletedProcess:
    script = WRAPPED.format(script=str(ROOT / "experiments" / "train.py"), argv=command(out, *extra)[2:], patch=patch,
                            experiments=str(ROOT / "experiments"))  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV)


def fault_disk_full(out: Path, reference: dict, rng: random.Random, name: str) -> Outcome:
    after = rng.randint(1, STEPS - 2) if name == "checkpoint.pt" else 0
    done = run_wrapped(out, FULL_DISK.format(name=name, after=after), "--checkpoint-every", "1")
    kept = f"the previous {name} is intact" if name == "checkpoint.pt" else "nothing was written there"
    tidy = clear(done.stderr, done.returncode, (1,), "train.py", f"no space left on device while writing {out / name}", kept)
    leftovers = list(out.glob(".*.tmp"))
    intact = readable(out / "checkpoint.pt") and (name != "checkpoint.pt" or load_training_checkpoint(out / "checkpoint.pt")["step"] == after)
    ok, unclear = finished(out, reference)
    return Outcome(tidy and intact and not leftovers and ok, lost=not intact or not rows_once(out), unclear=not tidy or unclear)


def fault_eval_signal(out: Path, reference: dict, rng: random.Random) -> Outcome:
    cmd = [c for c in command(out) if c != "--no-eval"]
    proc = start(cmd)
    while proc.poll() is None and not (out / "summary.json").exists():  # written when training is complete, before evaluating
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.5))
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    if proc.returncode == 0:  # the evaluation ended before the signal
        return Outcome(same_weights(out, reference), note="signal after the evaluation")
    summary = json.loads((out / "summary.json").read_text())
    tidy = clear(err, proc.returncode, (143,), "train.py", "SIGTERM during the final evaluation", error=False)
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=ENV)
    evaluated = again.returncode == 0 and "eval" in json.loads((out / "summary.json").read_text())
    return Outcome(tidy and summary.get("interrupted_in") == "evaluation" and evaluated and same_weights(out, reference),
                   unclear=not tidy or "Traceback" in again.stderr)  # fmt: skip


def fault_ddp_peer(out: Path, reference: dict, rng: random.Random) -> Outcome:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command(out, "--checkpoint-every", "1",
           "--dist-timeout", "60")[1:]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    while proc.poll() is None and len(rows(out)) < 1:
        time.sleep(0.05)
    ranks = _children_running(proc.pid, "train.py")
    lock = (out / ".lock").read_text().strip() if (out / ".lock").exists() else ""
    peers = [pid for pid in ranks if str(pid) != lock]  # rank 0 holds the run's lock
    if not peers:
        proc.kill()
        proc.communicate()
        return Outcome(False, note="no peer rank found")
    os.kill(peers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    ours = [line for line in err.splitlines() if line.startswith("train.py: ")]
    own_traceback = any("siclip/" in line or "experiments/train.py" in line for line in err.splitlines() if line.strip().startswith("File "))
    tidy = bool(ours) and not own_traceback and all("error:" in line or "SIG" in line for line in ours)
    intact = readable(out / "checkpoint.pt")
    # The reference is a one-process run; this one resumes on two ranks, as it started, and must finish.
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    ok = again.returncode == 0 and (out / "model.pt").exists()
    return Outcome(tidy and intact and ok, lost=not intact, unclear=not tidy, note="" if tidy else err[-500:])


def _children_running(parent: int, name: str) -> list[int]:
    """Process ids below ``parent`` whose command line names ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and name in cmdline:
            found.append(int(entry.name))
    return found


# Input faults, in this process.

_MODULES: dict[str, object] = {}


def script_main(script: str) -> Callable:
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"experiments_{script}", ROOT / "experiments" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script].main


def in_process(script: str, argv: list[str]) -> tuple[int, str]:
    """``experiments/<script>.py argv`` as its ``__main__`` runs it (``cli.run(main)``), here: (status, stderr)."""
    saved, err = sys.argv, io.StringIO()
    sys.argv = [f"{script}.py", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.run(script_main(script), argv)
    except BaseException:  # noqa: BLE001 - a bug's traceback: recorded as what the user would see
        return 1, err.getvalue() + traceback.format_exc()
    finally:
        sys.argv = saved
    return status, err.getvalue()


@dataclass
class Refusal:
    """A script given bad input: ``expected`` status, its line naming ``named``; ``marker``: a malicious pickle's
    marker that must not appear; ``untouched``: a file that must be left as it was."""

    script: str
    argv: list[str]
    named: tuple[str, ...]
    expected: tuple[int, ...] = (2,)
    marker: Path | None = None
    untouched: Path | None = None
    out: Path | None = None  # must not be created

    def check(self) -> Outcome:
        before = self.untouched.read_bytes() if self.untouched is not None else None
        status, err = in_process(self.script, self.argv)
        tidy = clear(err, status, self.expected, f"{self.script}.py", *self.named)
        lost = before is not None and (not self.untouched.exists() or self.untouched.read_bytes() != before)
        created = self.out is not None and self.out.exists()
        executed = self.marker is not None and self.marker.exists()
        note = "" if tidy else f"status {status}: {last_line(err)[:200]}"
        return Outcome(tidy and not lost and not created and not executed, lost=lost, unclear=not tidy, executed=executed, note=note)


def _files(work: Path) -> dict[str, Path]:
    """The inputs the refusal cases point at: a zero-shot set, names, a tiny model, evil and junk weights."""
    work.mkdir(parents=True, exist_ok=True)
    test = work / "test"
    for name in ("red", "blue"):
        (test / name).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(test / name / "0.png")
    (work / "names.txt").write_text("red\nblue\n")
    files = {"test": test, "names": work / "names.txt", "missing": work / "missing.pt", "model": work / "model.pt"}
    save_checkpoint(create_model("mobileclip_tiny"), files["model"])
    return files


# (argv, what the one-line error must name) for train.py; {missing}, {test} (a zero-shot folder), {names} (its class names).
TRAIN_BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--epochs", "two"], "--epochs"), (["--batch-size", "1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"), (["--checkpoint-every", "0"], "--checkpoint-every"), (["--log-every", "0"], "--log-every"),
    (["--image-size", "0"], "--image-size"), (["--image-size", "-32"], "--image-size"), (["--lr", "0"], "--lr"), (["--lr", "-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--num-train", "0"], "--num-train"), (["--workers", "-1"], "--workers"),
    (["--p-synthetic", "1.5"], "--p-synthetic"), (["--max-unknown-rate", "-0.1"], "--max-unknown-rate"),
    (["--max-skip-fraction", "2"], "--max-skip-fraction"), (["--dist-timeout", "0"], "--dist-timeout"), (["--crop-scale", "0", "1"], "--crop-scale"),
    (["--crop-ratio", "2", "1"], "--crop-ratio"), (["--tower-lr-scale", "image=-1"], "--tower-lr-scale"), (["--tower-lr-scale", "eyes=2"], "--tower-lr-scale"),
    (["--tower-frozen-steps", "text=x"], "--tower-frozen-steps"), (["--zeroshot", "{missing}"], "--zeroshot"),
    (["--zeroshot", "{test}", "--classnames", "{missing}"], "--classnames"), (["--zeroshot", "{test}", "--templates", "{missing}"], "--templates"),
    (["--classnames", "{names}"], "--classnames needs --zeroshot"), (["--teacher", "{missing}"], "--teacher"),
    (["--teacher", "hf:/no/such/dir"], "--teacher"), (["--vocab-path", "{missing}"], "--vocab-path"),
    (["--calibration-captions", "{missing}"], "--calibration-captions"), (["--data", "{missing}.csv"], "--data"),
    (["--shape-twins", "--data", "{names}.csv"], "--data"), (["--model", "no_such_model"], "--model"), (["--resume", "--overwrite"], "choose one"),
    (["--synthetic-keys", ","], "--synthetic-keys"), (["--out", "{names}"], "--out"), (["--num-train", "8", "--batch-size", "16"], "make no training step"),
]  # fmt: skip


def bad_arguments(work: Path) -> list[Refusal]:
    f = _files(work / "inputs")
    out = work / "out"
    cases = []
    for i, (argv, named) in enumerate(TRAIN_BAD_ARGUMENTS):
        out_flag = [] if "--out" in argv else ["--out", str(work / f"train{i}")]
        cases.append(Refusal("train", [*(a.format(**f) for a in argv), *out_flag], (named,), out=work / f"train{i}"))
    others = [
        ("evaluate", ["--model", str(f["model"]), "--zeroshot", str(f["test"]), "--batch-size", "0"], "--batch-size"),
        ("evaluate", ["--model", str(f["model"]), "--zeroshot", str(f["test"]), "--max-unknown-rate", "2"], "--max-unknown-rate"),
        ("evaluate", ["--model", str(f["model"]), "--zeroshot", str(f["test"]), "--device", "bogus"], "--device"),
        ("evaluate", ["--model", str(f["missing"]), "--zeroshot", str(f["test"])], "--model"),
        ("evaluate", ["--model", str(f["model"])], "nothing to evaluate"),
        ("evaluate", ["--model", str(f["model"]), "--zeroshot", str(f["missing"])], "--zeroshot"),
        ("cache_teacher", ["--teacher", str(f["model"]), "--data", "embedded", "--out", str(out), "--num-train", "0"], "--num-train"),
        ("cache_teacher", ["--teacher", str(f["missing"]), "--data", "embedded", "--out", str(out)], "--teacher"),
        ("demo", ["--workers", "-1", "--out", str(out)], "--workers"), ("demo", ["--timing-rounds", "0", "--out", str(out)], "--timing-rounds"),
        ("ablation", ["--seeds", "0", "--out", str(out)], "--seeds"), ("ablation", ["--preset", "huge", "--out", str(out)], "--preset"),
        ("data_scale", ["--seeds", "0", "--out", str(out)], "--seeds"), ("data_scale", ["--workers", "-1", "--out", str(out)], "--workers"),
        ("divergence_report", ["--preset", "demo", "--snapshots", "1", "--out", str(out)], "--snapshots"),
        ("divergence_report", ["--checkpoint", str(f["missing"]), "--out", str(out)], "--checkpoint"),
        ("divergence_report", ["--model", "mobileclip_tiny", "--captions", "0", "--out", str(out)], "--captions"),
        ("flops_report", ["--out", str(f["names"])], "--out"), ("import_mobileclip", [str(f["missing"]), str(out)], "source"),
        ("import_mobileclip", [str(f["model"]), str(out), "--model", "siclip_s0"], "--model"),
        ("caption_shards", [str(out), "--num-captions", "0"], "--num-captions"),
        ("caption_shards", [str(out), "--captioner", "nocolon"], "--captioner"),
        ("caption_shards", [str(out), "--captioner", "no_such_module_x:f"], "no_such_module_x"),
        ("convert_model", ["hf:/no/such/dir", "--out", str(out / "c.pt"), "--count", "1"], "--count"),
        ("convert_model", ["hf:/no/such/dir", "--out", str(out / "c.pt"), "--captions", str(f["missing"])], "--captions"),
    ]  # fmt: skip
    cases += [Refusal(script, argv, (named,), out=out) for script, argv, named in others]
    return cases


def _weights_loaders(work: Path) -> dict[str, Callable]:
    from siclip.interop import load_clip
    from siclip.models import load_mobileclip_s0, load_model
    from siclip.storage import load_weights

    from siclip.interop.converted import load_converted

    loaders = {"load_weights": load_weights, "load_checkpoint": load_checkpoint, "load_model": load_model, "load_mobileclip_s0": load_mobileclip_s0,
               "load_training_checkpoint": load_training_checkpoint, "load_clip": load_clip, "load_converted": load_converted}  # fmt: skip
    if all(importlib.util.find_spec(m) is not None for m in ("open_clip", "torchvision")):  # open_clip imports torchvision
        config = work / "tiny-clip.json"
        config.write_text(json.dumps({"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))  # fmt: skip
        loaders["open_clip:ARCH:FILE"] = lambda p: load_clip(f"open_clip:{config}:{p}")
    return loaders


@dataclass
class LoaderRefusal:
    """A loader function given a malicious file: a CheckpointError naming it, nothing executed."""

    name: str
    load: Callable
    path: Path
    marker: Path

    def check(self) -> Outcome:
        try:
            self.load(self.path)
        except CheckpointError as err:
            tidy = str(self.path) in str(err) and "could run code" in str(err)
            return Outcome(tidy and not self.marker.exists(), unclear=not tidy, executed=self.marker.exists())
        except Exception as err:  # noqa: BLE001 - any other exception is an unclear refusal
            return Outcome(False, unclear=True, executed=self.marker.exists(), note=f"{self.name}: {type(err).__name__}: {err}"[:200])
        return Outcome(False, executed=self.marker.exists(), note=f"{self.name} loaded a malicious file")


def bad_files(work: Path) -> list:
    f = _files(work / "inputs")
    cases: list = []
    for legacy in (False, True):
        kind = "legacy" if legacy else "zip"
        marker = work / f"executed_{kind}"
        evil = work / f"evil_{kind}.pt"
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(str(marker))}, evil, _use_new_zipfile_serialization=not legacy)
        cases += [LoaderRefusal(name, load, evil, marker) for name, load in _weights_loaders(work).items()]
        run_dir = work / f"resume_{kind}"
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"task": {}, "optimizer": {}, "scheduler": {}, "loader": {}, "rng": _RunsCode(str(marker)), "step": 1},
                   run_dir / "checkpoint.pt", _use_new_zipfile_serialization=not legacy)  # fmt: skip
        out = work / f"out_{kind}"
        cases += [
            Refusal("train", ["--teacher", str(evil), "--model", "siclip_tiny", "--out", str(out)], (str(evil),), marker=marker),
            Refusal("train", ["--num-train", "32", "--batch-size", "16", "--resume", "--out", str(run_dir)], (str(run_dir / "checkpoint.pt"),),
                    marker=marker),  # fmt: skip
            Refusal("evaluate", ["--model", str(evil), "--zeroshot", str(f["test"])], (str(evil),), marker=marker),
            Refusal("import_mobileclip", [str(evil), str(out / "m.pt")], (str(evil),), marker=marker),
            Refusal("divergence_report", ["--checkpoint", str(evil), "--out", str(out)], (str(evil),), marker=marker),
            Refusal("cache_teacher", ["--teacher", str(evil), "--data", "embedded", "--out", str(out)], (str(evil),), marker=marker),
        ]
    good = f["model"].read_bytes()
    legacy_good = work / "legacy_model.pt"
    torch.save(torch.load(f["model"], weights_only=True), legacy_good, _use_new_zipfile_serialization=False)
    junk = {"empty.pt": b"", "text.pt": b"not weights\n", "random.pt": np.random.default_rng(0).bytes(4096), "json.pt": b'{"w": [1]}',
            "truncated.pt": good[: len(good) // 2], "legacy_cut.pt": legacy_good.read_bytes()[:-100]}  # fmt: skip
    for name, data in junk.items():
        path = work / name
        path.write_bytes(data)
        cases += [Refusal("train", ["--teacher", str(path), "--model", "siclip_tiny", "--out", str(work / "out_junk")], (str(path),)),
                  Refusal("evaluate", ["--model", str(path), "--zeroshot", str(f["test"])], (str(path),))]
    cases.append(Refusal("import_mobileclip", [str(f["model"]), str(work / "out_junk" / "m.pt")], (str(f["model"]), "Apple")))
    return cases


@dataclass
class DataCase:
    """train.py on user data: ``expected`` status; a refusal's line names ``named``; a run that skips reports it."""

    argv: list[str]
    named: tuple[str, ...]
    expected: tuple[int, ...]
    skipped: int | None = None  # for a run that completes: samples it must at least report skipped
    untouched: Path | None = None

    def check(self) -> Outcome:
        out = Path(self.argv[self.argv.index("--out") + 1])
        before = self.untouched.read_bytes() if self.untouched is not None else None
        status, err = in_process("train", self.argv)
        lost = before is not None and (not self.untouched.exists() or self.untouched.read_bytes() != before)
        if status == 0 and 0 in self.expected:
            summary = json.loads((out / "summary.json").read_text())
            ok = "Traceback" not in err and summary.get("skipped_samples", -1) >= self.skipped  # later epochs may skip them again
            return Outcome(ok and not lost, lost=lost, unclear="Traceback" in err, note=f"skipped {summary.get('skipped_samples')}")
        tidy = clear(err, status, self.expected, "train.py", *self.named)
        return Outcome(tidy and not lost, lost=lost, unclear=not tidy, note="" if tidy else f"status {status}: {last_line(err)[:200]}")


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def bad_data(work: Path) -> list[DataCase]:
    from siclip.data import EmbeddedConfig, EmbeddedSource, write_shards
    from siclip.data.sources import encode_image

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (work / "img").mkdir(exist_ok=True)
    for i in range(32):
        (work / "img" / f"{i}.png").write_bytes(encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (work / "img" / "bomb.png").write_bytes(_png_header(20000, 20000))

    def table(name: str, rows: list[str], encoding: str = "utf-8") -> str:
        (work / name).write_bytes(("filepath,title\n" + "\n".join(rows) + "\n").encode(encoding))
        return str(work / name)

    good = [f"img/{i}.png,a picture number {i % 4}" for i in range(32)]
    tables = {
        "latin1": table("latin1.csv", [*good[:8], "img/8.png,un café crème"], "latin-1"),
        "ragged": table("ragged.csv", [*good[:8], "img/9.png,two,fields too many"]),
        "no_images": table("no_images.csv", [f"img/missing{i}.png,a caption" for i in range(32)]),
        "mostly_missing": table("mostly_missing.csv", [*good[:8], *[f"img/missing{i}.png,a picture number 1" for i in range(24)]]),
        "empty_captions": table("empty_captions.csv", [f"img/{i}.png," for i in range(32)]),
        "one_bomb": table("one_bomb.csv", [*good[:31], "img/bomb.png,a picture number 2"]),
        "good": table("good.csv", good),
    }
    (work / "no_column.csv").write_text("path,caption\nimg/0.png,x\n")
    shards = work / "shards"
    write_shards(EmbeddedSource(EmbeddedConfig(num_train=32, image_size=32), "train"), shards, samples_per_shard=16)
    first = sorted(shards.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (work / "empty_names.txt").write_text("\n")
    (work / "bad_templates.txt").write_text("a photo of a thing\n")
    empty_class = work / "zs_empty"
    (empty_class / "red").mkdir(parents=True, exist_ok=True)
    (empty_class / "blue").mkdir(parents=True, exist_ok=True)
    f = _files(work / "inputs")

    def train(name: str, *extra: str) -> list[str]:
        return ["--tokenizer", "words", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--no-eval", "--out", str(work / name), *extra]

    finished_run = work / "finished"
    in_process("train", ["--data", tables["good"], *train("finished")[:-2], "--out", str(finished_run)])
    model = finished_run / "model.pt"
    return [
        DataCase(["--data", tables["latin1"], *train("r1")], (tables["latin1"], "unreadable CSV"), (2,)),
        DataCase(["--data", tables["ragged"], *train("r2")], (tables["ragged"], "line 10"), (2,)),
        DataCase(["--data", str(work / "no_column.csv"), *train("r3")], ("no_column.csv", "missing column"), (2,)),
        DataCase(["--data", tables["no_images"], *train("r4")], ("every one of the", "missing image file"), (1,)),
        DataCase(["--data", tables["mostly_missing"], *train("r5")], ("24 of the 32 samples", "more than the allowed fraction"), (1,)),
        DataCase(["--data", tables["mostly_missing"], *train("r6", "--max-skip-fraction", "0.9")], (), (0,), skipped=24),
        DataCase(["--data", tables["empty_captions"], *train("r7")], ("every one of the",), (1,)),
        DataCase(["--data", tables["one_bomb"], *train("r8")], (), (0,), skipped=1),
        DataCase(["--data", str(shards), *train("r9", "--max-skip-fraction", "1")], (), (0,), skipped=0),
        DataCase(["--data", str(work / "no_shards"), *train("r10")], ("no_shards",), (2,)),
        DataCase(["--data", tables["good"], *[a for a in train("r11") if a != "--no-eval"], "--zeroshot", str(f["test"]), "--classnames",
                  str(work / "empty_names.txt")], ("empty_names.txt",), (2,)),  # fmt: skip
        DataCase(["--data", tables["good"], *[a for a in train("r12") if a != "--no-eval"], "--zeroshot", str(f["test"]), "--templates",
                  str(work / "bad_templates.txt")], ("bad_templates.txt", "{}"), (2,)),  # fmt: skip
        DataCase(["--data", tables["good"], *[a for a in train("r13") if a != "--no-eval"], "--zeroshot", str(empty_class)],
                 (str(empty_class),), (2,)),  # fmt: skip
        DataCase(["--data", tables["good"], *[a for a in train("r14") if a != "--no-eval"], "--retrieval", str(work / "no_column.csv")],
                 ("no_column.csv",), (2,)),  # fmt: skip
        DataCase(["--data", tables["latin1"], *train("finished")[:-2], "--overwrite", "--out", str(finished_run)], (tables["latin1"],), (2,),
                 untouched=model),  # fmt: skip
        DataCase(["--data", tables["good"], *train("finished")[:-2], "--overwrite", "--teacher", str(work / "nope.pt"), "--out", str(finished_run)],
                 ("--teacher",), (2,), untouched=model),  # fmt: skip
        DataCase(["--data", tables["good"], *train("finished")[:-2], "--out", str(finished_run)], ("already holds a run", "--resume"), (2,),
                 untouched=model),  # fmt: skip
        DataCase(["--data", tables["good"], *train("finished")[:-2], "--batch-size", "16", "--resume", "--out", str(finished_run)],
                 ("does not fit this run", "batch size"), (2,), untouched=model),  # fmt: skip
    ]


# The table.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=cli.positive_int, default=1, help="how many times each process fault is injected")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help=f"comma-separated, from {CATEGORIES}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="directory for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background (a shell's `cmd &` ignores SIGINT): every run would inherit that, and a Ctrl-C
        # before training installs its own handler would be ignored, which is what an ignored SIGINT means. The
        # cases test a user's Ctrl-C, so the runs start with SIGINT's default.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = [c for c in args.categories.split(",") if c]
    unknown = sorted(set(chosen) - set(CATEGORIES))
    if unknown:
        parser.error(f"unknown categories {unknown}; choose from {CATEGORIES}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_injection_"))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    reference = None
    if set(chosen) & set(PROCESS):
        straight = work / "reference"
        done = run(straight, "--overwrite")
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted reference run failed:\n{done.stderr[-3000:]}")
        reference = load_checkpoint(straight / "model.pt").state_dict()
    process_cases: dict[str, list[tuple[str, Callable]]] = {
        "sigkill": [("", fault_sigkill)] * 6, "sigint": [("", fault_signal(signal.SIGINT))] * 4,
        "sigterm": [("", fault_signal(signal.SIGTERM))] * 4, "second-sigint": [("", fault_second_sigint)] * 3,
        "startup-signal": [("", fault_startup_signal)] * 5,
        "corrupt": [(how, lambda o, r, g, how=how: fault_corrupt(o, r, g, how)) for how in ("truncate", "zero", "random", "json", "evil", "evil")],
        "nan": [(how, lambda o, r, g, how=how: fault_nan(o, r, g, how)) for how in ("lr", "teacher", "late", "late")],
        "second-run": [("", fault_second_run)] * 2,
        "disk-full": [(name, lambda o, r, g, name=name: fault_disk_full(o, r, g, name)) for name in ("checkpoint.pt", "checkpoint.pt", "model.pt")],
        "eval-signal": [("", fault_eval_signal)] * 2, "ddp-peer": [("", fault_ddp_peer)],
    }  # fmt: skip
    input_cases = {"bad-argument": bad_arguments, "bad-file": bad_files, "bad-data": bad_data}
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    failures = []

    def record(category: str, label: str, outcome: Outcome) -> None:
        for i, value in enumerate((1, outcome.survived, outcome.lost, outcome.unclear, outcome.executed)):
            table[category][i] += int(value)
        if not outcome.survived or outcome.lost or outcome.unclear or outcome.executed:
            failures.append(f"{category} {label}: {'survived' if outcome.survived else 'FAILED'} {outcome.note}")
            print(failures[-1], flush=True)

    for category in chosen:
        if category in input_cases:
            for i, case in enumerate(input_cases[category](work / category)):
                record(category, f"#{i} {getattr(case, 'script', '')} {' '.join(getattr(case, 'argv', []))[:160]}", case.check())
        else:
            for round_ in range(args.rounds):
                for i, (label, inject) in enumerate(process_cases[category]):
                    out = work / f"{category}-{round_}-{i}"
                    try:
                        outcome = inject(out, reference, rng)
                    except Exception as err:  # noqa: BLE001 - the harness reports a case it could not judge
                        outcome = Outcome(False, unclear=True, note=f"harness: {type(err).__name__}: {err}")
                    record(category, f"{round_}.{i} {label}", outcome)
        n, ok, lost, unclear, executed = table[category]
        print(f"{category}: {ok}/{n} survived, {lost} lost, {unclear} unclear, {executed} executed ({time.perf_counter() - started:.0f} s)", flush=True)
    total = [sum(v[i] for v in table.values()) for i in range(5)]
    print("\n| category | cases | survived | lost | unclear errors | executed |\n|---|---:|---:|---:|---:|---:|")
    for category, (n, ok, lost, unclear, executed) in table.items():
        print(f"| {category} | {n} | {ok} | {lost} | {unclear} | {executed} |")
    print(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** | **{total[3]}** | **{total[4]}** |")
    print(f"\n{total[0]} cases in {time.perf_counter() - started:.0f} s; runs in {work}")
    return 0 if total[1] == total[0] and not any(total[2:]) else 1


if __name__ == "__main__":
    sys.exit(main())
