"""The scaling-down study: *Scaling (Down) CLIP*'s claims at equal compute, SiCLIP beside its strategies, teacher quality.

    siclip study scaling-down --preset smoke                    # CI: every claim's cells, a few steps each
    siclip study scaling-down --preset cpu                      # 2 CPU cores: 1 h 37 min measured (RESULTS.md)
    siclip study scaling-down --preset cpu --claims 1,4 --seeds 3   # a slice: those claims' cells only; the rest later
    siclip study scaling-down --preset gpu --workers 12         # one GPU (16 host cores): the grid at 50× the compute
    siclip study scaling-down --preset cpu --report             # tables, verdicts and figures from the runs finished so far

1. Train the teachers the chosen claims need on world 0: MobileCLIP-tiny (the ablation's; its checkpoint after an eighth of
   its steps is the early teacher) and a wider one; evaluate each on the shared items.
2. Score the noisy world (world 1, caption noise 0.5) with the teacher's CLIP score and keep the best half; draw a random
   half of the same size (claim 1).
3. Train and evaluate every cell of the chosen claims over the seeds (siclip.analysis.scaling_down: budgets in training
   FLOPs, the same 1,000 zero-shot and 1,000 retrieval items for every row).
4. Write to --out: claim<k>.csv, differences.json / differences.md (paired differences, 95 % intervals), verdicts.json,
   scaling_down.md (verdicts and tables), timings.csv (wall seconds per run), compute.png (accuracy against TFLOPs),
   sizes.png (accuracy against N), quality.png (quality against quantity).

Resumable: a run with outcomes.npz is done and read, an interrupted one continues from its checkpoint; more --seeds or
other --claims continue the same study; another preset in the same --out is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.analysis.scaling_down import PRESETS, claims, needs, preset_record, study_cells
from siclip.wording import count

ALL_CLAIMS = (1, 2, 3, 4, 5, 6)


def claim_numbers(text: str) -> tuple[int, ...]:
    """``"1,3,6"`` → (1, 3, 6): claims of the study."""
    try:
        numbers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected claim numbers separated by commas (e.g. 1,3,6), got {text!r}") from None
    if not numbers or not set(numbers) <= set(ALL_CLAIMS):
        raise argparse.ArgumentTypeError(f"claims are numbered 1 to 6, got {text!r}")
    return numbers


def build_parser() -> argparse.ArgumentParser:
    """``siclip study scaling-down``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke", help="the study's sizes (default: smoke)")
    parser.add_argument("--out", type=Path, default=None, help="the study folder (default: runs/scaling_down_<preset>)")
    parser.add_argument("--claims", type=claim_numbers, default=ALL_CLAIMS, metavar="K,…",
                        help="run only these claims' cells, e.g. 1,3,6 (default: all, 1,2,3,4,5,6)")
    parser.add_argument("--seeds", type=cli.positive_int, metavar="N", help="training seeds per cell (default: the preset's: 3, smoke 2)")
    parser.add_argument("--workers", type=cli.non_negative_int, default=0, metavar="N", help="data loader processes (default: 0)")
    parser.add_argument("--report", action="store_true", help="tables, verdicts and figures from the runs finished so far; trains nothing")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from siclip.analysis.study import open_study
    from siclip.train.malloc import keep_freed_memory

    keep_freed_memory()
    preset = PRESETS[args.preset]
    if args.seeds:
        preset = dataclasses.replace(preset, base=dataclasses.replace(preset.base, seeds=args.seeds))
    out = args.out or Path(f"runs/scaling_down_{args.preset}")
    open_study(out, preset_record(args.preset, preset), report=args.report)
    cli.on_interrupt(f"finished runs in {out} are kept and the interrupted one keeps its checkpoint: run the same command again to continue")
    started = time.perf_counter()
    if not args.report:
        run_study(preset, out, args.claims, args.workers)
    report(preset, out)
    print(f"{time.perf_counter() - started:.0f} s; scaling_down.md, verdicts.json, claim<k>.csv, differences.json/.md and figures in {out}")
    return 0


def run_study(preset, out: Path, numbers: tuple[int, ...], workers: int) -> None:
    """Teachers, filter and every cell of the chosen claims, each over the seeds; finished runs are only read."""
    from siclip.analysis.ablation import run_and_evaluate, teacher_config
    from siclip.analysis.scaling_down import StudyPaths, cell_config, evaluate_checkpoint, filter_noisy_world, record_time, wide_teacher_overrides
    from siclip.train.snapshots import train_with_snapshots

    p, paths = preset.base, StudyPaths(out)
    cells = study_cells(preset, numbers)
    need = needs(cells)
    if "teacher" in need:
        config = teacher_config(p, out / "teacher", workers)
        if not (out / "teacher" / "outcomes.npz").is_file():
            t0 = time.perf_counter()
            snapshot = train_with_snapshots(config, [preset.early_step])[preset.early_step]  # the early teacher's weights
            (out / "teacher_early").mkdir(exist_ok=True)
            shutil.copyfile(snapshot, out / "teacher_early" / "model.pt")
            run_and_evaluate(config, p)
            record_time(out, "teacher", 0, time.perf_counter() - t0)
        _say_teacher(out / "teacher", "teacher")
    if "early" in need:
        evaluate_checkpoint(out / "teacher_early" / "model.pt", p, out / "teacher_early" / "outcomes.npz")
        _say_teacher(out / "teacher_early", f"early teacher (step {preset.early_step})")
    if "wide" in need:
        config = dataclasses.replace(teacher_config(p, out / "teacher_wide", workers), model_overrides=wide_teacher_overrides(preset))
        if not (out / "teacher_wide" / "outcomes.npz").is_file():
            t0 = time.perf_counter()
            run_and_evaluate(config, p)
            record_time(out, "teacher_wide", 0, time.perf_counter() - t0)
        _say_teacher(out / "teacher_wide", "wide teacher")
    if "filter" in need:
        summary = filter_noisy_world(preset, paths)
        noise = summary["noise"]
        print(f"filter: kept {summary['kept']} of {summary['pairs']} noisy-world pairs; noise {noise['noise_before']:.1%} → "
              f"{noise['noise_after']:.1%} (precision {noise['precision']:.1%}, recall {noise['recall']:.1%})", flush=True)  # fmt: skip
    for seed in range(p.seeds):  # seed by seed: a study cut short has every cell of its first seeds
        for cell in cells:
            run_dir = paths.run(cell, seed)
            if (run_dir / "outcomes.npz").is_file():
                continue
            t0 = time.perf_counter()
            done = run_and_evaluate(cell_config(preset, cell, seed, paths, workers), p)
            wall = record_time(out, cell.slug, seed, time.perf_counter() - t0)
            spent = f", {done['flops_spent'] / 1e12:.2f} TFLOPs" if "flops_spent" in done else ""
            print(f"{cell.slug} seed {seed}: {count(done['steps'], 'step')}{spent}, {wall:.0f} s with evaluation", flush=True)


