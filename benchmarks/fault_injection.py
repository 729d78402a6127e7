"""Fault injection: kill, signal, corrupt and crowd small CLI trainings in a loop; print what survived.

    python benchmarks/fault_injection.py --rounds 3                       # every fault, three times
    python benchmarks/fault_injection.py --rounds 1 --faults sigkill,corrupt

Every run is ``experiments/train.py`` on a MobileCLIP-tiny (64 embedded samples, batch 16, 2 epochs = 8
steps). One uninterrupted run gives the reference weights. Faults:

- ``sigkill``: SIGKILL after a random number of steps (checkpoints every step, so kills land in writes too);
  ``--resume`` until the run finishes.
- ``sigint`` / ``sigterm``: the signal after a random number of steps; the run must exit 130 / 143 with a
  checkpoint at the step it had reached; ``--resume`` finishes it.
- ``corrupt``: after a SIGTERM, the checkpoint is truncated, zeroed or overwritten with random bytes; ``--resume``
  must refuse with a ``CheckpointError`` naming the file, then ``--overwrite`` starts over.
- ``nan``: ``--lr 1e3``; the run must stop with ``NonFiniteLoss`` and leave no non-finite checkpoint.
- ``second-run``: two runs started together in one directory: one trains, the other must refuse, naming the
  first one's PID.

A fault is survived when the run ends with weights bit-identical to the reference (``nan``: stops cleanly
with a finite or no checkpoint) and every error was the clear one. Data lost counts faults after which a
step the run had saved could not be recovered: an unreadable checkpoint it wrote, or metrics rows written
twice or missing. Steps redone counts work repeated after a resume (the price of checkpoint spacing;
injected corruption makes the whole run redo).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siclip.models import load_checkpoint  # noqa: E402
from siclip.train.state import CheckpointError, load_training_checkpoint  # noqa: E402

FAULTS = ("sigkill", "sigint", "sigterm", "corrupt", "nan", "second-run")
STEPS = 8


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "train.py"), "--model", "mobileclip_tiny", "--num-train", "64",
            "--batch-size", "16", "--epochs", "2", "--out", str(out), "--no-eval", "--log-every", "1", *extra]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *extra), capture_output=True, text=True, env=ENV)


def rows(out: Path) -> list[int]:
    path = out / "metrics.csv"
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]] if path.exists() else []


def start_and_signal(out: Path, signum: int, after_steps: int, *extra: str) -> tuple[int, str, int]:
    """Start a run, send ``signum`` once it has logged ``after_steps`` steps; (status, stderr, steps done when sent)."""
    proc = subprocess.Popen(command(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    while proc.poll() is None and len(rows(out)) < after_steps:
        time.sleep(0.02)
    done = len(rows(out))
    proc.send_signal(signum)
    _, err = proc.communicate()
    return proc.returncode, err, done


def same_weights(out: Path, reference: dict) -> bool:
    if not (out / "model.pt").exists():
        return False
    weights = load_checkpoint(out / "model.pt").state_dict()
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


def resume_until_done(out: Path) -> tuple[bool, int]:
    """--resume until the run finishes; (every resume exited 0, steps redone)."""
    redone = 0
    for _ in range(3):
        start = load_training_checkpoint(out / "checkpoint.pt")["step"] if (out / "checkpoint.pt").exists() else 0
        before = max(rows(out), default=0)
        redone += max(0, before - start)
        if run(out, "--resume").returncode != 0:
            return False, redone
        if (out / "model.pt").exists():
            return True, redone
    return False, redone


def rows_once(out: Path) -> bool:
    return rows(out) == list(range(1, STEPS + 1))


def inject(fault: str, out: Path, reference: dict, rng: random.Random) -> tuple[bool, bool, int]:
    """(survived, data lost, steps redone) for one fault."""
    after = rng.randint(1, STEPS - 2)
    if fault == "sigkill":
        status, _, _ = start_and_signal(out, signal.SIGKILL, after, "--checkpoint-every", "1")
        readable = True
        if (out / "checkpoint.pt").exists():
            try:
                load_training_checkpoint(out / "checkpoint.pt")
            except CheckpointError:
                readable = False
        ok, redone = resume_until_done(out)
        return ok and readable and same_weights(out, reference) and rows_once(out), not readable or not rows_once(out), redone
    if fault in ("sigint", "sigterm"):
        signum = signal.SIGINT if fault == "sigint" else signal.SIGTERM
        status, err, done = start_and_signal(out, signum, after, "--checkpoint-every", "100")
        if (out / "model.pt").exists():  # the signal came after the last step: nothing to save, the run is done
            return same_weights(out, reference), not rows_once(out), 0
        saved = load_training_checkpoint(out / "checkpoint.pt")["step"]
        clean = status == 128 + signum and saved >= done and f"at step {saved}" in err
        ok, redone = resume_until_done(out)
        return clean and ok and same_weights(out, reference) and rows_once(out), saved < done or not rows_once(out), redone
    if fault == "corrupt":
        start_and_signal(out, signal.SIGTERM, after, "--checkpoint-every", "100")
        path = out / "checkpoint.pt"
        if not path.exists():
            return False, True, 0
        saved = load_training_checkpoint(path)["step"]
        data, how = path.read_bytes(), rng.choice(["truncate", "zero", "random"])
        path.write_bytes({"truncate": data[: rng.randrange(len(data))], "zero": b"", "random": rng.randbytes(len(data))}[how])
        refused = run(out, "--resume")
        clear = refused.returncode == 1 and "CheckpointError" in refused.stderr and str(path) in refused.stderr
        restarted = run(out, "--overwrite")
        return clear and restarted.returncode == 0 and same_weights(out, reference) and rows_once(out), False, saved
    if fault == "nan":
        result = run(out, "--lr", "1e3", "--checkpoint-every", "1")
        stopped = result.returncode == 1 and "NonFiniteLoss" in result.stderr and "non-finite" in result.stderr
        finite = True
        if (out / "checkpoint.pt").exists():
            state = load_training_checkpoint(out / "checkpoint.pt")
            tensors = [*state["task"]["student"].values(), *state["task"]["objective"].values()]
            finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        return stopped and finite, not finite, 0
    if fault == "second-run":  # two runs started together into one directory: one trains, the other refuses
        procs = [subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
        errs = [p.communicate()[1] for p in procs]
        winners = [i for i, p in enumerate(procs) if p.returncode == 0]
        if len(winners) != 1:
            return False, True, 0
        loser = 1 - winners[0]
        refused = procs[loser].returncode == 1 and f"PID {procs[winners[0]].pid}" in errs[loser]
        return refused and same_weights(out, reference) and rows_once(out), not rows_once(out), 0
    raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {FAULTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="directory for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    faults = args.faults.split(",")
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; choose from {FAULTS}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_injection_"))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    straight = work / "reference"
    if run(straight, "--overwrite").returncode != 0:
        raise SystemExit("the uninterrupted reference run failed")
    reference = load_checkpoint(straight / "model.pt").state_dict()
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for round_ in range(args.rounds):
        for fault in faults:
            survived, lost, redone = inject(fault, work / f"{fault}-{round_}", reference, rng)
            for i, value in enumerate((1, survived, lost, redone)):
                table[fault][i] += int(value)
            print(f"round {round_} {fault}: {'survived' if survived else 'FAILED'}{', data lost' if lost else ''}", flush=True)
    total = [sum(v[i] for v in table.values()) for i in range(4)]
    print("\n| fault | injected | survived | data lost | steps redone |\n|---|---|---|---|---|")
    for fault, (n, ok, lost, redone) in table.items():
        print(f"| {fault} | {n} | {ok} | {lost} | {redone} |")
    print(f"| total | {total[0]} | {total[1]} | {total[2]} | {total[3]} |")
    print(f"\n{args.rounds} round(s) of {STEPS}-step MobileCLIP-tiny runs in {time.perf_counter() - started:.0f} s; runs in {work}")
    return 0 if total[1] == total[0] and total[2] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
