"""Fault injection: attack the command-line scripts as a hostile world would; print what survived, per category.

    python benchmarks/fault_injection.py                          # every category once: 400+ cases
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
- ``signal-in-write``: a Ctrl-C in step k, then a second one inside the checkpoint's write (at torch.save's n-th write
  to the file): status 130, one line, never torch's ``inline_container`` error; the previous checkpoint is intact, no
  temporary file is left, and ``--resume`` ends on the reference weights.

Input faults run each script's ``main`` in this process, through :func:`siclip.cli.run` as its ``__main__`` does:

- ``bad-argument``: out-of-range values, missing files, contradictory flags, for every script: status 2, one line
  naming the argument, nothing created.
- ``bad-file``: pickles that would run code, in torch's zip and legacy formats, through every loader and every script
  that reads weights; empty, text, random, truncated and JSON files in their place: status 2, one line naming the file.
- ``bad-data``: Latin-1 and ragged CSVs, missing columns and images, decompression bombs, empty captions, cut shards,
  malformed benchmarks, ``--overwrite`` over a finished run with bad inputs: a clear refusal or a run that skips and
  reports; the old run is never deleted by a refused one.

Issue 32's categories (files a user hands over, and where commands write), with the network blocked (in this process
and, through a ``sitecustomize``, in the commands it starts):

- ``model-folder``: a transformers folder without tokenizer files, with truncated, junk or empty safetensors, a
  pickled ``pytorch_model.bin``, weights that do not fit its config, a config of width 10⁶ or context 10⁹, a hub
  attention kernel, an unknown model type, a config that is no JSON object: through evaluate, train's teacher,
  convert and cache-teacher: one line naming the folder, status 2.
- ``remote-code``: a folder whose ``config.json`` or ``tokenizer_config.json`` names its own Python (``auto_map``), each
  command in its own process with ``y`` on its stdin; a converted file whose origin folder names it; an open_clip config
  whose text tower is such a folder: refused, the folder's code never imported (**executed**).
- ``network``: hub names in converted files, open_clip configs, timm specs and kernels, and hub names as specs:
  refused, no connection attempted (**fetched**).
- ``converted-file``: a converted file damaged field by field (types, ranges, NaN weights, absurd sizes, blocks and
  plans that do not fit, swapped or missing weights), malicious or truncated: through evaluate, train's ``--model``
  and cache-teacher.
- ``exported-dir``: an exported directory's manifest changed field by field (swapped encoders, outside or symlinked
  files, absurd sizes, a non-finite or huge logit scale, a foreign opset): through evaluate and train's teacher.
- ``destination``: every command that writes, pointed at a folder of the user's files, its own input, the folder it
  runs in, a device, a socket; earlier results replaced; absurd counts; train's ``--overwrite`` beside the user's
  notes; a kill before, after and (without the atomic exchange) between the renames of a replacement; SIGTERM inside
  an export. **Lost**: a file the command did not create changed or gone, or no complete result left at the
  destination.

A case **survives** when it ends as described, and, where it trains, with weights bit-identical to the reference.
**Lost**: a step the run had saved that could not be recovered (an unreadable checkpoint it wrote, metrics rows
written twice or missing, an old run deleted by a refused one). **Unclear**: a traceback, a status other than the
expected one, or no single ``SCRIPT: …`` line naming the argument or file. **Executed**: a malicious pickle or a model
folder's own Python ran. **Fetched**: a connection was attempted. The last column counts the bad-input cases (those
that must be refused) that ended in one line with status 2.
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
from siclip.storage import CheckpointError, save_atomic  # noqa: E402
from siclip.train.state import load_training_checkpoint  # noqa: E402

PROCESS = ("sigkill", "sigint", "sigterm", "second-sigint", "startup-signal", "corrupt", "nan", "second-run", "disk-full",
           "eval-signal", "ddp-peer", "signal-in-write")  # fmt: skip
INPUT = ("bad-argument", "bad-file", "bad-data", "model-folder", "converted-file", "exported-dir", "destination", "network", "remote-code")
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
    fetched: bool = False  # a connection was attempted
    refusal: bool = False  # a bad input that must end in one line with status 2
    clean_refusal: bool = False  # … and did
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
        asked = len(NETWORK)
        status, err = in_process(self.script, self.argv)
        tidy = clear(err, status, self.expected, f"{self.script}.py", *self.named)
        lost = before is not None and (not self.untouched.exists() or self.untouched.read_bytes() != before)
        created = self.out is not None and self.out.exists()
        executed = self.marker is not None and self.marker.exists()
        fetched = len(NETWORK) > asked
        note = "" if tidy else f"status {status}: {last_line(err)[:200]}"
        return Outcome(tidy and not lost and not created and not executed and not fetched, lost=lost, unclear=not tidy, executed=executed,
                       fetched=fetched, refusal=self.expected == (2,), clean_refusal=tidy and self.expected == (2,), note=note)  # fmt: skip


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
        ("divergence_report", ["--model", str(f["missing"]), "--out", str(out)], "--model"),
        ("divergence_report", ["--model", "mobileclip_tiny", "--calibration-count", "0", "--out", str(out)], "--calibration-count"),
        ("flops_report", ["--out", str(f["names"])], "--out"), ("import_mobileclip", ["--model", str(f["missing"]), "--out", str(out)], "--model"),
        ("import_mobileclip", ["--model", str(f["model"]), "--out", str(out), "--apple-model", "siclip_s0"], "--apple-model"),
        ("caption_shards", ["--data", str(out), "--num-captions", "0"], "--num-captions"),
        ("caption_shards", ["--data", str(out), "--captioner", "nocolon"], "--captioner"),
        ("caption_shards", ["--data", str(out), "--captioner", "no_such_module_x:f"], "no_such_module_x"),
        ("convert_model", ["--model", str(f["model"]), "--out", str(out / "c.pt"), "--calibration-count", "1"], "--calibration-count"),
        ("convert_model", ["--model", str(f["model"]), "--out", str(out / "c.pt"), "--calibration-captions", str(f["missing"])],
         "--calibration-captions"),
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
            tidy = str(self.path) in str(err) and "could run code" in str(err) and "\n" not in str(err) and "weights_only=False" not in str(err)
            return Outcome(tidy and not self.marker.exists(), unclear=not tidy, executed=self.marker.exists(), refusal=True, clean_refusal=tidy)
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
            Refusal("import_mobileclip", ["--model", str(evil), "--out", str(out / "m.pt")], (str(evil),), marker=marker),
            Refusal("divergence_report", ["--model", str(evil), "--out", str(out)], (str(evil),), marker=marker),
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
    cases.append(Refusal("import_mobileclip", ["--model", str(f["model"]), "--out", str(work / "out_junk" / "m.pt")], (str(f["model"]), "Apple")))
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
        return Outcome(tidy and not lost, lost=lost, unclear=not tidy, refusal=self.expected == (2,), clean_refusal=tidy and self.expected == (2,),
                       note="" if tidy else f"status {status}: {last_line(err)[:200]}")  # fmt: skip


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


# ── Issue 32: model folders, converted files, exported directories, destinations, remote code, network, a signal in a write ──
#
# In-process cases run with the network blocked (every connection attempt recorded: "fetched"); subprocess cases with a
# sitecustomize that does the same and logs to a file.

NETWORK: list[str] = []


def _block_network() -> None:
    """Every connection this process attempts is recorded in :data:`NETWORK` and refused."""
    import socket

    def refuse(*args):
        NETWORK.append(repr(args)[:200])
        raise OSError("fault injection: the network is blocked")

    socket.socket.connect = lambda self, address: refuse(address)
    socket.socket.connect_ex = lambda self, address: refuse(address)
    socket.getaddrinfo = lambda *args, **kwargs: refuse(*args)
    socket.create_connection = lambda *args, **kwargs: refuse(*args)


# The commands lend timm and open_clip siclip's torchvision stand-in themselves (importing siclip.interop installs it),
# so the guard only blocks the network.
GUARD = '''"""Fault injection's subprocesses: every connection logged and refused."""
import os, socket
def _refuse(*args):
    with open(os.environ["SICLIP_FI_NETWORK_LOG"], "a") as log:
        log.write(repr(args)[:200] + "\\n")
    raise OSError("fault injection: the network is blocked")
