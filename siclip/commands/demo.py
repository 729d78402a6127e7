"""The main job: a MobileCLIP-tiny teacher, its SiCLIP-tiny student (WI + WIKD + PM), one table comparing them.

    siclip demo                  # CPU, under 10 minutes on 2 cores (runs/demo, runs/demo_student)
    siclip demo --out runs/x     # elsewhere; an interrupted demo resumes where it stopped

Both models are evaluated on the same items of the embedded world (zero-shot over its 100 classes,
retrieval on held-out images); inference throughput is timed interleaved, both models reparameterised,
so the speed ratio holds on a busy machine too. Ctrl-C (or SIGTERM) stops at the next step with one line saying
which run holds the state; running the demo again continues there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import sys
import time
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

import torch

from siclip.analysis.benchmark import device_name, encoder_throughput, to_markdown
from siclip.models import load_checkpoint, reparameterize_model
from siclip.train import TrainingInterrupted, train
from siclip.train.malloc import keep_freed_memory
from siclip.train.presets import PRESETS


def inference_rates(models: dict, *, batch: int = 64, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Images/s and texts/s of each (reparameterised) model on random inputs of its own sizes, round-robin."""
    fused = {name: reparameterize_model(m.eval()) for name, m in models.items()}
    config = next(iter(fused.values())).config
    images = torch.rand(batch, 3, config.image.image_size, config.image.image_size)
    ids = torch.randint(1, config.text.vocab_size, (batch, config.text.context_length))
    image = encoder_throughput({n: m.encode_image for n, m in fused.items()}, images, rounds=rounds)
    text = encoder_throughput({n: m.encode_text for n, m in fused.items()}, ids, rounds=rounds)
    return {name: {"images/s": image[name], "texts/s": text[name]} for name in fused}


def build_parser() -> argparse.ArgumentParser:
    """``siclip demo``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent of the teacher's and the student's run directories (default: runs)")
    parser.add_argument("--workers", type=cli.non_negative_int, default=0, metavar="N", help="data loader processes of both runs (default: 0)")
    parser.add_argument("--timing-rounds", type=cli.positive_int, default=5, help="interleaved rounds of the inference timing, their median reported (default: 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a directory")
    keep_freed_memory()
    again = f"run the demo again (make demo, or siclip demo --out {shlex.quote(str(args.out))}) to continue where it stopped"
    cli.on_interrupt(f"the runs in {args.out} keep their checkpoints: {again}")
    started = time.perf_counter()
    teacher_config, student_config = PRESETS["demo"], PRESETS["demo-student"]
    teacher_dir, student_dir = args.out / "demo", args.out / "demo_student"
    teacher_config = dataclasses.replace(teacher_config, out_dir=str(teacher_dir), data=dataclasses.replace(teacher_config.data, workers=args.workers))
    student_config = dataclasses.replace(student_config, out_dir=str(student_dir), teacher=str(teacher_dir / "model.pt"),
                                         data=dataclasses.replace(student_config.data, workers=args.workers))  # fmt: skip
    summaries = {}
    for name, config in (("teacher", teacher_config), ("student", student_config)):
        path = Path(config.out_dir) / "summary.json"
        done = path.exists() and "eval" in json.loads(path.read_text())
        started_before = Path(config.out_dir).exists()  # a fresh run starts quietly; an interrupted one resumes
        try:
            summaries[name] = json.loads(path.read_text()) if done else train(config, resume=started_before)
        except TrainingInterrupted as stopped:  # its own hint (--resume) is train.py's; the demo resumes by itself
            name_of = signal.Signals(stopped.signum).name
            raise cli.Interrupted(stopped.signum, f"{name_of} in the {name}'s run, whose state is kept in {config.out_dir}: {again}") from None
    models = {"teacher": load_checkpoint(teacher_dir / "model.pt"), "student": load_checkpoint(student_dir / "model.pt")}
    rates = inference_rates(models, rounds=args.timing_rounds)
    rows = []
    for name, summary in summaries.items():
        params, metrics = summary["parameters"], summary["eval"]
        rows.append({"model": f"{name}: {summary['model']}", "params image": params["image"], "params text": params["text"],
                     "params total": params["total"], "train steps": summary["steps"], "train s": summary["seconds"],
                     "zero-shot top-1 %": 100 * metrics["zeroshot_top1"], "zero-shot top-5 %": 100 * metrics["zeroshot_top5"],
                     "I→T R@1 %": 100 * metrics["image_to_text_R@1"], "T→I R@1 %": 100 * metrics["text_to_image_R@1"],
                     **rates[name]})  # fmt: skip
    print(f"\n{device_name('cpu')}, torch {torch.__version__}; inference reparameterised, batch 64, median of {args.timing_rounds} interleaved rounds\n")
    table = to_markdown(rows)
    print(table)
    (args.out / "demo_table.md").write_text(table + "\n")
    print(f"\n{time.perf_counter() - started:.0f} s in all; runs in {teacher_dir} and {student_dir}, table in {args.out / 'demo_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
