"""Train a CLIP (MobileCLIP or SiCLIP) on the embedded world or on your data, then evaluate it.

    siclip train --preset demo                                   # the demo's teacher (siclip demo runs both)
    siclip train --preset demo-student                           # the demo's SiCLIP student of runs/demo/model.pt
    siclip train --preset paper-s0 --teacher mobileclip_s0.pt --data data/shards    # the paper's recipe (README)
    siclip train --model siclip_tiny --teacher runs/demo/model.pt --wikd --out runs/student
    siclip train --data train.csv --synthetic-keys syn0,syn1 --tokenizer words \\
        --zeroshot data/imagenet/val --classnames imagenet1k --templates imagenet1k --out runs/mine
    siclip train --config runs/s0/config.json --out runs/s0_again     # a run's saved config reproduces it
    siclip train --preset paper-s0 --set data.batch_size=768 --set objective.pm_mining=sampled --print-config
    siclip train --slip --augment strong --text-augment 0.1 --out runs/slip   # training strategies (below)
    siclip train --model clip_vit_tiny --budget-tflops 50 --out runs/vit          # a ViT tower, 50 TFLOPs of training
    siclip train --image-tower timm:resnet18 --budget-tflops 50 --out runs/r18    # any timm model as the image tower
    siclip train --caption-noise 0.5 --subset runs/kept/kept_indices.json ...    # a noisy world, the pairs siclip filter kept
    siclip train ... --resume                                    # continue exactly where it stopped
    siclip train ... --overwrite                                 # start over in a directory holding a run

Settings, lowest to highest precedence: --preset NAME < --config FILE (JSON or YAML; any field, nested or dotted keys;
a run's config.json or summary.json) < --set KEY=VALUE (any field, repeatable; keys under a dict field such as
model_overrides.image.image_size=32 go into it) < the named flags below (--wikd before the --lambda-* flags). Defaults
shown are TrainConfig's; a preset changes them. The resolved configuration is printed at start and saved in
--out/config.json; --print-config prints it (YAML, loadable by --config) and stops. Every setting is listed at the end.

Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step boundary and exits with status 130 / 143; ``--resume``
continues from it. A NaN or Inf loss, gradient or weight stops the run naming it (status 1), as do too many unreadable
samples in an epoch and a full disk. Every argument, setting and input file (teacher, data, tokenizer, evaluation sets,
the checkpoint to resume) is checked before the first step: a bad one ends in one line ``siclip train: error: …`` with
status 2.

--teacher: a model spec: a siclip checkpoint or Apple's mobileclip_s0.pt (the format is detected), which a SiCLIP
student inherits from (WI) and distils from (--wikd); or hf:DIR / open_clip:ARCH:FILE, a transformers or open_clip
CLIP to distil from (with --no-inherit: the student trains from scratch; the teacher reads its own tokenizer's ids and
its own pixels of the same crops). --distill-teacher: a second, wider teacher that distils instead, while the student
still inherits from --teacher. --tokenizer: the model's own by default (the teacher's when there is one); "words"
builds a vocabulary from your training captions. With --data other than the embedded world, only the benchmarks you
name are evaluated.

Training strategies (Scaling (Down) CLIP; each alone or together, with or without WI/WIKD/PM): --slip adds SLIP's
self-supervised image term (two more views per image through the image tower); --mask-ratio R masks a fraction R of a
ViT image tower's patch tokens (FLIP; MobileCLIP's hybrid MCi tower is refused, with the reason), --unmasked-steps N
tunes the last N steps unmasked; --augment strong and --text-augment RATE are CLIP+Data Augmentation.

Multi-GPU: ``torchrun --nproc_per_node=N -m siclip train ...`` (features are gathered across ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data import AUGMENT_POLICIES, AugmentConfig
from siclip.data.embedded import MAX_SPLIT
from siclip.data.tabular import is_table
from siclip.distill import ObjectiveConfig
from siclip.eval.named import classnames_spec, templates_spec
from siclip.interop import check_model_spec
from siclip.models import list_models
from siclip.settings import Resolver, SettingError, parse_value, render
from siclip.models.towers import TOWER_PRESETS, family_preprocess, image_config_from_dict, tower_preset
from siclip.train import TrainConfig, train
from siclip.train.malloc import keep_freed_memory
from siclip.train.presets import PRESETS
from siclip.train.step import check_tower_names
from siclip.wording import count


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
    """A registered model, or a file (a CLIP converted by ``siclip convert``, which training reads)."""
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


def mask_ratio(text: str) -> float:
    """A FLIP mask ratio: a fraction in [0, 1) (1 would drop every patch token)."""
    value = cli.fraction(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be below 1 (the fraction of patch tokens dropped), got {value:g}")
    return value


def synthetic_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k for k in parse_value(tuple[str, ...], text) if k)
    if not keys:
        raise argparse.ArgumentTypeError("expected comma-separated column names, got none")
    return keys


@dataclass(frozen=True)
class Flag:
    """A named flag of ``siclip train`` and the setting it sets (``key``, dotted), with the argparse type that checks
    its value; the same check applies to that key given by --config or --set (unless ``checks_setting`` is off)."""

    names: tuple[str, ...]
    key: str
    help: str
    type: Callable[[str], Any] | None = None
    options: dict = field(default_factory=dict)  # argparse keywords: nargs, metavar, choices, action
    checks_setting: bool = True
    aliases: tuple[str, ...] = ()  # old spellings, accepted and not shown


def flag(names: str, key: str, help: str, type: Callable[[str], Any] | None = None, **options) -> Flag:
    checks = options.pop("checks_setting", True)
    aliases = tuple(options.pop("aliases", ()))
    return Flag(tuple(names.split()), key, help, type, options, checks, aliases)


SWITCH = {"action": argparse.BooleanOptionalAction}
MODEL_SPEC = cli.checked(check_model_spec)

# Named flags, one row each, by group: flag → setting. A new TrainConfig field needs no row (--set and --config reach
# every field); add one for a setting people change often.
FLAGS: dict[str, list[Flag]] = {
    "model and teacher": [
        flag("--model", "model", f"a registered model ({', '.join(list_models())}) or a converted CLIP file (siclip convert)", model_name),
        flag("--teacher", "teacher", "model spec to inherit from (SiCLIP students) and distil from (--wikd): a checkpoint, Apple's "
             "mobileclip_s0.pt, hf:DIR or open_clip:ARCH:FILE", MODEL_SPEC, metavar="SPEC"),
        flag("--distill-teacher", "distill_teacher", "model spec of a separate (wider) distillation teacher; the student still "
             "inherits from --teacher", MODEL_SPEC, metavar="SPEC"),
        flag("--inherit", "inherit", "a SiCLIP student inherits the teacher's weights (WI); --no-inherit: from scratch, the "
             "teacher only distils", **SWITCH),
        flag("--apple-model", "teacher_model", "the registered configuration a --teacher file in Apple's layout is built as",
             choices=list_models(), metavar="MODEL", aliases=("--teacher-model",)),
    ],
    "objective": [
        flag("--lambda-clip", "objective.clip", "weight of the CLIP contrastive loss", cli.non_negative_float, metavar="W"),
        flag("--lambda-feature", "objective.feature", "λ1, feature distillation (paper: 4000)", cli.non_negative_float, metavar="W"),
        flag("--lambda-relation", "objective.relation", "λ2, contrastive relation distillation (paper: 1)", cli.non_negative_float, metavar="W"),
        flag("--lambda-interactive", "objective.interactive", "λ3, interactive contrastive loss (paper: 1)", cli.non_negative_float, metavar="W"),
        flag("--lambda-pair-matching", "objective.pair_matching", "λ4, pair matching (paper: 0.1)", cli.non_negative_float, metavar="W"),
    ],
    "data": [
        flag("--data", "data.source", "'embedded', a shard directory/pattern or a .csv/.tsv", data_spec, metavar="SRC"),
        flag("--num-train", "data.num_train", f"embedded world: training samples (at most {MAX_SPLIT:,})", cli.int_in_range(1, MAX_SPLIT),
             metavar="N"),
        flag("--batch-size", "data.batch_size", "pairs per step (at least 2: a pair's negatives are the others)", cli.int_at_least(2), metavar="N"),
        flag("--workers", "data.workers", "data loader processes", cli.non_negative_int, metavar="N"),
        flag("--p-synthetic", "data.p_synthetic", "chance of drawing a synthetic caption instead of the raw one", cli.fraction, metavar="P"),
        flag("--crop-scale", "data.crop_scale", "random resized crop area fraction; 1 1 keeps the whole image", cli.positive_float,
             nargs=2, metavar=("MIN", "MAX")),
        flag("--crop-ratio", "data.crop_ratio", "random resized crop aspect ratio", cli.positive_float, nargs=2, metavar=("MIN", "MAX")),
        flag("--shape-twins", "data.shape_twins", "embedded world: batch each scene with its shape twin", **SWITCH),
        flag("--tokenizer", "data.tokenizer", "the teacher's by default, else the model's", choices=["embedded", "clip", "words"]),
        flag("--vocab-path", "data.vocab_path", "CLIP merges file, or a word list for --tokenizer words", cli.existing_file, metavar="FILE"),
        flag("--max-unknown-rate", "data.max_unknown_rate", "refuse above this fraction of <unk> caption tokens", cli.fraction, metavar="P"),
        flag("--image-key", "data.image_key", "CSV image path column", metavar="COLUMN"),
        flag("--caption-key", "data.caption_key", "CSV caption column", metavar="COLUMN"),
        flag("--synthetic-keys", "data.synthetic_keys", "CSV synthetic caption columns, comma-separated", synthetic_keys,
             metavar="A,B", checks_setting=False),
        flag("--max-skip-fraction", "data.max_skip_fraction", "stop when an epoch skips more than this fraction of its samples",
             cli.fraction, metavar="P"),
    ],
    "training strategies (Scaling (Down) CLIP)": [
        flag("--ssl-scale", "objective.ssl_scale", "SLIP: weight of the self-supervised image term (two SimCLR views of each image "
             "through the image tower and SLIP's head, NT-Xent); --slip sets 1.0", cli.non_negative_float, metavar="W"),
        flag("--mask-ratio", "mask_ratio", "FLIP: fraction of the image tower's patch tokens dropped in training, e.g. 0.5 or 0.75 "
             "(never at evaluation); ViT image towers only", mask_ratio, metavar="R"),
        flag("--unmasked-steps", "unmasked_steps", "FLIP: train the run's last N steps unmasked", cli.non_negative_int, metavar="N"),
        flag("--unmasked-fraction", "unmasked_fraction", "FLIP: train the run's last fraction of steps unmasked", mask_ratio, metavar="F"),
        flag("--augment", "data.augment", "image augmentation: none (the evaluation view), clip (random resized crop of --crop-scale), "
             "mild (crop of 35-100 %, flip where no caption names a side, brightness, contrast, blur: colours kept) "
             "or strong (SimCLR's: wide crop, flip where no caption names a side, colour jitter, grayscale, blur)",
             choices=list(AUGMENT_POLICIES)),
        flag("--text-augment", "data.text_augment", "EDA on the captions: random deletion or swap of words at this rate", cli.fraction,
             metavar="RATE"),
    ],
    "image towers, compute budgets and data quality (Scaling (Down) CLIP)": [
        flag("--image-tower", "image_tower", f"replace the model's image tower: {', '.join(sorted(TOWER_PRESETS))}, or timm:NAME (any timm "
             "image model, projected to the embedding); --image-size still applies", image_tower, metavar="TOWER"),
        flag("--budget-tflops", "budget_tflops", "train for this many TFLOPs: the steps are set from one measured training step "
             "(forward + backward of student, teacher, every loss term), the epochs following from them", cli.positive_float,
             metavar="TFLOPS"),
        flag("--budget-measure-steps", "budget_measure_steps", "batches the step cost is averaged over", cli.positive_int, metavar="N"),
        flag("--caption-noise", "data.caption_noise", "embedded world: fraction of training pairs given another scene's captions",
             cli.fraction, metavar="P"),
        flag("--subset", "data.subset", "train on the samples a JSON index list names (siclip filter's kept_indices.json)",
             cli.existing_file, metavar="FILE"),
    ],
    "optimiser and schedule": [
        flag("--epochs", "epochs", "passes over the data", cli.positive_int, metavar="N"),
        flag("--lr", "lr", "peak learning rate (AdamW), after the warm-up; cosine to 0", cli.positive_float),
        flag("--weight-decay", "weight_decay", "AdamW weight decay (not on gains, norms, biases)", cli.non_negative_float, metavar="WD"),
        flag("--betas", "betas", "AdamW's beta1 beta2", cli.fraction, nargs=2, metavar=("B1", "B2")),
        flag("--eps", "eps", "AdamW's epsilon", cli.positive_float),
        flag("--warmup-steps", "warmup_steps", "steps of linear warm-up", cli.non_negative_int, metavar="N"),
        flag("--grad-clip", "grad_clip", "largest global gradient norm", cli.positive_float, metavar="NORM"),
        flag("--accumulation", "accumulation", "micro-batches per step; only 1: accumulation would split a batch's contrastive "
             "negatives", cli.positive_int, metavar="N"),
        flag("--tower-lr-scale", "tower_lr_scale", "per-tower lr factors, e.g. image=2.5,text=1", tower_values(float), metavar="T=F,…"),
        flag("--tower-frozen-steps", "tower_frozen_steps", "steps a tower stays still, e.g. text=150", tower_values(int), metavar="T=N,…"),
    ],
    "speed and memory": [
        flag("--precision", "precision", "auto: bf16 autocast on CUDA, float32 on the CPU", choices=["auto", "bf16", "float32"]),
        flag("--device", "device", "auto (CUDA when there is one), cpu, cuda or cuda:N", cli.device),
        flag("--compile", "compile", "torch.compile the step", **SWITCH),
        flag("--fuse-frozen-towers", "fuse_frozen_towers", "reparameterise the teacher and frozen student towers", **SWITCH),
        flag("--grad-checkpointing", "grad_checkpointing", "recompute trainable blocks' activations in backward", **SWITCH),
        flag("--channels-last", "channels_last", "NHWC images and convolution weights (CUDA)", **SWITCH),
    ],
    "evaluation": [
        flag("--zeroshot", "eval_zeroshot", "zero-shot set: class-per-subfolder directory or filepath,label CSV", cli.existing_path,
             metavar="PATH", aliases=("--eval-zeroshot",)),
        flag("--classnames", "eval_classnames", "class names file (one per line or JSON list) or imagenet1k, cifar10, cifar100",
             classnames_spec, metavar="FILE-or-NAME"),
        flag("--templates", "eval_templates", "prompt templates file ({} or {c}) or imagenet1k, imagenet1k-simple, cifar; "
             "none: CLIP's 80", templates_spec, metavar="FILE-or-NAME"),
        flag("--retrieval", "eval_retrieval", "retrieval set: filepath,title CSV (one row per caption) or shards", data_spec,
             metavar="PATH", aliases=("--eval-retrieval",)),
        flag("--eval-embedded", "eval_embedded", "also evaluate on the embedded world; unset: only when training on it with "
             "no benchmark named", **SWITCH),
        flag("--eval", "evaluate", "evaluate at the end of the run; --no-eval: do not", **SWITCH),
    ],
    "run": [
        flag("--out", "out_dir", "the run's folder", out_dir, metavar="DIR"),
        flag("--seed", "seed", "seed of initialisation, data order, crops and caption draws", int, metavar="N"),
        flag("--checkpoint-every", "checkpoint_every", "steps between checkpoints (also at the end and on a signal)", cli.positive_int,
             metavar="N"),
        flag("--log-every", "log_every", "steps between metrics.csv rows", cli.positive_int, metavar="N"),
        flag("--calibration-captions", "calibration_captions_file", "captions file for sharing chosen by divergence", cli.existing_file,
             metavar="FILE"),
        flag("--dist-timeout", "dist_timeout", "seconds a rank waits for the others before the run fails", cli.positive_float,
             metavar="S"),
    ],
}  # fmt: skip

# Checks of the settings the named flags set, for the same keys given by --config or --set.
CHECKS = {f.key: f.type for rows in FLAGS.values() for f in rows if f.type is not None and f.checks_setting}
RESOLVER = Resolver(TrainConfig, CHECKS)


def _default(key: str) -> str:
    value = RESOLVER.settings[key].default
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    settings = "every setting (for --config and --set; defaults are TrainConfig's):\n" + RESOLVER.describe()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=settings.replace("%", "%%"))
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--preset", choices=sorted(PRESETS), help=f"a named configuration: {', '.join(sorted(PRESETS))} (default: none)")
    recipe.add_argument("--config", type=cli.existing_file, metavar="FILE",
                        help="JSON or YAML settings (any field), over the preset; a run's config.json reproduces it (default: none)")
    recipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one setting, dotted (objective.feature=4000, data.batch_size=256), over --config; repeatable (default: none)")
    recipe.add_argument("--wikd", action="store_true", help="the paper's objective: feature, relation and interactive distillation + "
                        "PM, λ = 4000, 1, 1, 0.1 (over --set; the --lambda-* flags change it) (default: off, CLIP loss only)")
    recipe.add_argument("--slip", action="store_true", help="SLIP: add the self-supervised image term at weight 1.0, "
                        "objective.ssl_scale (after --wikd, whose objective it adds to; --ssl-scale changes it) (default: off)")
    recipe.add_argument("--image-size", type=cli.positive_int, metavar="PX",
                        help="input resolution of a model built from scratch, model_overrides.image.image_size (default: the model's)")
    recipe.add_argument("--mask-padding", action="store_true",
                        help="text attention ignores padding (a model built from scratch), model_overrides.text.mask_padding (default: off)")
    recipe.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and stop (default: off)")
    for title, rows in FLAGS.items():
        group = parser.add_argument_group(title)
        for row in rows:
            shown = "" if row.options.get("action") is argparse.BooleanOptionalAction else f" [{row.key}]"
            options = {**row.options, **({"type": row.type} if row.type is not None else {})}
            group.add_argument(*row.names, dest=row.key, default=None, help=f"{row.help}{shown} (default: {_default(row.key)})".replace("%", "%%"),
                               **options)  # fmt: skip
            if row.aliases:
                cli.add_renamed(group, *row.aliases, new=row.names[0], dest=row.key, **options)
    run = parser.add_argument_group("continuing")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (default: off)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run's own files in --out (checkpoint, model, metrics, summary, TensorBoard events) and start over; "
                          "nothing else there is touched (default: off)")
    return parser


def resolve(args: argparse.Namespace) -> TrainConfig:
    """The configuration the arguments describe: preset < --config < --set < named flags (see the module docstring)."""
    config = PRESETS[args.preset] if args.preset else TrainConfig()
    if args.config:
        config = RESOLVER.from_file(config, args.config)
    config = RESOLVER.from_sets(config, args.set)
    if args.wikd:
        config = dataclasses.replace(config, objective=ObjectiveConfig(ssl_scale=config.objective.ssl_scale))
    if args.slip:
        config = dataclasses.replace(config, objective=dataclasses.replace(config.objective, ssl_scale=1.0))
    named = {row.key: getattr(args, row.key) for rows in FLAGS.values() for row in rows if getattr(args, row.key) is not None}
    if args.image_size is not None:
        named["model_overrides.image.image_size"] = args.image_size
    if args.mask_padding:
        named["model_overrides.text.mask_padding"] = True
    if args.budget_tflops is not None and args.epochs is not None:
        raise SettingError("--budget-tflops sets the number of steps (the epochs follow from it): give it or --epochs, not both")
    config = RESOLVER.apply(config, named, "the command line", check=False)
    config = RESOLVER.normalized(config)
    check_together(config)
    return config


def check_together(config: TrainConfig) -> None:
    """Settings that are each fine but do not go together: one line naming them (status 2)."""
    if config.accumulation != 1:
        raise SettingError(f"accumulation {config.accumulation}: gradient accumulation would split each batch's contrastive negatives "
                           "across micro-batches and change the loss; use a smaller batch, or several GPUs (torchrun gathers features "
                           "across ranks)")  # fmt: skip
    for key, flag_name in (("eval_classnames", "--classnames"), ("eval_templates", "--templates")):
        if getattr(config, key) is not None and config.eval_zeroshot is None:
            raise SettingError(f"{flag_name} needs --zeroshot ({key} applies to a zero-shot set, eval_zeroshot)")
    try:  # AugmentConfig holds the rule for crop bounds
        AugmentConfig(scale=tuple(config.data.crop_scale), ratio=tuple(config.data.crop_ratio))
    except ValueError as err:
        raise SettingError(f"data.crop_scale / data.crop_ratio (--crop-scale / --crop-ratio): {err}") from None
    if (config.unmasked_steps or config.unmasked_fraction) and not config.mask_ratio:
        raise SettingError("unmasked_steps / unmasked_fraction (--unmasked-steps / --unmasked-fraction) end a masked run unmasked: "
                           "give mask_ratio (--mask-ratio) too")  # fmt: skip
    if config.unmasked_steps and config.unmasked_fraction:
        raise SettingError("give unmasked_steps (--unmasked-steps) or unmasked_fraction (--unmasked-fraction), not both")
    if config.data.caption_noise and config.data.source != "embedded":
        raise SettingError(f"data.caption_noise (--caption-noise) misaligns pairs of the embedded world; the training data is {config.data.source!r}")
    if config.data.shape_twins and config.data.source != "embedded":
        raise SettingError(f"data.shape_twins (--shape-twins) pairs scenes of the embedded world; the training data is {config.data.source!r}")


def parse(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite deletes it: choose one")
    return resolve(args), args


def describe_sources(args: argparse.Namespace) -> str:
    parts = [f"preset {args.preset}" if args.preset else "TrainConfig defaults"]
    parts += [f"--config {args.config}"] if args.config else []
    parts += [f"{len(args.set)} --set"] if args.set else []
    return " < ".join([*parts, "flags"])


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    if args.print_config:
        print(render(config))
        return 0
    if config.objective.needs_teacher and config.teacher is None and config.distill_teacher is None:  # a preset may leave it to you
        raise SettingError("the objective distils from a teacher (objective.feature/relation/interactive > 0, as --wikd sets) and none "
                           "was given: pass --teacher SPEC")  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, once
        print(f"configuration ({describe_sources(args)}), saved in {Path(config.out_dir) / 'config.json'}:")
        print(render(config, indent="  "), flush=True)
    keep_freed_memory()
    checkpoint = Path(config.out_dir) / "checkpoint.pt"
    cli.on_interrupt(lambda: f"the checkpoint {checkpoint} is kept: continue with --resume" if checkpoint.exists() else cli.NOTHING_SAVED)
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"\n{config.model}: {count(summary['steps'], 'step')} in {summary['seconds']:.0f} s, final loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["final_loss"].items()))  # fmt: skip
    if summary["skipped_samples"]:
        print(f"skipped samples: {summary['skipped_samples']} (their keys are in the log above)")
    print("parameters: " + ", ".join(f"{group} {n:,}" for group, n in summary["parameters"].items()))
    if summary.get("eval"):
        print("\n| metric | value |\n|---|---|")
        for name, value in summary["eval"].items():
            print(f"| {name} | {100 * value:.1f} % |")
    print(f"\nmodel, checkpoint, config.json, metrics.csv, summary.json{' and eval/*.json' if summary.get('eval') else ''} in {config.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
