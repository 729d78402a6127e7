"""SiCLIP's ablation on the embedded world, over seeds, with intervals and paired differences.

    siclip study ablation --preset smoke     # CI: a few steps per run, checks every stage's outputs
    siclip study ablation --preset cpu       # 2 CPU cores, about 60 minutes
    siclip study ablation --preset gpu --workers 12   # one H100 (16 host cores), about 10 minutes

1. Train a MobileCLIP-tiny teacher on world 0 (synthetic and raw captions, as the demo's teacher).
2. Train SiCLIP-tiny students on world 1, one factor at a time around "+WIKD+PM, synthetic captions, adjacent
   sharing, text tower" (``siclip.analysis.ablation.ROWS``), each over the preset's seeds.
3. Evaluate every run on the same items (world 0's zero-shot and retrieval sets), save per-item outcomes,
   and write ``ablation.md`` (mean ± std [95 % bootstrap interval] per metric, paired differences between
   neighbouring rows), ``ablation.csv``, ``differences.csv``, ``curves.png`` and ``rows.png`` to ``<out>/``.

Resumable: a run with ``outcomes.npz`` is done and skipped, an interrupted one continues from its checkpoint.
A row the model code cannot build (e.g. converting the image tower before that lands) is reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.analysis.ablation import (
    PRESETS, ROWS, load_outcomes, markdown_tables, plot_curves, plot_rows, run_and_evaluate, student_config, summarize,
    teacher_config, write_tables,
)  # fmt: skip
from siclip.train.malloc import keep_freed_memory
from siclip.wording import count


def build_parser() -> argparse.ArgumentParser:
    """``siclip ablation``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="the study's sizes (default: smoke)")
    parser.add_argument("--out", type=Path, default=None, help="the study folder (default: runs/ablation_<preset>)")
    parser.add_argument("--workers", type=cli.non_negative_int, default=0, metavar="N", help="data loader processes (default: 0)")
    parser.add_argument("--seeds", type=cli.positive_int, metavar="N", help="training seeds per row (default: the preset's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    p = PRESETS[args.preset]
    if args.seeds:
        p = dataclasses.replace(p, seeds=args.seeds)
    out = args.out or Path(f"runs/ablation_{args.preset}")
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out} exists and is not a directory")
    cli.on_interrupt(f"finished runs in {out} are kept and the interrupted one keeps its checkpoint: run the same command again to continue")
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps({"preset": args.preset, **dataclasses.asdict(p)}, indent=1))
    started = time.perf_counter()

    teacher_dir = out / "teacher"
    summary = run_and_evaluate(teacher_config(p, teacher_dir, args.workers), p)
    top1 = load_outcomes(teacher_dir / "outcomes.npz")["zeroshot_top1"].mean()
    print(f"teacher: zero-shot top-1 {100 * top1:.1f} % after {count(summary['steps'], 'step')} ({summary['seconds']:.0f} s)", flush=True)
    runs, parameters, skipped = {"teacher (MobileCLIP-tiny)": [teacher_dir]}, {"teacher (MobileCLIP-tiny)": summary["parameters"]}, {}
    for row in ROWS:
        runs[row.name] = []
        for seed in range(p.seeds):
            run_dir = out / f"{row.slug}_seed{seed}"
            try:
                summary = run_and_evaluate(student_config(p, row, seed, teacher_dir / "model.pt", run_dir, args.workers), p)
            except NotImplementedError as err:  # the model code cannot build this row yet: say so, keep the others
                skipped[row.name] = str(err)
                print(f"skipped row {row.name!r}: {err}", flush=True)
                break
            runs[row.name].append(run_dir)
            parameters[row.name] = summary["parameters"]
            print(f"{row.name} seed {seed}: {count(summary['steps'], 'step')} ({summary['seconds']:.0f} s)", flush=True)
    rows, differences = summarize(runs, parameters)
    md = write_tables(rows, differences, out)
    plot_curves({f"{r} seed 0": dirs[0] for r, dirs in runs.items() if dirs}, out / "curves.png")
    plot_rows(rows, out / "rows.png")
    if skipped:
        with md.open("a") as f:
            f.write("\n" + "\n".join(f"Skipped: {name} ({why})" for name, why in skipped.items()) + "\n")
    print(markdown_tables(rows, differences))
    print(f"{time.perf_counter() - started:.0f} s; tables {md}, ablation.csv, differences.csv; plots curves.png, rows.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
