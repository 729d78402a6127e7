"""SiCLIP's ablation on the embedded world: WI, WIKD and PM, raw against synthetic captions, sharing plans.

    python experiments/ablation.py --preset smoke     # CI: a few steps per run
    python experiments/ablation.py --preset cpu       # 2-core CPU, under 30 minutes
    python experiments/ablation.py --preset gpu       # a CUDA machine

1. Train a MobileCLIP-tiny teacher on a large set with accurate (synthetic) captions.
2. Train SiCLIP-tiny students on a small set: baseline (no inheritance, CLIP loss), +WI, +WIKD, +WIKD+PM,
   each with raw or synthetic captions and with sharing none / adjacent pairs / chosen by divergence.
3. Print and save the table (parameters, zero-shot top-1, R@1 both ways), training curves and the
   accuracy–parameters plot to ``<out>/``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from siclip.analysis.ablation import collect, plot_curves, plot_tradeoff, write_tables
from siclip.distill import ObjectiveConfig
from siclip.train import DataConfig, TrainConfig, train

PRESETS = {
    "smoke": dict(teacher_samples=256, teacher_epochs=1, student_samples=128, student_epochs=1, batch=64, eval_per_class=1, eval_images=64),
    "cpu": dict(teacher_samples=4096, teacher_epochs=4, student_samples=1024, student_epochs=3, batch=128, eval_per_class=2, eval_images=300),
    "gpu": dict(teacher_samples=50_000, teacher_epochs=10, student_samples=10_000, student_epochs=10, batch=512, eval_per_class=5, eval_images=1000),
}
CLIP_ONLY = ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)
VARIANTS = {  # name: (inherit from the teacher, objective)
    "baseline": (False, CLIP_ONLY),
    "+WI": (True, CLIP_ONLY),
    "+WIKD": (True, ObjectiveConfig(pair_matching=0)),
    "+WIKD+PM": (True, ObjectiveConfig()),
}
SHARING = {
    "none": {"sharing": "none"},
    "adjacent": {"sharing": "adjacent"},
    "divergence": {"sharing": "optimal", "sharing_max_groups": 2},
}
CAPTIONS = {"raw": 0.0, "synthetic": 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]
    common = dict(lr=2e-3, warmup_steps=5, log_every=1, checkpoint_every=1000, eval_zero_shot_per_class=p["eval_per_class"],
                  eval_retrieval_images=p["eval_images"])  # fmt: skip

    teacher_dir = args.out / "teacher"
    if not (teacher_dir / "model.pt").exists():
        train(TrainConfig(model="mobileclip_tiny", out_dir=str(teacher_dir), epochs=p["teacher_epochs"], objective=CLIP_ONLY,
                          data=DataConfig(num_train=p["teacher_samples"], batch_size=p["batch"], p_synthetic=1.0, workers=args.workers),
                          **common))  # fmt: skip
    runs, labels = {"teacher": teacher_dir}, {"teacher": {"variant": "teacher (MobileCLIP-tiny)", "captions": "synthetic", "sharing": "-"}}
    for (variant, (inherit, objective)), (captions, p_syn), (sharing, overrides) in itertools.product(VARIANTS.items(), CAPTIONS.items(), SHARING.items()):
        if sharing == "divergence" and not inherit:
            continue  # divergences are measured on the teacher
        name = f"{variant} {captions} {sharing}"
        out = args.out / name.replace(" ", "_").replace("+", "plus_")
        labels[name] = {"variant": variant, "captions": captions, "sharing": sharing}
        runs[name] = out
        if (out / "summary.json").exists():
            continue
        config = TrainConfig(model="siclip_tiny", model_overrides={"siclip": overrides}, out_dir=str(out),
                             teacher=str(teacher_dir / "model.pt") if inherit else None, epochs=p["student_epochs"], objective=objective,
                             data=DataConfig(num_train=p["student_samples"], batch_size=p["batch"], p_synthetic=p_syn,
                                             workers=args.workers, seed=1), **common)  # fmt: skip
        train(config, progress=False)
    frame = collect(runs, labels)
    md, csv = write_tables(frame, args.out)
    plot_curves({k: v for k, v in runs.items() if k != "teacher"}, args.out / "curves.png")
    plot_tradeoff(frame, args.out / "tradeoff.png")
    print(md.read_text())
    print(f"table {md} and {csv}; plots curves.png and tradeoff.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
