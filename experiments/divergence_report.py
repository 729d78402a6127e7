"""Jensen–Shannon divergences between a model's text blocks, their heatmaps, and the sharing plans picked.

    python experiments/divergence_report.py --checkpoint runs/demo/model.pt [--captions 256] [--out runs/reports]
    python experiments/divergence_report.py --model mobileclip_tiny        # an untrained model, for a look

The calibration batch is ``--captions`` synthetic captions of the embedded world's validation split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from siclip.analysis.divergence import plot_heatmap, sharing_plans, text_divergences
from siclip.data import EmbeddedConfig, EmbeddedSource, create_tokenizer
from siclip.models import create_model, load_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--model")
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/reports"))
    args = parser.parse_args(argv)
    model = (load_checkpoint(args.checkpoint) if args.checkpoint else create_model(args.model)).eval()
    name = model.config.name
    tokenizer = create_tokenizer("embedded", context_length=model.config.text.context_length)
    val = EmbeddedSource(EmbeddedConfig(num_val=args.captions), "val")
    ids = tokenizer([val.load(i).synthetic[0] for i in range(args.captions)])
    divergences = text_divergences(model, ids)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": name, "captions": args.captions}
    for kind in ("attention", "features"):
        matrix = divergences[kind]
        path = plot_heatmap(matrix, args.out / f"divergence_{name}_{kind}.png", f"{name}: JS between text blocks ({kind})")
        plans = {strategy: str(plan) for strategy, plan in sharing_plans(matrix).items()}
        report[kind] = {"matrix": matrix.tolist(), "heatmap": str(path), "plans": plans}
        print(f"\n{kind} divergence (nats) between text blocks:\n{matrix.numpy().round(5)}")
        print("| strategy | plan |\n|---|---|\n" + "\n".join(f"| {s} | {p} |" for s, p in plans.items()))
    (args.out / f"divergence_{name}.json").write_text(json.dumps(report, indent=1))
    print(f"\nheatmaps and divergence_{name}.json written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
