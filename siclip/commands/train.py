"""Train a CLIP (MobileCLIP or SiCLIP) on the embedded world or on your data, then evaluate it.

    python experiments/train.py --preset demo                          # the demo's teacher (experiments/demo.py runs both)
    python experiments/train.py --preset demo-student                  # the demo's SiCLIP student of runs/demo/model.pt
    python experiments/train.py --model siclip_tiny --teacher runs/demo/model.pt --wikd --out runs/student
    python experiments/train.py --model siclip_s0 --teacher mobileclip_s0.pt --data data/shards --wikd --out runs/s0
    python experiments/train.py --data train.csv --synthetic-keys syn0,syn1 --tokenizer words \
        --eval-zeroshot data/test --classnames classes.txt --templates prompts.txt --out runs/mine
    python experiments/train.py --model clip_vit_tiny --budget-tflops 50 --out runs/vit    # a ViT tower, 50 TFLOPs of training
    python experiments/train.py --image-tower timm:resnet18 --budget-tflops 50 --out runs/r18   # any timm model as the image tower
    python experiments/train.py --caption-noise 0.5 --subset runs/kept/kept_indices.json ...  # a noisy world, the pairs siclip filter kept
    python experiments/train.py ... --resume                            # continue exactly where it stopped
    python experiments/train.py ... --overwrite                         # start over in a directory holding a run

Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step boundary and exits with status 130 / 143;
``--resume`` continues from it. A NaN or Inf loss, gradient or weight stops the run naming it (status 1), as do
too many unreadable samples in an epoch and a full disk. Every argument and input file (teacher, data, tokenizer,
evaluation sets, the checkpoint to resume) is checked before the first step: a bad one ends in one line
``train.py: error: …`` with status 2.

--teacher: a model spec: a siclip checkpoint or Apple's mobileclip_s0.pt (the format is detected), which a SiCLIP
student inherits from (WI) and distils from (--wikd); or hf:DIR / open_clip:ARCH:FILE, a transformers or open_clip
CLIP to distil from (with --no-inherit: the student trains from scratch; the teacher reads its own tokenizer's ids and
its own pixels of the same crops).
--tokenizer: the model's own by default (the teacher's when there is one); "words" builds a vocabulary
from your training captions; models built from scratch take the tokenizer's vocabulary size.
With --data other than the embedded world, only the benchmarks you name are evaluated.

Multi-GPU: ``torchrun --nproc_per_node=N experiments/train.py ...`` (features are gathered across ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data import AugmentConfig
from siclip.data.tabular import is_table
from siclip.distill import ObjectiveConfig
from siclip.interop import check_model_spec
from siclip.models import list_models
from siclip.models.towers import TOWER_PRESETS, family_preprocess, image_config_from_dict, tower_preset
from siclip.train import TrainConfig, train
from siclip.train.malloc import keep_freed_memory
from siclip.train.presets import PRESETS
from siclip.train.step import check_tower_names


def tower_values(kind):
    """``image=2.5,text=1`` → ``{"image": 2.5, "text": 1.0}``."""

    def parse_pairs(text: str) -> dict:
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        if any(len(pair) != 2 for pair in pairs):
            raise argparse.ArgumentTypeError(f"expected tower=value pairs such as image=2.5,text=1, got {text!r}")
        towers = {tower.strip() for tower, _ in pairs}
        try:
            check_tower_names(towers, repr(text))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        try:
            values = {tower.strip(): kind(value) for tower, value in pairs}
        except ValueError:
            raise argparse.ArgumentTypeError(f"each value in {text!r} must be a {kind.__name__}") from None
        if any(v < 0 for v in values.values()):
            raise argparse.ArgumentTypeError(f"values must not be negative, got {text!r}")
        return values

    return parse_pairs


def data_spec(text: str) -> str:
    """``embedded``, an existing CSV/TSV, or shards (a directory, glob or brace range, whose shards the reader checks)."""
    return cli.existing_file(text) if is_table(text) else text


def model_name(text: str) -> str:
    """A registered model, or a file (a CLIP converted by experiments/convert_model.py, which training reads)."""
    if text in list_models() or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a registered model ({', '.join(list_models())}) nor a converted model file")


def image_tower(text: str) -> str:
    """A tower preset (siclip.models.towers.TOWER_PRESETS) or timm:NAME of a model timm knows (checked before anything loads)."""
    try:
        family_preprocess(image_config_from_dict(tower_preset(text)))  # a timm tower: its library and model name
    except (ValueError, ImportError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def out_dir(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def parse(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--model", type=model_name, help=f"one of {', '.join(list_models())}, or a converted CLIP file (convert_model.py)")
    parser.add_argument("--teacher", type=cli.checked(check_model_spec),
                        help="model spec to inherit from (SiCLIP models) and distil from (--wikd): a checkpoint, "
                        "Apple's mobileclip_s0.pt, hf:DIR or open_clip:ARCH:FILE")
    parser.add_argument("--no-inherit", dest="inherit", action="store_false", default=None,
                        help="a SiCLIP student starts from scratch; the teacher only distils (KD)")
    parser.add_argument("--image-size", type=cli.positive_int, help="input resolution of a model built from scratch (e.g. 32 for small scans)")
    parser.add_argument("--teacher-model", choices=list_models(), metavar="MODEL", help="config an Apple-layout teacher file is built as (mobileclip_s0)")
    parser.add_argument("--wikd", action="store_true", help="feature, relation and interactive distillation + PM")
    parser.add_argument("--out", dest="out_dir", type=out_dir)
    parser.add_argument("--data", dest="source", type=data_spec, help="'embedded', a shard directory/pattern or a .csv/.tsv")
    parser.add_argument("--num-train", type=cli.positive_int)
    parser.add_argument("--batch-size", type=cli.int_at_least(2), help="pairs per step (at least 2: a pair's negatives are the others)")
    parser.add_argument("--workers", type=cli.non_negative_int)
    parser.add_argument("--p-synthetic", type=cli.fraction)
    parser.add_argument("--crop-scale", type=cli.positive_float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop area fraction (0.6 1.0); 1 1 keeps the whole image")
    parser.add_argument("--crop-ratio", type=cli.positive_float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop aspect ratio (0.75 1.333)")
    parser.add_argument("--shape-twins", action="store_true", default=None, help="embedded world: batch each scene with its shape twin")
    parser.add_argument("--mask-padding", action="store_true", help="text attention ignores padding (a model built from scratch)")
    parser.add_argument("--tower-lr-scale", type=tower_values(float), help="per-tower lr factors, e.g. image=2.5,text=1")
    parser.add_argument("--tower-frozen-steps", type=tower_values(int), help="steps a tower stays still, e.g. text=150")
    parser.add_argument("--tokenizer", choices=["embedded", "clip", "words"], help="default: the teacher's, else the model's")
    parser.add_argument("--vocab-path", type=cli.existing_file, help="CLIP merges file, or a word list for --tokenizer words")
    parser.add_argument("--max-unknown-rate", type=cli.fraction, help="refuse above this fraction of <unk> caption tokens (0.05)")
    parser.add_argument("--image-key", help="CSV image path column (filepath)")
    parser.add_argument("--caption-key", help="CSV caption column (title)")
    parser.add_argument("--synthetic-keys", type=lambda s: tuple(k for k in s.split(",") if k), help="CSV synthetic caption columns, comma-separated")
    parser.add_argument("--eval-zeroshot", type=cli.existing_path, help="zero-shot set: class-per-subfolder directory or filepath,label CSV")
    parser.add_argument("--classnames", dest="eval_classnames", type=cli.existing_file, help="class names file (one per line or JSON list)")
    parser.add_argument("--templates", dest="eval_templates", type=cli.existing_file, help="prompt templates file ({} placeholder); CLIP's ensemble by default")
    parser.add_argument("--eval-retrieval", type=data_spec, help="retrieval set: filepath,title CSV (one row per caption) or shards")
    parser.add_argument("--eval-embedded", action="store_true", default=None, help="also evaluate on the embedded world")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", default=None, help="no end-of-run evaluation")
    parser.add_argument("--calibration-captions", dest="calibration_captions_file", type=cli.existing_file, help="captions file for sharing chosen by divergence")
    parser.add_argument("--epochs", type=cli.positive_int)
    parser.add_argument("--lr", type=cli.positive_float)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fuse-frozen-towers", action="store_true", help="reparameterise the teacher and frozen student towers")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute trainable blocks' activations in backward")
    parser.add_argument("--checkpoint-every", type=cli.positive_int, help="steps between checkpoints (also saved at the end and on a signal)")
    parser.add_argument("--log-every", type=cli.positive_int, help="steps between metrics.csv rows")
    parser.add_argument("--max-skip-fraction", type=cli.fraction, help="stop when an epoch skips more than this fraction of its samples")
    parser.add_argument("--dist-timeout", type=cli.positive_float, help="seconds a rank waits for the others before the run fails")
    # ── image towers, compute budgets, data quality (issue 30) ──
    parser.add_argument("--image-tower", type=image_tower,
                        help=f"replace the model's image tower: {', '.join(sorted(TOWER_PRESETS))}, or timm:NAME (any timm image model, "
                        "projected to the embedding); --image-size still applies (default: the model's own tower)")  # fmt: skip
    parser.add_argument("--budget-tflops", type=cli.positive_float,
                        help="train for this many TFLOPs: the steps are set from one measured training step (forward + backward "
                        "of student, teacher, every loss term), epochs following from them (default: --epochs decides)")  # fmt: skip
    parser.add_argument("--budget-measure-steps", type=cli.positive_int, help="batches the step cost is averaged over (1)")
    parser.add_argument("--caption-noise", type=cli.fraction, help="embedded world: fraction of pairs given another scene's captions (0)")
    parser.add_argument("--subset", type=cli.existing_file, help="train on the samples a JSON index list names (siclip filter's kept_indices.json)")
    # ── end of issue 30's flags ──
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset] if args.preset else TrainConfig()
    top = {k: getattr(args, k) for k in ("model", "teacher", "inherit", "teacher_model", "out_dir", "epochs", "lr", "evaluate", "eval_zeroshot", "eval_classnames",
           "eval_templates", "eval_retrieval", "eval_embedded", "calibration_captions_file", "checkpoint_every", "log_every", "dist_timeout",
           "tower_lr_scale", "tower_frozen_steps", "image_tower", "budget_tflops", "budget_measure_steps")
           if getattr(args, k) is not None}  # fmt: skip
    data = {k: getattr(args, k) for k in ("source", "num_train", "batch_size", "workers", "p_synthetic", "tokenizer", "vocab_path",
            "max_unknown_rate", "image_key", "caption_key", "synthetic_keys", "max_skip_fraction", "shape_twins", "crop_scale", "crop_ratio",
            "caption_noise", "subset")
            if getattr(args, k) is not None}  # fmt: skip
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite deletes it: choose one")
    for flag, value in (("--classnames", args.eval_classnames), ("--templates", args.eval_templates)):
        if value and not args.eval_zeroshot:
            parser.error(f"{flag} needs --eval-zeroshot")
    if args.synthetic_keys == ():
        parser.error("--synthetic-keys: expected comma-separated column names, got none")
    try:  # AugmentConfig holds the rule for crop bounds; checking here makes a bad flag a usage error
        AugmentConfig(scale=tuple(args.crop_scale or config.data.crop_scale), ratio=tuple(args.crop_ratio or config.data.crop_ratio))
    except ValueError as err:
        parser.error(f"--crop-scale / --crop-ratio: {err}")
    if args.shape_twins and (args.source or config.data.source) != "embedded":
        parser.error(f"--shape-twins pairs scenes of the embedded world; the training data is {args.source!r}")
    if args.budget_tflops is not None and args.epochs is not None:
        parser.error("--budget-tflops sets the number of steps (epochs follow from it): give it or --epochs, not both")
    if args.caption_noise and (args.source or config.data.source) != "embedded":
        parser.error(f"--caption-noise misaligns pairs of the embedded world; the training data is {args.source!r}")
    flags = {k: True for k in ("compile", "fuse_frozen_towers", "grad_checkpointing") if getattr(args, k)}
    overrides = config.model_overrides
    if args.image_size is not None:
        overrides = {**overrides, "image": {**overrides.get("image", {}), "image_size": args.image_size}}
    if args.mask_padding:
        overrides = {**overrides, "text": {**overrides.get("text", {}), "mask_padding": True}}
    if overrides is not config.model_overrides:
        top["model_overrides"] = overrides
    config = dataclasses.replace(config, **top, **flags, data=dataclasses.replace(config.data, **data))
    if args.wikd:
        config = dataclasses.replace(config, objective=ObjectiveConfig())
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    keep_freed_memory()
    checkpoint = Path(config.out_dir) / "checkpoint.pt"
    cli.on_interrupt(lambda: f"the checkpoint {checkpoint} is kept: continue with --resume" if checkpoint.exists() else cli.NOTHING_SAVED)
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"\n{config.model}: {summary['steps']} steps in {summary['seconds']:.0f} s, final loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["final_loss"].items()))  # fmt: skip
    if summary["skipped_samples"]:
        print(f"skipped samples: {summary['skipped_samples']} (their keys are in the log above)")
    print(f"parameters: {summary['parameters']}")
    if summary.get("eval"):
        print("\n| metric | value |\n|---|---|")
        for name, value in summary["eval"].items():
            print(f"| {name} | {100 * value:.1f} % |")
    print(f"\nmodel, checkpoint, metrics.csv, summary.json{' and eval/*.json' if summary.get('eval') else ''} in {config.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
