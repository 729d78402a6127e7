"""When distillation pays: baseline, KD only, +WI, +WIKD, +WIKD+PM across student training-set sizes.

    siclip study data-scale --preset smoke     # CI: every cell, a few steps each
    siclip study data-scale --preset cpu       # 2 CPU cores (see experiments/RESULTS.md for its time)
    siclip study data-scale --preset gpu --workers 12   # one H100 (16 host cores), about 10 minutes
    siclip study data-scale --preset cpu --report       # tables and figure from the runs finished so far

1. Train a MobileCLIP-tiny teacher on world 0 (the ablation's teacher).
2. Train SiCLIP-tiny students on N pairs of world 1 for every N of the preset, all for the same number of steps,
   in the rows of ``siclip.analysis.data_scale.GRID_ROWS``; then the open rows (inherited parts trainable, image
   tower converted shared/unshared, 1 and 3 synthetic captions) at the preset's ``open_size``.
3. Evaluate every run on the same items, and write ``data_scale.md`` (per N: mean ± std [95 % interval] per row and
   paired differences), ``data_scale.csv``, ``differences.csv`` and ``data_scale.png`` (top-1 and R@1 against N)
   to ``<out>/``.

Resumable: a run with ``outcomes.npz`` is done and skipped, an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.analysis.ablation import load_outcomes, run_and_evaluate, student_config, summarize, teacher_config
from siclip.analysis.data_scale import (
    GRID_COMPARISONS, OPEN_COMPARISONS, PRESETS, cells, markdown_by_size, plot_scale, preset_record, run_name, tables_by_size,
)  # fmt: skip
from siclip.analysis.study import open_study
from siclip.train.malloc import keep_freed_memory
from siclip.wording import count

TEACHER = "teacher (MobileCLIP-tiny)"


def build_parser() -> argparse.ArgumentParser:
    """``siclip data-scale``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="the study's sizes (default: smoke)")
    parser.add_argument("--out", type=Path, default=None, help="the study folder (default: runs/data_scale_<preset>)")
    parser.add_argument("--workers", type=cli.non_negative_int, default=0, metavar="N", help="data loader processes (default: 0)")
    parser.add_argument("--seeds", type=cli.positive_int, metavar="N", help="training seeds per cell (default: the preset's)")
    parser.add_argument("--report", action="store_true", help="tables and figure from the runs finished so far; trains nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    preset = PRESETS[args.preset]
    if args.seeds:
        preset = dataclasses.replace(preset, base=dataclasses.replace(preset.base, seeds=args.seeds))
    p = preset.base
    out = args.out or Path(f"runs/data_scale_{args.preset}")
    cli.on_interrupt(f"finished runs in {out} are kept and the interrupted one keeps its checkpoint: run the same command again to continue")
    # more or fewer seeds is the same study (each seed's runs are the same); another preset's runs are not
    open_study(out, preset_record(args.preset, preset), report=args.report)
    teacher_dir = out / "teacher"
    if args.report and not (teacher_dir / "outcomes.npz").is_file():
        raise cli.UserError(f"{out} has no finished teacher yet ({teacher_dir / 'outcomes.npz'}): nothing to report")
    started = time.perf_counter()

    summary = run_and_evaluate(teacher_config(p, teacher_dir, args.workers), p)  # read only, once finished
    print(f"teacher: zero-shot top-1 {100 * load_outcomes(teacher_dir / 'outcomes.npz')['zeroshot_top1'].mean():.1f} % "
          f"after {count(summary['steps'], 'step')} ({summary['seconds']:.0f} s)", flush=True)  # fmt: skip
    runs: dict[int, dict[str, list[Path]]] = {n: {} for n in preset.sizes}
    parameters: dict[str, dict] = {TEACHER: summary["parameters"]}
    for n, row in cells(preset):
        runs[n][row.name] = []
        for seed in range(p.seeds):
            run_dir = out / run_name(n, row, seed)
            if args.report and not (run_dir / "outcomes.npz").is_file():
                continue
            config = student_config(p, row, seed, teacher_dir / "model.pt", run_dir, args.workers, samples=n, epochs=preset.epochs(n))
            done = run_and_evaluate(config, p)
            runs[n][row.name].append(run_dir)
            parameters[row.name] = done["parameters"]
            print(f"N={n} {row.name} seed {seed}: {count(done['steps'], 'step')} ({done['seconds']:.0f} s)", flush=True)

    frames = {n: summarize({TEACHER: [teacher_dir], **by_row}, parameters, comparisons=GRID_COMPARISONS + OPEN_COMPARISONS)
              for n, by_row in runs.items() if any(by_row.values())}  # fmt: skip
    rows, differences = tables_by_size(frames)
    rows.to_csv(out / "data_scale.csv", index=False)
    differences.to_csv(out / "differences.csv", index=False)
    markdown = markdown_by_size(frames, preset)
    (out / "data_scale.md").write_text(markdown)
    plot_scale(rows, out / "data_scale.png", teacher=rows[rows["row"] == TEACHER].iloc[0])
    print(markdown)
    print(f"{time.perf_counter() - started:.0f} s; data_scale.md, data_scale.csv, differences.csv, data_scale.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