socket.socket.connect = lambda self, address: _refuse(address)
socket.socket.connect_ex = lambda self, address: _refuse(address)
socket.getaddrinfo = lambda *args, **kwargs: _refuse(*args)
socket.create_connection = lambda *args, **kwargs: _refuse(*args)
'''


def _foreign() -> None:
    """timm and open_clip import here with siclip's torchvision stand-in where torchvision cannot load
    (``siclip/interop/_torchvision_standin``, as the commands lend it); the tests' builders of small foreign models
    (their libraries' real classes) are importable."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from siclip.interop._torchvision_standin import install

    install()


def _guarded_env(work: Path) -> dict:
    guard = work / "guard"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)]), "SICLIP_FI_NETWORK_LOG": str(work / "network.log")}


def _edit_json(path: Path, change: Callable) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _copy(source: Path, target: Path, change: Callable | None = None) -> Path:
    import shutil

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    if change is not None:
        change(target)
    return target


def _calibration(work: Path) -> dict[str, Path]:
    from PIL import Image

    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    (work / "captions.txt").write_text("a photo of a cat\na red circle\n")
    return {"photos": photos, "captions": work / "captions.txt"}


def _calibration_flags(calib: dict[str, Path]) -> list[str]:
    return ["--calibration-captions", str(calib["captions"]), "--calibration-images", str(calib["photos"])]


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)


def _pickled_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"x": _RunsCode(str(folder.parent / f"{folder.name}.executed"))}, folder / "pytorch_model.bin")


HF_DAMAGE: dict[str, Callable[[Path], None]] = {
    "no-tokenizer": _no_tokenizer,
    "truncated-safetensors": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:50_000]),
    "junk-safetensors": lambda f: (f / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{not json at all"),
    "empty-safetensors": lambda f: (f / "model.safetensors").write_bytes(b""),
    "pickled-bin": _pickled_bin,
    "size-mismatch": lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(hidden_size=48)),
    "width-1e6": lambda f: _edit_json(f / "config.json", lambda c: c["vision_config"].update(hidden_size=10**6, intermediate_size=10**6)),
    "context-1e9": lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(max_position_embeddings=10**9)),
    "hub-kernel": lambda f: _edit_json(f / "config.json", lambda c: c.update(_attn_implementation="kernels-community/flash-attn")),
    "unknown-type": lambda f: _edit_json(f / "config.json", lambda c: c.update(model_type="evil")),
    "config-not-json": lambda f: (f / "config.json").write_text("{not json"),
    "config-a-list": lambda f: (f / "config.json").write_text("[1, 2]"),
}  # fmt: skip


def model_folders(work: Path) -> list:
    """A transformers CLIP folder damaged each way, through every command that reads an ``hf:DIR``."""
    _foreign()
    from foreign_models import save_hf_clip

    f = _files(work / "inputs")
    calib = _calibration(work)
    hf = save_hf_clip(work / "hf", "clip")
    cases = []
    for name, change in HF_DAMAGE.items():
        folder = _copy(hf, work / name, change)
        spec = f"hf:{folder}"
        marker = folder.parent / f"{folder.name}.executed"
        cases += [
            Refusal("evaluate", ["--model", spec, "--zeroshot", str(f["test"])], (str(folder),), marker=marker),
            Refusal("train", ["--model", "siclip_tiny", "--teacher", spec, "--no-inherit", "--no-eval", "--out", str(work / f"t_{name}")],
                    (str(folder),), marker=marker, out=work / f"t_{name}"),  # fmt: skip
            Refusal("convert_model", ["--model", spec, *_calibration_flags(calib), "--out", str(work / f"c_{name}.pt")],
                    (str(folder),), marker=marker, out=work / f"c_{name}.pt"),  # fmt: skip
            Refusal("cache_teacher", ["--teacher", spec, "--data", "embedded", "--num-train", "4", "--out", str(work / f"k_{name}")],
                    (str(folder),), marker=marker, out=work / f"k_{name}"),  # fmt: skip
        ]
    return cases


@dataclass
class ProcessRefusal:
    """A command in its own process, ``stdin`` on its input: one line and status 2 naming ``named``; ``marker``
    (created by code that must not run) absent; no connection attempted."""

    script: str
    argv: list[str]
    named: tuple[str, ...]
    env: dict
    marker: Path | None = None
    stdin: str = "y\n" * 4

    def check(self) -> Outcome:
        log = Path(self.env["SICLIP_FI_NETWORK_LOG"])
        before = log.read_text() if log.exists() else ""
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{self.script}.py"), *self.argv], input=self.stdin,
                              capture_output=True, text=True, env=self.env, timeout=600)  # fmt: skip
        tidy = clear(done.stderr, done.returncode, (2,), f"{self.script}.py", *self.named)
        executed = self.marker is not None and self.marker.exists()
        fetched = (log.read_text() if log.exists() else "") != before
        note = "" if tidy else f"status {done.returncode}: {last_line(done.stderr)[:200]}"
        return Outcome(tidy and not executed and not fetched, unclear=not tidy, executed=executed, fetched=fetched, refusal=True,
                       clean_refusal=tidy, note=note)  # fmt: skip


def _with_own_code(folder: Path, marker: Path, where: str) -> None:
    """An ``auto_map`` in ``where`` (config.json or tokenizer_config.json) to the folder's own Python, which creates
    ``marker`` when imported."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")  # fmt: skip
    if where == "config.json":
        _edit_json(folder / "config.json", lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"}))
    else:
        _edit_json(folder / "tokenizer_config.json", lambda t: t.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))


def remote_code(work: Path) -> list:
    """A folder naming its own Python (``auto_map``), every command in its own process with ``y`` on stdin (to
    which transformers' prompt would answer yes); a converted file whose origin is such a folder; an open_clip config
    whose text tower names one."""
    _foreign()
    from foreign_models import save_hf_clip, save_open_clip

    env = _guarded_env(work)
    f = _files(work / "inputs")
    calib = _calibration(work)
    hf = save_hf_clip(work / "hf", "clip")
    cases = []
    for where in ("config.json", "tokenizer_config.json"):
        marker = work / f"executed_{where}"
        folder = _copy(hf, work / f"own_code_{where}", lambda d: _with_own_code(d, marker, where))
        spec = f"hf:{folder}"
        cases += [ProcessRefusal(script, argv, ("auto_map",), env, marker) for script, argv in (
            ("evaluate", ["--model", spec, "--zeroshot", str(f["test"])]),
            ("train", ["--model", "siclip_tiny", "--teacher", spec, "--no-inherit", "--no-eval", "--out", str(work / "run")]),
            ("convert_model", ["--model", spec, *_calibration_flags(calib), "--out", str(work / "c.pt")]),
            ("divergence_report", ["--model", spec, *_calibration_flags(calib),
                                   "--out", str(work / "report")]),
            ("cache_teacher", ["--teacher", spec, "--data", "embedded", "--out", str(work / "cache")]))]  # fmt: skip
    # A converted file made from a clean folder, written as files were before they carried their tokenizer (so it reads
    # its origin's), whose folder later names its own code: reached without the user naming it.
    origin = _copy(hf, work / "origin")
    converted = _converted_file(f"hf:{origin}", ["text_model.encoder.layers.0"], work / "converted_hf.pt")
    payload = torch.load(converted, weights_only=True)
    save_atomic({k: v for k, v in payload.items() if k != "tokenizer"}, work / "converted_hf_before.pt")
    marker = work / "executed_origin"
    _with_own_code(origin, marker, "tokenizer_config.json")
    cases.append(ProcessRefusal("evaluate", ["--model", str(work / "converted_hf_before.pt"), "--zeroshot", str(f["test"])], ("auto_map",), env,
                                marker))  # fmt: skip
    # A converted file carrying its tokenizer (its files as text) whose tokenizer_config.json names Python shipped beside it.
    marker = work / "executed_carried"
    files = dict(payload["tokenizer"]["files"])
    files["tokenizer_config.json"] = json.dumps({**json.loads(files["tokenizer_config.json"]), "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    files["evil.py"] = f"open({str(marker)!r}, 'w').write('ran')\n"
    carried = save_atomic({**payload, "tokenizer": {**payload["tokenizer"], "files": files}}, work / "converted_hf_own_code.pt")
    cases.append(ProcessRefusal("evaluate", ["--model", str(carried), "--zeroshot", str(f["test"])], (str(carried),), env, marker))
    config, weights = save_open_clip(work / "oc")
    own = _copy(hf, work / "own_code_text_tower", lambda d: _with_own_code(d, work / "executed_tower", "config.json"))
    _edit_json(config, lambda c: c.update(text_cfg={**c["text_cfg"], "hf_model_name": str(own)}))
    cases.append(ProcessRefusal("evaluate", ["--model", f"open_clip:{config}:{weights}", "--zeroshot", str(f["test"])], ("hf_model_name",), env,
                                work / "executed_tower"))  # fmt: skip
    return cases


def _converted_file(spec: str, blocks: list[str], path: Path) -> Path:
    """The model ``spec`` names with ``blocks`` converted to SAS-P, saved at ``path`` (as convert_model.py saves it)."""
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, original_preprocess, save_converted

    model = load_original(spec)
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, model), blocks=blocks,
                             preprocess=original_preprocess(spec, model).to_dict())  # fmt: skip
    convert(model, recipe)
    return save_converted(model, recipe, path)


def _tiny_converted(work: Path) -> tuple[Path, dict, Path, Path]:
    """An open_clip CLIP (tiny, random) converted to SAS-P and saved: (file, payload, config, weights)."""
    from foreign_models import save_open_clip

    config, weights = save_open_clip(work / "oc")
    path = _converted_file(f"open_clip:{config}:{weights}", ["transformer.resblocks.0"], work / "converted.pt")
    return path, torch.load(path, weights_only=True), config, weights


def network(work: Path) -> list:
    """Hub names in every file a user hands over: a converted file whose text tower is ``openai/…``, an open_clip config
    naming a transformers tower or a timm tower with pretrained weights, hub architecture names for open_clip and
    timm, a hub attention kernel in a folder and in a converted record: refused, nothing asked of the network."""
    import copy

    _foreign()
    from foreign_models import save_hf_clip

    f = _files(work / "inputs")
    calib = _calibration(work)
    _, payload, config, weights = _tiny_converted(work)
    files = {}
    for name, change in (("oc_hf_download", lambda p: p["architecture"]["config"]["text_cfg"].update(hf_model_name="openai/clip-vit-base-patch32")),
                         ("oc_hf_tokenizer", lambda p: p["architecture"]["config"]["text_cfg"].update(hf_tokenizer_name="openai/clip-vit-base-patch32")),
                         ("oc_timm_pretrained", lambda p: p["architecture"]["config"]["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224",
                                                                                                          timm_model_pretrained=True)),
                         ("oc_timm_hub", lambda p: p["architecture"]["config"]["vision_cfg"].update(timm_model_name="hf-hub:timm/vit_tiny_patch16_224"))):  # fmt: skip
        bad = copy.deepcopy(payload)
        change(bad)
        files[name] = work / f"{name}.pt"
        save_atomic(bad, files[name])
    hub_config = work / "hub-text.json"
    hub_config.write_text(json.dumps({**json.loads(config.read_text()), "text_cfg": {"hf_model_name": "roberta-base", "width": 32}}))
    hf = save_hf_clip(work / "hf", "clip")
    kernel = _copy(hf, work / "kernel", lambda d: _edit_json(d / "config.json", lambda c: c.update(attn_implementation="kernels-community/flash-attn")))
    hf_converted = torch.load(_converted_file(f"hf:{hf}", ["text_model.encoder.layers.0"], work / "converted_hf.pt"), weights_only=True)
    hf_converted["architecture"]["attn_implementation"] = "kernels-community/flash-attn"
    save_atomic(hf_converted, work / "hf_kernel.pt")
    vit = work / "vit.json"
    vit.write_text(json.dumps({"name": "vit_tiny_patch16_224", "kwargs": {"pretrained_cfg_overlay": {"hf_hub_id": "timm/vit_tiny_patch16_224"}}}))
    images = ["--calibration-images", str(calib["photos"])]
    evaluate = lambda model: ["--model", str(model), "--zeroshot", str(f["test"])]  # noqa: E731
    return [
        *[Refusal("evaluate", evaluate(path), (str(path),)) for path in files.values()],
        Refusal("evaluate", evaluate(f"open_clip:{hub_config}:{weights}"), (str(hub_config), "hf_model_name")),
        Refusal("evaluate", evaluate(f"open_clip:hf-hub:timm/ViT-B-16-SigLIP:{weights}"), ("hf-hub:timm/ViT-B-16-SigLIP",)),
        Refusal("evaluate", evaluate(f"hf:{kernel}"), (str(kernel), "kernels-community")),
        Refusal("evaluate", evaluate(work / "hf_kernel.pt"), (str(work / "hf_kernel.pt"), "kernels-community")),
        Refusal("evaluate", evaluate("hf:openai/clip-vit-base-patch32"), ("openai/clip-vit-base-patch32",)),
        Refusal("train", ["--model", "siclip_tiny", "--teacher", "hf:openai/clip-vit-base-patch32", "--out", str(work / "t")],
                ("openai/clip-vit-base-patch32",), out=work / "t"),  # fmt: skip
        Refusal("convert_model", ["--model", f"timm:hf-hub:timm/vit_tiny_patch16_224:{weights}", *images, "--out", str(work / "v.pt")],
                ("hf-hub:timm/vit_tiny_patch16_224",), out=work / "v.pt"),  # fmt: skip
        Refusal("convert_model", ["--model", f"timm:{vit}:{weights}", *images, "--out", str(work / "v.pt")], ("pretrained_cfg_overlay",), out=work / "v.pt"),
        Refusal("convert_model", ["--model", f"open_clip:{hub_config}:{weights}", "--calibration-captions", str(calib["captions"]), *images, "--out", str(work / "v.pt")],
                ("hf_model_name",), out=work / "v.pt"),  # fmt: skip
    ]


def _converted_damage() -> dict[str, Callable[[dict], None]]:
    def width(p):
        p["architecture"]["config"]["vision_cfg"]["width"] = 10**6

    def swapped(p):
        p["state_dict"]["positional_embedding"] = p["state_dict"]["text_projection"]

    def missing(p):
        del p["state_dict"]["positional_embedding"]

    return {
        "origin": lambda p: p.update(origin="file:/etc/passwd"), "blocks-type": lambda p: p.update(blocks="transformer.resblocks.0"),
        "option": lambda p: p["options"].update(run="os.system"), "beta-ff-1e308": lambda p: p["options"].update(beta_ff=1e308),
        "backend": lambda p: p["options"].update(backend="cuda-kernel-from-hub"),
        "scope": lambda p: p.update(sharing={"transformer.resblocks": {"groups": [[0, 1]], "scope": "everything"}}),
        "groups": lambda p: p.update(sharing={"transformer.resblocks": {"groups": [[0, 10**9]], "scope": "block"}}),
        "preprocess-1e9": lambda p: p["preprocess"].update(size=10**9), "preprocess-type": lambda p: p.update(preprocess="bicubic"),
        "nan-weights": lambda p: p["state_dict"]["logit_scale"].fill_(float("nan")), "width-1e6": width,
        "context-1e9": lambda p: p["architecture"]["config"]["text_cfg"].update(context_length=10**9),
        "no-such-block": lambda p: p.update(blocks=["no.such.block"]), "swapped-weights": swapped, "missing-weight": missing,
        "no-state-dict": lambda p: p.pop("state_dict"), "architecture-type": lambda p: p.update(architecture=[1, 2]),
        "class-for-hf": lambda p: p.update(origin="hf:/nonexistent", architecture={"class": "pipeline", "config": {}}),
        # the fields issue 33 added: the tokenizer carried as data, the crop's rounding
        "tokenizer-name": lambda p: p["tokenizer"].update(name="../../evil"),
        "tokenizer-bpe-path": lambda p: p["tokenizer"].update(kwargs={"bpe_path": "/etc/passwd"}),
        "tokenizer-syntax-mask": lambda p: p["tokenizer"].update(kwargs={"reduction_mask": "syntax"}),
        "tokenizer-context-1e9": lambda p: p["tokenizer"].update(context_length=10**9),
        "tokenizer-hf-outside": lambda p: p.update(tokenizer={"name": "hf", "files": {"../../evil.json": "{}"}}),
        "tokenizer-hf-python": lambda p: p.update(tokenizer={"name": "hf", "files": {"tokenizer_config.json": "{}", "evil.py": "import os"}}),
        "tokenizer-hf-base64": lambda p: p.update(tokenizer={"name": "hf", "files": {"a.json": "{}"}, "binary_files": {"spiece.model": "not base64!"}}),
        "crop-rounding": lambda p: p["preprocess"].update(crop_rounding="ceil"),
    }  # fmt: skip


def converted_files(work: Path) -> list:
    """A converted file damaged each way (and a malicious and a truncated one), through every command that reads it."""
    import copy

    _foreign()
    f = _files(work / "inputs")
    path, payload, _, _ = _tiny_converted(work)
    files = {}
    for name, change in _converted_damage().items():
        bad = copy.deepcopy(payload)
        change(bad)
        files[name] = save_atomic(bad, work / f"conv_{name}.pt")
    marker = work / "executed"
    torch.save({**{k: v for k, v in payload.items() if k != "state_dict"}, "x": _RunsCode(str(marker))}, work / "conv_evil.pt")
    files["evil"] = work / "conv_evil.pt"
    (work / "conv_truncated.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    files["truncated"] = work / "conv_truncated.pt"
    cases = []
    for name, bad in files.items():
        cases += [Refusal("evaluate", ["--model", str(bad), "--zeroshot", str(f["test"])], (str(bad),), marker=marker),
                  Refusal("train", ["--model", str(bad), "--no-eval", "--out", str(work / f"t_{name}")], (str(bad),), marker=marker,
                          out=work / f"t_{name}"),
                  Refusal("cache_teacher", ["--teacher", str(bad), "--data", "embedded", "--num-train", "4", "--out", str(work / f"k_{name}")],
                          (str(bad),), marker=marker, out=work / f"k_{name}")]  # fmt: skip
    return cases


def _exported(work: Path) -> Path:
    """A real export of a tiny MobileCLIP (random weights), made once."""
    from siclip.data.tokenizer import tokenizer_for
    from siclip.deploy import export_clip

    out = work / "onnx"
    if not out.exists():
        model = create_model("mobileclip_tiny", image={"layers": [1, 1, 1, 1]}).eval()
        export_clip(model, tokenizer_for(model.config.text), out, source="tiny")
    return out


def _manifest_damage() -> dict[str, Callable[[Path, dict], None]]:
    def swap(folder, m):
        m["image"], m["text"] = {**m["image"], "file": "text.onnx"}, {**m["text"], "file": "image.onnx"}

    def swap_inside(folder, m):
        from siclip.deploy.export import _file_entry

        (folder / "image.onnx").rename(folder / "tmp.onnx")
        (folder / "text.onnx").rename(folder / "image.onnx")
        (folder / "tmp.onnx").rename(folder / "text.onnx")
        m["image"] = {**m["image"], **{k: v for k, v in _file_entry(folder, "image", m["image"]["input_shape"]).items() if k in ("bytes", "sha256")}}
        m["text"] = {**m["text"], **{k: v for k, v in _file_entry(folder, "text", m["text"]["input_shape"]).items() if k in ("bytes", "sha256")}}

    def link_out(folder, m):
        (folder / "image.onnx").rename(folder.parent / f"{folder.name}-elsewhere.onnx")
        (folder / "image.onnx").symlink_to(folder.parent / f"{folder.name}-elsewhere.onnx")

    return {
        "swapped-encoders": swap, "swapped-inside": swap_inside, "logit-scale-1e308": lambda f, m: m.update(logit_scale=1e308),
        "logit-scale-nan": lambda f, m: m.update(logit_scale=float("nan")), "embed-dim--7": lambda f, m: m.update(embed_dim=-7),
        "embed-dim-str": lambda f, m: m.update(embed_dim="128"), "context-1e9": lambda f, m: m["tokenizer"].update(context_length=10**9),
        "vocab-etc-passwd": lambda f, m: m["tokenizer"].update(name="clip", vocab_path="/etc/passwd"),
        "vocab-dotdot": lambda f, m: m["tokenizer"].update(name="clip", vocab_path="../vocab.txt"),
        "opset-99": lambda f, m: m.update(opset=99), "size-1e9": lambda f, m: m["preprocess"].update(size=10**9),
        "input-shape": lambda f, m: m["image"].update(input_shape=[None, 3, 10**9, 10**9]), "symlinked-encoder": link_out,
        "tokenizer-name": lambda f, m: m["tokenizer"].update(name="../../evil"), "format": lambda f, m: m.update(format="siclip-onnx-9"),
        "not-an-object": lambda f, m: m.update(image=["image.onnx"]), "precision": lambda f, m: m.update(precision="int4"),
        # the fields issue 33 added: transformers and open_clip tokenizers, int8's per-sample ranges and bound, crop rounding
        "hf-tokenizer-outside": lambda f, m: m.update(tokenizer={"name": "hf", "context_length": m["text"]["input_shape"][1], "files": ["../vocab.json"]}),
        "hf-tokenizer-encoder": lambda f, m: m.update(tokenizer={"name": "hf", "context_length": m["text"]["input_shape"][1], "files": ["image.onnx"]}),
        "hf-tokenizer-missing": lambda f, m: m.update(tokenizer={"name": "hf", "context_length": m["text"]["input_shape"][1], "files": ["tokenizer.json"]}),
        "open-clip-bpe-path": lambda f, m: m.update(tokenizer={"name": "open_clip", "tokenizer": "SimpleTokenizer", "context_length": m["text"]["input_shape"][1],
                                                               "kwargs": {"bpe_path": "/etc/passwd"}}),
        "activation-ranges": lambda f, m: m.update(activation_ranges="per_batch"), "check-bound-1e308": lambda f, m: m["check"].update(bound=1e308),
        "check-calls": lambda f, m: m["check"].update(calls="all at once"), "crop-rounding": lambda f, m: m["preprocess"].update(crop_rounding="ceil"),
    }  # fmt: skip


def exported_dirs(work: Path) -> list:
    """An exported directory whose manifest or files were changed each way, through evaluate (and train's teacher)."""
    from siclip.deploy.runtime import MANIFEST

    f = _files(work / "inputs")
    good = _exported(work)
    cases = []
    for name, change in _manifest_damage().items():
        folder = _copy(good, work / f"onnx_{name}")
        manifest = json.loads((folder / MANIFEST).read_text())
        change(folder, manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        cases += [Refusal("evaluate", ["--model", str(folder), "--zeroshot", str(f["test"])], (str(folder),)),
                  Refusal("train", ["--model", "siclip_tiny", "--teacher", str(folder), "--no-inherit", "--no-eval", "--out",
                                    str(work / f"t_{name}")], (str(folder),), out=work / f"t_{name}")]  # fmt: skip
    return cases


@dataclass
class Written:
    """A command run over a destination: ``expected`` status, its one line naming ``named`` (when refused); every
    file in ``kept`` unchanged afterwards (else: lost); ``check_after`` judges what is at the destination."""

    script: str
    argv: list[str]
    named: tuple[str, ...]
    kept: tuple[Path, ...] = ()
    expected: tuple[int, ...] = (2,)
    cwd: Path | None = None
    check_after: Callable[[], bool] | None = None

    def check(self) -> Outcome:
        before = {p: p.read_bytes() for p in self.kept}
        here = os.getcwd()
        if self.cwd is not None:
            os.chdir(self.cwd)
        try:
            status, err = in_process(self.script, self.argv)
        finally:
            os.chdir(here)
        lost = any(not p.exists() or p.read_bytes() != data for p, data in before.items())
        tidy = clear(err, status, self.expected, f"{self.script}.py", *self.named) if status != 0 else status in self.expected
        ok = tidy and (self.check_after is None or self.check_after())
        note = "" if ok else f"status {status}: {last_line(err)[:200]}"
        return Outcome(ok and not lost, lost=lost, unclear=not tidy, refusal=self.expected == (2,), clean_refusal=tidy and self.expected == (2,),
                       note=note)  # fmt: skip


KILL_IN_REPLACE = """
import os, sys
from siclip import storage
built, out, when = sys.argv[1], sys.argv[2], sys.argv[3]
real_exchange, real_rename = storage._exchange, os.rename
def exchange(a, b):
    if when == "before-exchange":
        os._exit(9)
    done = real_exchange(a, b)
    if when == "after-exchange":
        os._exit(9)
    return done
storage._exchange = (lambda a, b: False) if when == "between-renames" else exchange
calls = [0]
def rename(a, b):
    calls[0] += 1
    if when == "between-renames" and calls[0] == 2:
        os._exit(9)
    return real_rename(a, b)
os.rename = rename
storage.replace_directory(built, out)
"""


@dataclass
class KilledReplace:
    """A result replaced by :func:`siclip.storage.replace_directory` and the process killed at ``when``: the
    destination holds one complete result (the old or the new), or, where the exchange is unavailable and the kill
    fell between its two renames, the next writer (:func:`siclip.storage.recover_directory`) puts the old one back."""

    work: Path
    when: str

    def check(self) -> Outcome:
        from siclip.storage import recover_directory

        out, built = self.work / f"result-{self.when}", self.work / f".result-{self.when}.tmp-1-x"
        for folder, text in ((out, "old"), (built, "new")):
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                (folder / f"part{i}").write_text(text)
        done = subprocess.run([sys.executable, "-c", KILL_IN_REPLACE, str(built), str(out), self.when], capture_output=True, text=True, env=ENV)

        def complete() -> str | None:
            texts = {p.read_text() for p in out.glob("part*")} if out.is_dir() else set()
            return texts.pop() if len(texts) == 1 and len(list(out.glob("part*"))) == 3 else None

        at_once = complete()
        recover_directory(out)
        after = complete()
        ok = done.returncode == 9 and after is not None and (at_once is not None or self.when == "between-renames")
        return Outcome(ok, lost=after is None, note=f"{self.when}: at once {at_once}, after recovery {after}, status {done.returncode}")


@dataclass
class SignalledExport:
    """export.py in its own process, SIGTERM while it builds: status 143, one line, nothing left behind, an earlier
    export at --out intact."""

    work: Path
    model: Path

    def check(self) -> Outcome:
        out = self.work / "signalled" / "onnx"
        _copy(_exported(self.work), out)
        before = (out / "siclip_onnx.json").read_bytes()
        proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "export.py"), "--model", str(self.model), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and not list(out.parent.glob(".onnx.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        left = sorted(p.name for p in out.parent.iterdir() if p.name != "onnx")
        kept = (out / "siclip_onnx.json").exists() and ((out / "siclip_onnx.json").read_bytes() == before or proc.returncode == 0)
        tidy = proc.returncode == 0 or clear(err, proc.returncode, (143,), "export.py", "SIGTERM", error=False)
        return Outcome(tidy and kept and not left, lost=not kept, unclear=not tidy, note=f"status {proc.returncode}, left {left}: {last_line(err)[:160]}")


def destinations(work: Path) -> list:
    """Every command that writes an output, pointed where it must not write: a folder of the user's files, its own
    input, the current folder, a device, a socket; earlier results replaced; a kill inside the replacement; SIGTERM
    inside an export."""
    import socket

    _foreign()
    from foreign_models import save_open_clip

    from siclip.data import EmbeddedConfig, EmbeddedSource, write_shards
    from siclip.data.teacher_cache import is_teacher_cache

    f = _files(work / "inputs")
    model = f["model"]
    notes = work / "notes"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "thesis.txt").write_text("years of work")
    shards = work / "shards"
    if not shards.exists():
        write_shards(EmbeddedSource(EmbeddedConfig(num_train=8, image_size=32), "train"), shards, samples_per_shard=4)
    shard = sorted(shards.glob("*.tar"))[0]
    cache = work / "cache"
    earlier_export = _copy(_exported(work), work / "d")
    (earlier_export / "NOTES.md").write_text("n")
    replaced_export = _copy(_exported(work), work / "replaced")
    config, weights = save_open_clip(work / "oc")
    run_copy = work / "runs" / "tiny_copy"
    run_copy.mkdir(parents=True, exist_ok=True)
    save_checkpoint(create_model("mobileclip_tiny"), run_copy / "model.pt")
    sock = work / "sock"
    if not sock.exists():
        socket.socket(socket.AF_UNIX).bind(str(sock))
    captioned = work / "captioned"
    captioned.mkdir(exist_ok=True)
    (captioned / shard.name).write_bytes(b"someone else's shard")
    run = work / "run_with_notes"
    run.mkdir(exist_ok=True)
    (run / "notes.txt").write_text("mine")
    model_spec = ["--model", f"open_clip:{config}:{weights}"]
    teacher = ["--teacher", str(model), "--num-train", "8", "--batch-size", "8"]
    return [
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", str(notes)], (str(notes), "--overwrite"), (notes / "thesis.txt",)),
        Written("cache_teacher", [*teacher, "--data", str(shards), "--out", str(shards)], ("one of this command's inputs",), (shard,)),
        Written("cache_teacher", [*teacher, "--data", str(shard), "--out", str(shards), "--overwrite"], ("one of this command's inputs",), (shard,)),
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", str(model.parent), "--overwrite"], ("one of this command's inputs",), (model,)),
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", "."], ("the folder you are in",), (notes / "thesis.txt",), cwd=notes),
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", "/dev/full"], ("/dev/full", "character device")),
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", str(cache)], (), expected=(0,), check_after=lambda: is_teacher_cache(cache)),
        Written("cache_teacher", [*teacher, "--data", "embedded", "--out", str(cache)], (), expected=(0,), check_after=lambda: is_teacher_cache(cache)),
        Written("export", ["--model", str(model), "--out", str(earlier_export)], (str(earlier_export), "NOTES.md", "--overwrite"),
                (earlier_export / "NOTES.md", earlier_export / "image.onnx")),  # fmt: skip
        Written("export", ["--model", str(model), "--out", "."], ("the folder you are in",), (earlier_export / "NOTES.md",), cwd=earlier_export),
        Written("export", ["--model", str(model), "--out", str(model.parent), "--overwrite"], ("one of this command's inputs",), (model,)),
        Written("export", ["--model", str(model), "--out", "/dev/full"], ("/dev/full", "character device")),
        Written("export", ["--model", str(model), "--out", str(sock)], (str(sock), "socket")),
        Written("export", ["--model", str(model), "--out", str(work / "x"), "--opset", "17"], ("--opset",)),
        Written("export", ["--model", str(model), "--out", str(work / "x"), "--opset", "1e20"], ("--opset",)),
        Written("export", ["--model", str(model), "--out", str(replaced_export)], (), expected=(0,),
                check_after=lambda: sorted(p.name for p in replaced_export.iterdir()) == ["image.onnx", "siclip_onnx.json", "text.onnx"]),
        Written("convert_model", [*model_spec, "--out", str(run_copy / "model.pt")], (str(run_copy / "model.pt"), "--overwrite"), (run_copy / "model.pt",)),
        Written("convert_model", [*model_spec, "--out", str(weights), "--overwrite"], ("one of this command's inputs",), (weights,)),
        Written("convert_model", [*model_spec, "--out", str(config), "--overwrite"], ("one of this command's inputs",), (config,)),
        Written("convert_model", [*model_spec, "--out", "/dev/full"], ("/dev/full", "character device")),
        Written("convert_model", [*model_spec, "--out", str(sock)], (str(sock), "socket")),
        Written("convert_model", [*model_spec, "--out", str(notes)], (str(notes), "is a folder")),
        Written("convert_model", [*model_spec, "--out", str(work / "c.pt"), "--calibration-count", "1000000000"], ("--calibration-count",)),
        Written("convert_model", [*model_spec, "--out", str(work / "c.pt"), "--beta-ff", "1e308"], ("--beta-ff",)),
        Written("caption_shards", [str(shards), "--out", str(captioned)], (shard.name, "--overwrite"), (captioned / shard.name, shard)),
        Written("caption_shards", [str(shards), "--out", "/dev/full"], ("/dev/full",), (shard,)),
        Written("divergence_report", ["--model", "mobileclip_tiny", "--calibration-count", "1000000000", "--out", str(work / "r")],
                ("--calibration-count",)),
        Written("cache_teacher", ["--teacher", str(model), "--data", "embedded", "--num-train", "1000000000000", "--out", str(work / "k")], ("--num-train",)),
        Written("train", ["--num-train", "1000000000000", "--out", str(work / "t")], ("--num-train",)),
        Written("train", ["--model", "mobileclip_tiny", "--num-train", "16", "--batch-size", "8", "--epochs", "1", "--no-eval", "--out", str(run)],
                (), (run / "notes.txt",), expected=(0,)),  # fmt: skip
        Written("train", ["--model", "mobileclip_tiny", "--num-train", "16", "--batch-size", "8", "--epochs", "1", "--no-eval", "--overwrite",
                          "--out", str(run)], (), (run / "notes.txt",), expected=(0,)),  # fmt: skip
        *[KilledReplace(work, when) for when in ("before-exchange", "after-exchange", "between-renames")],
        SignalledExport(work, model),
    ]


# The first Ctrl-C lands in step {step}'s forward (train saves at its boundary); the second inside that checkpoint's
# write, at torch.save's {write}-th write to the file.
SECOND_SIGINT_IN_WRITE = """
import signal
import torch
from siclip.losses import ClipLoss
forward, calls = ClipLoss.forward, [0]
def step(self, *args):
    calls[0] += 1
    if calls[0] == {step}:
        os.kill(os.getpid(), signal.SIGINT)
    return forward(self, *args)
ClipLoss.forward = step
class Hit:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, data):
        self.n += 1
        if self.n == {write}:
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)
    def flush(self):
        self.f.flush()
real_save = torch.save
def save(obj, f, *args, **kwargs):
    hit = calls[0] >= {step} and hasattr(f, "write") and isinstance(obj, dict) and "optimizer" in obj
    return real_save(obj, Hit(f) if hit else f, *args, **kwargs)
torch.save = save
"""


def fault_signal_in_write(out: Path, reference: dict, rng: random.Random) -> Outcome:
    k = rng.randint(2, STEPS - 2)
    done = run_wrapped(out, SECOND_SIGINT_IN_WRITE.format(step=k, write=rng.randint(1, 6)), "--checkpoint-every", "1")
    path = out / "checkpoint.pt"
    tidy = clear(done.stderr, done.returncode, (130,), "train.py", "SIGINT", error=False) and "inline_container" not in done.stderr
    intact = readable(path) and (not path.exists() or load_training_checkpoint(path)["step"] in (k - 1, k))
    leftovers = list(out.glob(".*.tmp"))
    ok, unclear = finished(out, reference)
    note = "" if tidy else f"status {done.returncode}: {last_line(done.stderr)[:200]}"
    return Outcome(tidy and intact and not leftovers and ok, lost=not intact or not rows_once(out), unclear=not tidy or unclear, note=note)


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
        "signal-in-write": [("", fault_signal_in_write)] * 4,
    }  # fmt: skip
    input_cases = {"bad-argument": bad_arguments, "bad-file": bad_files, "bad-data": bad_data, "model-folder": model_folders,
                   "converted-file": converted_files, "exported-dir": exported_dirs, "destination": destinations, "network": network,
                   "remote-code": remote_code}  # fmt: skip
    _block_network()  # every in-process case: a connection attempt is recorded (fetched) and refused
    table: dict[str, list[int]] = defaultdict(lambda: [0] * 8)
    failures = []

    def record(category: str, label: str, outcome: Outcome) -> None:
        values = (1, outcome.survived, outcome.lost, outcome.unclear, outcome.executed, outcome.fetched, outcome.refusal, outcome.clean_refusal)
        for i, value in enumerate(values):
            table[category][i] += int(value)
        if not outcome.survived or outcome.lost or outcome.unclear or outcome.executed or outcome.fetched:
            failures.append(f"{category} {label}: {'survived' if outcome.survived else 'FAILED'} {outcome.note}")
            print(failures[-1], flush=True)

    for category in chosen:
        if category in input_cases:
            for i, case in enumerate(input_cases[category](work / category)):
                try:
                    outcome = case.check()
                except Exception as err:  # noqa: BLE001 - the harness reports a case it could not judge
                    outcome = Outcome(False, unclear=True, note=f"harness: {type(err).__name__}: {err}"[:300])
                record(category, f"#{i} {getattr(case, 'script', type(case).__name__)} {' '.join(getattr(case, 'argv', []))[:160]}", outcome)
        else:
            for round_ in range(args.rounds):
                for i, (label, inject) in enumerate(process_cases[category]):
                    out = work / f"{category}-{round_}-{i}"
                    try:
                        outcome = inject(out, reference, rng)
                    except Exception as err:  # noqa: BLE001 - the harness reports a case it could not judge
                        outcome = Outcome(False, unclear=True, note=f"harness: {type(err).__name__}: {err}")
                    record(category, f"{round_}.{i} {label}", outcome)
        n, ok, lost, unclear, executed, fetched, refusals, clean = table[category]
        print(f"{category}: {ok}/{n} survived, {lost} lost, {unclear} unclear, {executed} executed, {fetched} fetched, {clean}/{refusals} bad inputs "
              f"refused in one line with status 2 ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    total = [sum(v[i] for v in table.values()) for i in range(8)]
    print("\n| category | cases | survived | lost | unclear errors | executed | fetched | bad inputs: one line, status 2 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for category, (n, ok, lost, unclear, executed, fetched, refusals, clean) in table.items():
        print(f"| {category} | {n} | {ok} | {lost} | {unclear} | {executed} | {fetched} | {clean} / {refusals} |")
    print(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** | **{total[3]}** | **{total[4]}** | **{total[5]}** | "
          f"**{total[7]} / {total[6]}** |")  # fmt: skip
    print(f"\n{total[0]} cases in {time.perf_counter() - started:.0f} s; runs in {work}")
    return 0 if total[1] == total[0] and not any(total[2:6]) and total[6] == total[7] else 1


if __name__ == "__main__":
    sys.exit(main())