def _say_teacher(run: Path, name: str) -> None:
    from siclip.analysis.ablation import load_outcomes

    top1 = load_outcomes(run / "outcomes.npz")["zeroshot_top1"].mean()
    print(f"{name}: zero-shot top-1 {100 * top1:.1f} %", flush=True)


def report(preset, out: Path) -> None:
    """Every claim's tables and verdict from the runs finished so far (a claim with none: not resolved), and the figures."""
    from siclip.analysis.scaling_down import StudyPaths, plot_compute, plot_quality, plot_sizes, summarize_claim, write_outputs

    p, paths = preset.base, StudyPaths(out)
    teachers = {"teacher (MobileCLIP-tiny)": out / "teacher", "early teacher": out / "teacher_early", "wide teacher": out / "teacher_wide"}
    results, titles, flops, parameters = {}, {}, {}, {}
    for claim in claims(preset):
        runs: dict[str, list[Path]] = {}
        for label, cell in claim.cells.items():
            dirs = [paths.run(cell, s) for s in range(p.seeds)]
            runs[label] = [d for d in dirs[: _finished_prefix(dirs)]]  # seeds 0..k-1, so rows pair seed by seed
            for d in runs[label]:
                summary = json.loads((d / "summary.json").read_text())
                parameters[label] = summary["parameters"]
                if "flops_spent" in summary:
                    flops.setdefault(label, []).append(summary["flops_spent"] / 1e12)
        if claim.number == 6:  # the teachers' own strength on the same items
            runs |= {name: [d] for name, d in teachers.items() if (d / "outcomes.npz").is_file()}
            parameters |= {name: json.loads((d / "summary.json").read_text())["parameters"] for name, d in teachers.items()
                           if (d / "summary.json").is_file()}  # fmt: skip
        results[claim.number] = summarize_claim(claim, runs, parameters)
        titles[claim.number] = claim.title
    mean_flops = {label: sum(v) / len(v) for label, v in flops.items()}
    filter_summary = out / "filter" / "filter.json"
    noise = json.loads(filter_summary.read_text())["noise"] if filter_summary.is_file() else None
    note = _note(preset, noise, out)
    md = write_outputs(results, titles, out, mean_flops, note)
    compute_rows = [results[n]["rows"] for n in (3, 5) if len(results[n]["rows"])]
    if compute_rows:
        import pandas as pd

        plot_compute(pd.concat(compute_rows).drop_duplicates("row"), mean_flops, out / "compute.png", budgets=preset.budgets,
                     retrieval_images=p.eval_images)
        plot_sizes(pd.concat(compute_rows + [results[2]["rows"]]).drop_duplicates("row"), out / "sizes.png", retrieval_images=p.eval_images)
    quality = [results[n]["rows"] for n in (1, 4) if len(results[n]["rows"])]
    if quality:
        import pandas as pd

        plot_quality(pd.concat(quality).drop_duplicates("row").reset_index(drop=True), out / "quality.png", noise, retrieval_images=p.eval_images)
    print(md.read_text())


def _finished_prefix(dirs: list[Path]) -> int:
    k = 0
    while k < len(dirs) and (dirs[k] / "outcomes.npz").is_file():
        k += 1
    return k


def _note(preset, noise: dict | None, out: Path) -> str:
    p = preset.base
    lines = [f"Preset: budgets {', '.join(f'{b:g}' for b in preset.budgets)} TFLOPs, N ∈ {{{', '.join(f'{n:,}' for n in preset.sizes)}}}, "
             f"claims 1, 2, 4 at {preset.budget:g} TFLOPs and N = {preset.n:,}, claim 6 at {preset.kd_steps} steps; student batch "
             f"{preset.student_batch}, {p.image_size} px; {count(p.seeds, 'seed')}; evaluated on {100 * p.eval_per_class:,} zero-shot and "
             f"{p.eval_images:,} retrieval images of world 0 (the same for every row).",
             "SiCLIP rows count their teacher's forward passes in their FLOPs, not the teacher's own training: weight inheritance "
             "reuses it as a sunk cost, as a user who holds a pretrained CLIP does."]  # fmt: skip
    if noise:
        lines.append(f"Noisy world: caption noise {preset.caption_noise:g}; the teacher's CLIP-score filter kept {preset.keep_fraction:.0%} "
                     f"with precision {noise['precision']:.1%} and recall {noise['recall']:.1%} as a noise detector "
                     f"({noise['noise_before']:.1%} noisy before, {noise['noise_after']:.1%} after).")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(cli.run(main))
