"""Train a CLIP (MobileCLIP or SiCLIP) on the embedded world or on your data, then evaluate it.

    python experiments/train.py --preset demo                          # the demo's teacher (experiments/demo.py runs both)
    python experiments/train.py --preset demo-student                  # the demo's SiCLIP student of runs/demo/model.pt
    python experiments/train.py --model siclip_tiny --teacher runs/demo/model.pt --wikd --out runs/student
    python experiments/train.py --data data/shards --tokenizer clip --vocab-path bpe.txt.gz --model mobileclip_s0
    python experiments/train.py ... --resume                            # continue exactly where it stopped

Multi-GPU: ``torchrun --nproc_per_node=N experiments/train.py ...`` (features are gathered across ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from siclip.distill import ObjectiveConfig
from siclip.train import TrainConfig, train
from siclip.train.presets import PRESETS


def parse(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--model")
    parser.add_argument("--teacher", help="checkpoint to inherit from (SiCLIP models) and distil from (--wikd)")
    parser.add_argument("--wikd", action="store_true", help="feature, relation and interactive distillation + PM")
    parser.add_argument("--out", dest="out_dir")
    parser.add_argument("--data", dest="source", help="'embedded', a shard directory/pattern or a .csv/.tsv")
    parser.add_argument("--num-train", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--p-synthetic", type=float)
    parser.add_argument("--tokenizer", choices=["embedded", "clip"])
    parser.add_argument("--vocab-path")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fuse-frozen-towers", action="store_true", help="reparameterise the teacher and frozen student towers")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute trainable blocks' activations in backward")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset] if args.preset else TrainConfig()
    top = {k: getattr(args, k) for k in ("model", "teacher", "out_dir", "epochs", "lr") if getattr(args, k) is not None}
    data = {k: getattr(args, k) for k in ("source", "num_train", "batch_size", "workers", "p_synthetic", "tokenizer", "vocab_path")
            if getattr(args, k) is not None}  # fmt: skip
    flags = {k: True for k in ("compile", "fuse_frozen_towers", "grad_checkpointing") if getattr(args, k)}
    config = dataclasses.replace(config, **top, **flags, data=dataclasses.replace(config.data, **data))
    if args.wikd:
        config = dataclasses.replace(config, objective=ObjectiveConfig())
    return config, args.resume


def main(argv: list[str] | None = None) -> int:
    config, resume = parse(argv)
    summary = train(config, resume=resume)
    print(f"\n{config.model}: {summary['steps']} steps in {summary['seconds']:.0f} s, final loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["final_loss"].items()))  # fmt: skip
    print(f"parameters: {summary['parameters']}")
    if "eval" in summary:
        print("\n| metric | value |\n|---|---|")
        for name, value in summary["eval"].items():
            print(f"| {name} | {100 * value:.1f} % |")
    print(f"\nmodel, checkpoint, metrics.csv and summary.json in {config.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
