"""FLOPs and parameters of every registered model (inference form, one image at its size, one caption), and the
FLOPs of one CLIP-loss training step (train-time form, forward and backward, per pair at --train-batch).

    siclip flops [--out runs/reports] [--train-batch 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.analysis.benchmark import to_markdown
from siclip.analysis.flops import model_report
from siclip.models import create_model, list_models, reparameterize_model


def build_parser() -> argparse.ArgumentParser:
    """``siclip flops``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/reports"), help="output directory (runs/reports)")
    parser.add_argument("--train-batch", type=cli.int_at_least(2), default=2,
                        help="pairs of the measured training step; its FLOPs are reported per pair too (2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a directory")
    rows = [model_report(reparameterize_model(create_model(name).eval())).to_dict()
            | {k: v for k, v in model_report(create_model(name), train_batch=args.train_batch).items() if "train" in k}
            for name in list_models()]  # fmt: skip
    table = to_markdown(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops.md").write_text(table + "\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(args.out / "flops.csv", index=False)
    print(f"\nwritten to {args.out / 'flops.md'} and flops.csv")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
