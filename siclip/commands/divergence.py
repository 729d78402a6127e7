"""Jensen–Shannon divergences between a model's attention blocks, per tower, their heatmaps, and the sharing
plans picked; or, with ``--preset``, the divergence between adjacent blocks of both towers through a training run.

    python experiments/divergence_report.py --checkpoint runs/demo/model.pt [--captions 256] [--images 128] [--out runs/reports]
    python experiments/divergence_report.py --model mobileclip_tiny        # an untrained model, for a look
    python experiments/divergence_report.py --preset demo --snapshots 8 --out runs/divergence --run-dir runs/demo
    python experiments/divergence_report.py --spec hf:models/clip --caption-file captions.txt --image-folder photos/ --out runs/reports

``--spec`` reads a model someone else wrote (``hf:DIR``, ``open_clip:ARCH:FILE``, ``timm:NAME:FILE``): the divergence
between the blocks of each of its stacks on your captions and images (through its own tokenizer and preprocessing,
under its own causal and padding masks), before any conversion: the table, heatmaps, ``divergence.json`` and the
optimal plan (``--max-groups`` runs per stack).

The calibration batches are ``--captions`` synthetic captions (text blocks) and ``--images`` images (the image
encoder's attention blocks, over the positions of their feature map) of the embedded world's validation split.
``--preset`` trains that preset of ``experiments/train.py`` in segments (exact resume), snapshots the model at
``--snapshots`` evenly spaced steps (step 0 included) and writes ``trajectory.csv`` and ``trajectory.png``;
rerunning continues where it stopped. With ``--run-dir runs/demo`` the run is the demo's teacher, which
``experiments/demo.py`` then reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

import pandas as pd

from siclip.analysis.divergence import (
    adjacent_trajectory, calibration_images, image_divergences, plot_heatmap, plot_trajectory, sharing_plans, text_divergences,
)  # fmt: skip
from siclip.data import EmbeddedConfig, EmbeddedSource, create_tokenizer
from siclip.models import create_model, list_models, load_checkpoint
from siclip.train.inputs import prepare_run
from siclip.train.loop import build_data, student_model_config
from siclip.train.malloc import keep_freed_memory
from siclip.train.presets import PRESETS
from siclip.train.snapshots import train_with_snapshots


def trajectory(preset: str, snapshots: int, captions: int, images: int, out: Path, run_dir: Path) -> int:
    config = dataclasses.replace(PRESETS[preset], out_dir=str(run_dir))
    model_config = student_model_config(config)  # the preset's model, image tower and overrides
    inputs = prepare_run(config, model_config)
    total = config.epochs * len(build_data(config, inputs, model_config.image.image_size, 0, 1))
    steps = sorted({round(total * k / (snapshots - 1)) for k in range(snapshots)})
    paths = train_with_snapshots(config, steps, progress=True)
    val = EmbeddedSource(EmbeddedConfig(seed=config.data.seed, num_val=captions, image_size=model_config.image.image_size), "val")
    ids = inputs.tokenizer([val.load(i).synthetic[0] for i in range(captions)])
    batch = calibration_images(val, images, model_config.preprocess.at(model_config.image.image_size))
    rows = adjacent_trajectory({step: load_checkpoint(path) for step, path in paths.items()}, ids, batch)
    pd.DataFrame(rows).to_csv(out / "trajectory.csv", index=False)
    plot = plot_trajectory(rows, out / "trajectory.png", f"{config.model} ({preset}): JS divergence between adjacent blocks while training")
    print(pd.DataFrame(rows).pivot_table(index="step", columns=["tower", "pair"], values="attention").round(4).to_string())
    print(f"\n{out / 'trajectory.csv'} and {plot}")
    return 0


def foreign_report(args) -> int:
    from siclip.analysis.divergence import spec_divergences
    from siclip.data.sources import read_image_folder
    from siclip.train.evaluation import read_caption_file

    with cli.user_input(NotImplementedError):  # a block siclip does not read (e.g. Post-LN): the user's model, not a bug
        captions = read_caption_file(args.caption_file)[: args.captions] if args.caption_file else None
        images = read_image_folder(args.image_folder, args.images) if args.image_folder else None
        _, _, report = spec_divergences(args.spec, captions=captions, images=images, max_groups=args.max_groups)
    print(report)
    paths = report.save(args.out)
    print(f"\nheatmaps and {paths[-1].name} written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=cli.existing_file, help="a siclip model checkpoint (model.pt)")
    source.add_argument("--model", choices=list_models(), metavar="MODEL", help=f"an untrained model: {', '.join(list_models())}")
    source.add_argument("--preset", choices=sorted(PRESETS), help="divergences through a training run of this preset")
    source.add_argument("--spec", help="a transformers, open_clip or timm model: hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE")
    parser.add_argument("--caption-file", type=cli.existing_file, help="with --spec: calibration captions, one per line")
    parser.add_argument("--image-folder", type=cli.existing_dir, help="with --spec: a folder of calibration images")
    parser.add_argument("--max-groups", type=cli.positive_int, help="with --spec: runs of the optimal plan per stack (default half the blocks)")
    parser.add_argument("--snapshots", type=cli.int_at_least(2), default=8, help="with --preset: snapshots, evenly spaced, step 0 included (≥ 2)")
    parser.add_argument("--run-dir", type=Path, help="with --preset: the run's directory (default <out>/run); runs/demo makes it the demo's teacher")
    parser.add_argument("--captions", type=cli.int_at_least(2), default=256)
    parser.add_argument("--images", type=cli.int_at_least(2), default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/reports"))
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a directory")
    keep_freed_memory()
    if args.spec:
        return foreign_report(args)
    if args.preset:
        run_dir = args.run_dir or args.out / "run"
        cli.on_interrupt(f"the run in {run_dir} and its snapshots are kept: run the same command again to continue")
        args.out.mkdir(parents=True, exist_ok=True)
        return trajectory(args.preset, args.snapshots, args.captions, min(args.images, 64), args.out, run_dir)
    with cli.user_input():
        model = (load_checkpoint(args.checkpoint) if args.checkpoint else create_model(args.model)).eval()
    name = model.config.name
    tokenizer = create_tokenizer("embedded", context_length=model.config.text.context_length)
    size = model.config.image.image_size
    val = EmbeddedSource(EmbeddedConfig(num_val=max(args.captions, args.images), image_size=size), "val")
    ids = tokenizer([val.load(i).synthetic[0] for i in range(args.captions)])
    towers = {"text": text_divergences(model, ids), "image": image_divergences(model, calibration_images(val, args.images, model.preprocess))}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": name, "captions": args.captions, "images": args.images}
    for tower, divergences in towers.items():
        report[tower] = {}
        for kind in ("attention", "features"):
            matrix = divergences[kind]
            title = f"{name}: JS between {tower} blocks ({kind})"
            path = plot_heatmap(matrix, args.out / f"divergence_{name}_{tower}_{kind}.png", title)
            plans = {strategy: str(plan) for strategy, plan in sharing_plans(matrix).items()}
            report[tower][kind] = {"matrix": matrix.tolist(), "heatmap": str(path), "plans": plans}
            print(f"\n{kind} divergence (nats) between {tower} blocks:\n{matrix.numpy().round(5)}")
            print("| strategy | plan |\n|---|---|\n" + "\n".join(f"| {s} | {p} |" for s, p in plans.items()))
    (args.out / f"divergence_{name}.json").write_text(json.dumps(report, indent=1))
    print(f"\nheatmaps and divergence_{name}.json written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
