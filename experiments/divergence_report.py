"""Jensen–Shannon divergences between a model's attention blocks, per tower, their heatmaps, and the sharing
plans picked.

    python experiments/divergence_report.py --checkpoint runs/demo/model.pt [--captions 256] [--images 128] [--out runs/reports]
    python experiments/divergence_report.py --model mobileclip_tiny        # an untrained model, for a look

The calibration batches are ``--captions`` synthetic captions (text blocks) and ``--images`` images (the image
encoder's attention blocks, over the positions of their feature map) of the embedded world's validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from siclip.analysis.divergence import calibration_images, image_divergences, plot_heatmap, sharing_plans, text_divergences
from siclip.data import EmbeddedConfig, EmbeddedSource, create_tokenizer
from siclip.models import create_model, load_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--model")
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/reports"))
    args = parser.parse_args(argv)
    model = (load_checkpoint(args.checkpoint) if args.checkpoint else create_model(args.model)).eval()
    name = model.config.name
    tokenizer = create_tokenizer("embedded", context_length=model.config.text.context_length)
    size = model.config.image.image_size
    val = EmbeddedSource(EmbeddedConfig(num_val=max(args.captions, args.images), image_size=size), "val")
    ids = tokenizer([val.load(i).synthetic[0] for i in range(args.captions)])
    towers = {"text": text_divergences(model, ids), "image": image_divergences(model, calibration_images(val, args.images, size))}
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
    sys.exit(main())
