"""FLIP's speed (issue 30): a ViT-tiny image tower masked at 0.5 against unmasked, and the whole training step beside it.

    python benchmarks/flip_speed.py [--threads 2] [--batch 32] [--rounds 30] [--ratio 0.5]
    python benchmarks/flip_speed.py --smoke          # a tiny tower, 3 rounds (the test suite runs this): measures nothing

The tower is siclip's own registered ViT (``clip_vit_tiny``'s image tower, :mod:`siclip.models.vit`) at DeiT-Ti's
shape, which overrides the preset's embedded-world size: width 192, 12 Pre-LN blocks of 3 heads, MLP 768 (ratio 4),
patches of 16 at 224 px, so 196 patch tokens and a class token; random weights, float32, training mode. Masked at r it keeps ⌊196·(1 − r)⌋
patches and the class token (FLIP's ``TokenDropout`` in its ``patch_dropout`` slot), so its FLOPs fall to about
(1 − r) of the unmasked tower's (the patch embedding still sees every patch): the FLOP ratio bounds the speedup near 2×
at 0.5. The whole training step is one optimiser step of a CLIP with this image tower and MobileCLIP-tiny's text
tower (``TrainingTask``: the CLIP loss, backward, gradient clipping, AdamW), batch ``--batch``. Masking is the project's
own FLIP path, what ``siclip train --mask-ratio`` runs: ``enable_token_dropout`` on the model, its maskers handed to
the ``TrainingTask``.

Both are timed round-robin in one run (``time_interleaved``); each speedup is the geometric mean of per-round ratios
with a 95 % bootstrap interval (``paired_speedup``), and the tower's target (≥ 1.6×) counts as met when the whole
interval clears it. The FLOP ratios come from PyTorch's counter on one call of each (forward and backward).
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch

from siclip.analysis.benchmark import device_name, forward_backward_step, paired_speedup, time_interleaved, to_markdown
from siclip.analysis.train_step import step_flops
from siclip.blocks.token_dropout import enable_token_dropout
from siclip.distill import ObjectiveConfig, SiCLIPObjective
from siclip.models import create_model
from siclip.train import TrainingTask
from siclip.train.malloc import keep_freed_memory
from siclip.train.step import backward_and_step, create_optimizer, forward_terms

MODEL = "clip_vit_tiny"  # siclip's ViT image tower beside MobileCLIP-tiny's text tower
VIT_TINY = {"image": {"image_size": 224, "patch_size": 16, "width": 192, "layers": 12, "heads": 3, "mlp_ratio": 4.0}}  # DeiT-Ti
SMOKE = {"image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}, "text": {"layers": 1}}
TOWER_TARGET = 1.6


def tasks(overrides: dict, ratio: float) -> dict[str, TrainingTask]:
    """The same CLIP (``clip_vit_tiny`` with ``overrides``) as an unmasked and a masked training task."""
    torch.manual_seed(0)
    student = create_model(MODEL, **overrides)
    objective = ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)
    out = {}
    for name, r in (("unmasked", 0.0), ("masked", ratio)):
        model = copy.deepcopy(student)
        dropout = enable_token_dropout(model, r) if r > 0 else []
        out[name] = TrainingTask(model, SiCLIPObjective(model.embed_dim, config=objective), token_dropout=dropout).train()
    return out


def training_step(task: TrainingTask, batch: dict):
    optimizer = create_optimizer(task, lr=1e-4, weight_decay=0.1)
    params = [p for p in task.parameters() if p.requires_grad]

    def step() -> None:
        backward_and_step(forward_terms(task, batch, bf16=False)["total"], optimizer, params, grad_clip=1.0)

    return step


def compare(overrides: dict, batch_size: int, ratio: float, rounds: int, warmup: int) -> list[dict]:
    pair = tasks(overrides, ratio)
    size = overrides["image"]["image_size"]
    pixels = torch.randn(batch_size, 3, size, size)
    context = pair["unmasked"].student.config.text.context_length
    batch = {"image": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
             "text": torch.randint(1, 200, (batch_size, context))}  # fmt: skip
    kinds = {
        "image tower forward + backward": {name: forward_backward_step(task.student.visual, pixels, torch.float32) for name, task in pair.items()},
        "training step": {name: training_step(task, batch) for name, task in pair.items()},
    }
    rows = []
    for kind, steps in kinds.items():
        flops = {name: step_flops(step) for name, step in steps.items()}
        timed = time_interleaved(steps, torch.device("cpu"), rounds=rounds, warmup=warmup)
        speedup = paired_speedup(timed["unmasked"]["times_ms"], timed["masked"]["times_ms"])
        target = TOWER_TARGET if kind.startswith("image tower") else None
        met = "" if target is None else ("yes" if speedup.low >= target else ("point estimate only" if speedup.mean >= target else "NO"))
        rows.append({"what": kind, "unmasked ms": timed["unmasked"]["ms"], f"masked {ratio} ms": timed["masked"]["ms"],
                     "speedup [95 %]": f"{speedup.mean:.3f}× [{speedup.low:.3f}, {speedup.high:.3f}]",
                     "FLOP ratio": f"{flops['unmasked'] / flops['masked']:.3f}×", "GFLOPs unmasked": flops["unmasked"] / 1e9,
                     "target": f"≥ {target}×" if target else "(reported)", "met": met})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--batch", type=int, default=32, help="images per call (32)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (30)")
    parser.add_argument("--ratio", type=float, default=0.5, help="FLIP mask ratio (0.5)")
    parser.add_argument("--smoke", action="store_true", help="a tiny tower, batch 4 and 3 rounds: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch < 2 or args.rounds < 2 or not 0 < args.ratio < 1:
        parser.error("--threads ≥ 1, --batch ≥ 2, --rounds ≥ 2 and 0 < --ratio < 1")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    overrides, batch, rounds, warmup = (SMOKE, 4, 3, 1) if args.smoke else (VIT_TINY, args.batch, args.rounds, 3)
    print(f"{datetime.date.today()}, {device_name('cpu')}, torch {torch.__version__}, batch {batch}, {rounds} rounds, "
          f"{'smoke' if args.smoke else 'ViT-tiny (DeiT-Ti)'} image tower {overrides['image']}, mask ratio {args.ratio}, float32\n")  # fmt: skip
    print(to_markdown(compare(overrides, batch, args.ratio, rounds, warmup)))


if __name__ == "__main__":
    main()
