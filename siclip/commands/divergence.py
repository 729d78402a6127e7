"""Jensen–Shannon divergences between the attention blocks of any model, per stack, their heatmaps and the sharing
plans they give; or, with ``--preset``, the divergence between adjacent blocks of both towers through a training run.

    siclip divergence --model runs/digits/model.pt --calibration-captions captions.txt --calibration-images photos/
    siclip divergence --model hf:models/clip --calibration-captions captions.txt --calibration-images photos/ --out runs/reports
    siclip divergence --model clip_sasp.pt --calibration-captions captions.txt --calibration-images photos/   # a converted file
    siclip divergence --model mobileclip_tiny          # an untrained model, on the embedded world, for a look
    siclip divergence --preset demo --snapshots 8 --out runs/divergence --run-dir runs/demo

--model: any model spec: a registered name, a siclip checkpoint (one trained on your data reads the captions through
its own tokenizer), Apple's mobileclip_s0.pt, hf:DIR, open_clip:ARCH:FILE, timm:NAME:FILE, or a converted file.
Its blocks are read on your captions and images (each through the model's own tokenizer and preprocessing, under its
own causal and padding masks), over the query rows that are real tokens (padding is never counted); a siclip model
without --calibration-captions/--calibration-images reads the embedded world's validation split.

The report prints as tables (rows read per stack, adjacent pairs, each strategy's plan) and is saved in --out as
divergence.md (the same tables), divergence.json (one schema: per stack its blocks, rows read, matrices and plans as
lists of lists, each plan's strategy and threshold as fields) and heatmaps.

--preset trains that preset of `siclip train` in segments (exact resume), snapshots the model at --snapshots evenly
spaced steps (step 0 included) and writes trajectory.csv and trajectory.png; rerunning continues where it stopped.
With --run-dir runs/demo the run is the demo's teacher, which `siclip demo` then reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.interop.calibration import MEASURABLE_HELP, check_measurable_spec
from siclip.train.presets import PRESETS
from siclip.wording import count

DEFAULT_COUNT = 64
PRESET_COUNT = 256  # the trajectory's captions, as experiments/RESULTS.md measured it
MAX_CALIBRATION = 4096  # captions and images held in memory at once, with every block's attention over them


def trajectory(preset: str, snapshots: int, count: int, out: Path, run_dir: Path) -> int:
    import pandas as pd

    from siclip.analysis.divergence import adjacent_trajectory, calibration_images, plot_trajectory
    from siclip.data import EmbeddedConfig, EmbeddedSource
    from siclip.models import get_model_config, load_checkpoint
    from siclip.train.inputs import prepare_run
    from siclip.train.loop import build_data, student_model_config
    from siclip.train.snapshots import train_with_snapshots

    config = dataclasses.replace(PRESETS[preset], out_dir=str(run_dir))
    model_config = student_model_config(config)  # the preset's model, image tower and overrides
    inputs = prepare_run(config, model_config)
    total = config.epochs * len(build_data(config, inputs, model_config.image.image_size, 0, 1))
    steps = sorted({round(total * k / (snapshots - 1)) for k in range(snapshots)})
    paths = train_with_snapshots(config, steps, progress=True)
    val = EmbeddedSource(EmbeddedConfig(seed=config.data.seed, num_val=count, image_size=model_config.image.image_size), "val")
    ids = inputs.tokenizer([val.load(i).synthetic[0] for i in range(count)])
    batch = calibration_images(val, min(count, 64), model_config.preprocess.at(model_config.image.image_size))
    rows = adjacent_trajectory({step: load_checkpoint(path) for step, path in paths.items()}, ids, batch)
    pd.DataFrame(rows).to_csv(out / "trajectory.csv", index=False)
    plot = plot_trajectory(rows, out / "trajectory.png", f"{config.model} ({preset}): JS divergence between adjacent blocks while training")
    print(pd.DataFrame(rows).pivot_table(index="step", columns=["tower", "pair"], values="attention").round(4).to_string())
    print(f"\n{out / 'trajectory.csv'} and {plot}")
    return 0


def report_of(spec: str, captions_file, images_dir, count: int, max_groups: int | None, apple_model: str):
    """The divergence report of any model spec on the calibration inputs: the inputs read (:mod:`siclip.data`), the
    model loaded with ``run`` over them (:mod:`siclip.interop`), its blocks measured (:mod:`siclip.analysis`)."""
    from siclip.analysis.divergence import divergence_report
    from siclip.data.calibration import calibration_inputs
    from siclip.interop.calibration import load_for_calibration

    embedded = 64 if needs_no_files(spec) else None
    captions, images, where = calibration_inputs(captions_file, images_dir, count, embedded_size=embedded)
    loaded = load_for_calibration(spec, captions, images, apple_model=apple_model)
    report = divergence_report(loaded.module, lambda: loaded.run(loaded.module), max_groups=max_groups, name=spec)
    return loaded, report, where


def needs_no_files(spec: str) -> bool:
    """A siclip model (a registered name, a checkpoint, Apple's file) reads the embedded world when no calibration
    file is given; another library's model, or one converted from it, reads only what the user gives."""
    from siclip.interop.calibration import spec_kind
    from siclip.interop.converted import is_converted_file

    kind = spec_kind(spec)
    return kind == "registered" or (kind == "file" and not is_converted_file(spec))


def check_calibration_files(parser, args) -> None:
    """Refuse, before any model loads, a model of another library without calibration files (the header of a converted
    file says what it is; nothing is built)."""
    if args.model is not None and args.calibration_captions is None and args.calibration_images is None and not needs_no_files(args.model):
        parser.error(f"--model {args.model} is another library's model (or converted from one): give --calibration-captions FILE and/or "
                     "--calibration-images DIR, what it reads (a CLIP both)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """``siclip divergence``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=cli.checked(check_measurable_spec), metavar="SPEC", help=f"the model to measure: {MEASURABLE_HELP}")
    source.add_argument("--preset", choices=sorted(PRESETS), help="divergences through a training run of this preset")
    # Old spellings, kept working and out of the help: --checkpoint and --spec were --model.
    cli.add_renamed(source, "--checkpoint", "--spec", new="--model", dest="model", type=cli.checked(check_measurable_spec))
    parser.add_argument("--calibration-captions", type=cli.existing_file, metavar="FILE",
                        help="calibration captions, one per line (default for a siclip model: the embedded world's)")  # fmt: skip
    parser.add_argument("--calibration-images", type=cli.existing_dir, metavar="DIR",
                        help="a folder of calibration images (default for a siclip model: the embedded world's)")  # fmt: skip
    parser.add_argument("--calibration-count", type=cli.int_in_range(2, MAX_CALIBRATION), default=None, metavar="N",
                        help=f"calibration captions and images to use ({DEFAULT_COUNT}; with --preset {PRESET_COUNT} captions, at most 64 "
                        f"images; at most {MAX_CALIBRATION})")  # fmt: skip
    # Old spellings: --caption-file and --image-folder here, --captions, --images and --count in siclip convert.
    cli.add_renamed(parser, "--caption-file", "--captions", new="--calibration-captions", dest="calibration_captions", type=cli.existing_file)
    cli.add_renamed(parser, "--image-folder", "--images", new="--calibration-images", dest="calibration_images", type=cli.existing_dir)
    cli.add_renamed(parser, "--count", new="--calibration-count", dest="calibration_count", type=cli.int_in_range(2, MAX_CALIBRATION))
    parser.add_argument("--max-groups", type=cli.positive_int, metavar="N",
                        help="with --model: runs of the optimal plan per stack (default half the blocks)")  # fmt: skip
    parser.add_argument("--apple-model", default="mobileclip_s0",
                        help="with --model FILE: the registered configuration a file in Apple's layout is built as (mobileclip_s0)")  # fmt: skip
    parser.add_argument("--snapshots", type=cli.int_at_least(2), default=None,
                        help="with --preset: snapshots, evenly spaced, step 0 included (8)")  # fmt: skip
    parser.add_argument("--run-dir", type=Path,
                        help="with --preset: the run's directory (default <out>/run); runs/demo makes it the demo's teacher")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/reports"), metavar="PATH",
                        help="folder for divergence.json and the heatmaps (runs/reports)")  # fmt: skip
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments: each refusal one line, before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None and args.preset is None:
        parser.error("give --model SPEC (the model to measure) or --preset NAME (divergences through a training run)")
    if args.preset is not None:
        bad = [flag for flag, value in (("--calibration-captions", args.calibration_captions), ("--calibration-images", args.calibration_images),
                                        ("--max-groups", args.max_groups)) if value is not None]  # fmt: skip
        if bad:
            parser.error(f"{', '.join(bad)}: not with --preset (a preset's run is measured on the embedded world's validation split)")
    else:
        bad = [flag for flag, value in (("--snapshots", args.snapshots), ("--run-dir", args.run_dir)) if value is not None]
        if bad:
            parser.error(f"{', '.join(bad)}: only with --preset")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a directory")
    check_calibration_files(parser, args)
    args.calibration_count = args.calibration_count or (PRESET_COUNT if args.preset else DEFAULT_COUNT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from siclip.train.malloc import keep_freed_memory

    keep_freed_memory()
    if args.preset:
        run_dir = args.run_dir or args.out / "run"
        cli.on_interrupt(f"the run in {run_dir} and its snapshots are kept: run the same command again to continue")
        args.out.mkdir(parents=True, exist_ok=True)
        return trajectory(args.preset, args.snapshots or 8, args.calibration_count, args.out, run_dir)
    with cli.user_input(NotImplementedError):  # a block siclip does not read (e.g. Post-LN): the user's model, not a bug
        _, report, where = report_of(args.model, args.calibration_captions, args.calibration_images, args.calibration_count,
                                     args.max_groups, args.apple_model)  # fmt: skip
    print(f"calibration: {where}\n")
    print(report)
    *heatmaps, tables, record = report.save(args.out)
    print(f"\nwritten to {args.out}: {record.name}, {tables.name} (these tables) and {count(len(heatmaps), 'heatmap')} "
          f"({', '.join(p.name for p in heatmaps)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
