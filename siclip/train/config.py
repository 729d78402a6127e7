"""Training configuration: plain dataclasses, saved with every checkpoint and run summary.

Every field is settable from the command line (``siclip train --config FILE --set key=value``, :mod:`siclip.settings`):
its type is its annotation and its help the comment beside it, so a new field needs both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from siclip.distill import ObjectiveConfig
from siclip.storage import write_text_atomic


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded", a shard directory/pattern, or a .csv/.tsv file (any case)
    num_train: int = 2000  # embedded world only
    num_synthetic: int = 5  # embedded world only: synthetic captions per image
    seed: int = 0  # embedded world only: seed of the rendered scenes
    p_synthetic: float = 0.5  # chance a step draws one of a sample's synthetic captions instead of its raw one
    shape_twins: bool = False  # embedded world only: batch every scene with its shape twin (EmbeddedConfig.shape_twins)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: the area fraction kept (MIN, MAX); 1,1 with crop_ratio 1,1: no cropping
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: the aspect ratio (MIN, MAX)
    batch_size: int = 64  # pairs per optimiser step, all of a step's contrastive negatives (per rank under torchrun)
    workers: int = 0  # data loader processes (0: load in the training process)
    tokenizer: Literal["embedded", "clip", "words"] | None = None  # None: the teacher's, else the model's; "clip", "embedded", "words" (built from the captions)
    vocab_path: str | None = None  # a CLIP merges file, or a word list (JSON list / one per line) for "words"
    vocab_samples: int | None = None  # "words": samples whose captions make the vocabulary (None: all)
    vocab_min_count: int = 1  # "words": keep words seen at least this often
    max_unknown_rate: float = 0.05  # refuse to train when more of the first batches' caption tokens are <unk>
    tokenizer_check_samples: int = 512  # samples of the first batches checked for unknown tokens
    image_key: str = "filepath"  # CSV/TSV column of image paths
    caption_key: str = "title"  # CSV/TSV column of raw captions
    synthetic_keys: tuple[str, ...] = ()  # CSV/TSV synthetic caption columns (or one column holding a JSON list)
    max_skip_fraction: float | None = 0.5  # an epoch skipping more of its samples stops the run (an empty one always does)
    # ── training strategies (Scaling (Down) CLIP): CLIP+Data Augmentation ──
    augment: Literal["none", "clip", "mild", "strong"] = "clip"  # image policy (siclip.data.augment_policy): "none", "clip" (crop_scale/crop_ratio), "mild" (hue kept) or "strong" (SimCLR's)
    text_augment: float = 0.0  # EDA's random deletion / swap rate α on each caption (0: off)
    # ── data quality (issue 30) ──
    caption_noise: float = 0.0  # embedded world only: this fraction of training pairs carries another scene's captions (EmbeddedConfig.caption_noise)
    subset: str | None = None  # a JSON list of sample indices (siclip filter's kept_indices.json): train on those samples only


@dataclass
class TrainConfig:
    model: str = "mobileclip_tiny"  # a registered model (siclip_s0, siclip_tiny, mobileclip_tiny, …) or a converted CLIP file
    model_overrides: dict = field(default_factory=dict)  # the model config's fields, e.g. {"siclip": {"sharing": "optimal", "sharing_max_groups": 2}}
    teacher: str | None = None  # model spec: the student inherits from it (SiCLIP) and distils from it
    inherit: bool = True  # a SiCLIP student inherits the teacher's weights (WI); False: built from scratch, the teacher only distils
    # Learning-rate factor of the inherited parameters a student trains (SiCLIPConfig.freeze="none"): they start
    # where the teacher left them, so a lower lr keeps them near it while the new SAS-P blocks learn at full lr.
    inherited_lr_scale: float = 1.0
    teacher_model: str = "mobileclip_s0"  # the registered config a teacher file in Apple's layout is built as
    # Model spec of a separate distillation teacher (a wider CLIP: hf:DIR, open_clip:ARCH:FILE, a checkpoint); None: the
    # teacher distils. The student still inherits from the teacher; this one's features, tokens and pixels are its own.
    distill_teacher: str | None = None
    out_dir: str = "runs/default"  # the run's folder: checkpoint, model, config.json, metrics.csv, summary.json
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))
    epochs: int = 1  # passes over the training data
    lr: float = 1e-3  # peak learning rate (AdamW), reached after the warm-up, then cosine decay to 0
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (not on gains, norms and biases)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's moment decay rates
    eps: float = 1e-6  # AdamW's denominator term
    warmup_steps: int = 10  # optimiser steps of linear warm-up from 0 to lr
    # Per-tower learning rates: lr × tower_lr_scale[tower], and 0 before step tower_frozen_steps[tower]
    # (towers "image", "text"; the rest, e.g. the temperature, follows lr). A text tower held still
    # while the image tower starts makes the image learn what the random text features tell apart.
    tower_lr_scale: dict = field(default_factory=dict)  # per-tower lr factors, e.g. {"image": 2.5}
    tower_frozen_steps: dict = field(default_factory=dict)  # steps a tower stays still, e.g. {"text": 150}
    grad_clip: float = 1.0  # largest global gradient norm (clipped above)
    accumulation: int = 1  # micro-batches per step: only 1 (accumulation would split a batch's contrastive negatives)
    precision: Literal["auto", "bf16", "float32"] = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU
    compile: bool = False  # torch.compile the training step
    # Off by default because fused towers have fewer parameters (BatchNorm folded), which would skew parameter tables.
    fuse_frozen_towers: bool = False  # reparameterise the teacher and fully frozen student towers: 1.5× step rate on an H100
    grad_checkpointing: bool = False  # recompute trainable blocks' activations in backward (memory for time)
    channels_last: bool = True  # images and convolution weights in NHWC, the layout cuDNN prefers (CUDA only)
    seed: int = 0  # seed of the weights' initialisation, data order, crops and caption draws
    log_every: int = 10  # steps between metrics.csv rows
    checkpoint_every: int = 100  # steps between checkpoints (also saved at the end and on a signal)
    evaluate: bool = True  # evaluate the trained model at the end of the run
    eval_zeroshot: str | None = None  # the user's zero-shot set: class-per-subfolder directory or filepath,label CSV
    eval_classnames: str | None = None  # class names file (one per line or JSON list) or a built-in set (imagenet1k, cifar10, cifar100)
    eval_templates: str | None = None  # prompt templates file ({} or {c} placeholder) or a built-in set; None: CLIP's 80-template ensemble
    eval_retrieval: str | None = None  # the user's retrieval set: filepath,title CSV (rows grouped by image) or shards
    eval_embedded: bool | None = None  # None: only when training on the embedded world with no user benchmark
    eval_zero_shot_per_class: int = 5  # embedded world: test images per class
    eval_retrieval_images: int = 500  # embedded world: retrieval test images
    calibration_captions: int = 128  # for sharing chosen by divergence
    calibration_captions_file: str | None = None  # one caption per line; None: captions of the training data
    device: str = "auto"  # auto (CUDA when there is one), cpu, cuda or cuda:N
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective before the run fails
    # ── training strategies (Scaling (Down) CLIP): FLIP. SLIP is objective.ssl_scale; CLIP+DA is data.augment / text_augment ──
    mask_ratio: float = 0.0  # FLIP: fraction of image patch tokens dropped in training (0.5, 0.75); a ViT image tower only
    unmasked_steps: int = 0  # FLIP's unmasked tuning: the run's last steps train without masking
    unmasked_fraction: float = 0.0  # … or the last fraction of its steps (give one of the two)
    # ── image towers and compute budgets (issue 30) ──
    # A tower preset that replaces the model's image tower (siclip.models.towers): "cnn_tiny", "vit_tiny", "vit_small",
    # "mci_tiny", or "timm:NAME" (any timm model); model_overrides["image"] then adjusts it (e.g. {"image_size": 96}).
    image_tower: str | None = None
    # Train for this many TFLOPs (siclip.train.budget): the steps are set from the measured forward + backward FLOPs of
    # one training step of this run (student, teacher, every loss term, extra views, masking); epochs then follow.
    budget_tflops: float | None = None
    budget_measure_steps: int = 1  # batches the step cost is averaged over (1 is exact when every step costs the same)


EMBEDDED_ONLY = ("num_train", "num_synthetic", "seed", "shape_twins", "caption_noise")  # DataConfig fields of the embedded world
TABLE_ONLY = ("image_key", "caption_key", "synthetic_keys")  # DataConfig fields a CSV/TSV is read by
TEACHER_ONLY = ("teacher", "distill_teacher", "teacher_model", "inherit", "inherited_lr_scale")  # TrainConfig fields of a teacher


def applied_settings(config: TrainConfig) -> dict:
    """The settings that applied to this run, as its summary.json records them under ``config``: every field of
    ``config`` except those that had no effect (the embedded world's on other data, a table's columns on other data,
    a teacher's fields when none was given). Still settings only, so ``--config summary.json`` reads them back (the
    fields left out take their defaults, which had no effect either); config.json keeps every field."""
    from siclip.data.tabular import is_table

    settings = dataclasses.asdict(config)
    data = settings["data"]
    embedded, table = config.data.source == "embedded", is_table(config.data.source)
    for key in (() if embedded else EMBEDDED_ONLY) + (() if table else TABLE_ONLY):
        data.pop(key)
    if config.teacher is None and config.distill_teacher is None:
        for key in TEACHER_ONLY:
            settings.pop(key)
    return settings


def data_read(config: TrainConfig, source) -> dict:
    """What the run read, as summary.json records it under ``data``: the ``samples`` it trained on (``len(source)``,
    after any subset), and for a CSV/TSV its ``rows`` and the ``columns`` read (image, raw caption, synthetic)."""
    from siclip.data.tabular import is_table

    read = {"source": config.data.source, "samples": len(source)}
    if is_table(config.data.source):
        whole = getattr(source, "source", source)  # the table a subset was drawn from
        read |= {"rows": len(whole), "columns": {"image": config.data.image_key, "caption": config.data.caption_key,
                                                  "synthetic": list(config.data.synthetic_keys)}}  # fmt: skip
    return read


def save_config(config: TrainConfig) -> Path:
    """``out_dir/config.json``: every setting of the run, which ``siclip train --config`` reads back."""
    return write_text_atomic(json.dumps(dataclasses.asdict(config), indent=2) + "\n", Path(config.out_dir) / "config.json")
