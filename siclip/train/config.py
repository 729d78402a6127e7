"""Training configuration: plain dataclasses, saved with every checkpoint and run summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from siclip.distill import ObjectiveConfig


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded", a shard directory/pattern, or a .csv/.tsv file (any case)
    num_train: int = 2000  # embedded world only
    num_synthetic: int = 5  # embedded world only: synthetic captions per image
    seed: int = 0  # embedded world only
    p_synthetic: float = 0.5
    shape_twins: bool = False  # embedded world only: batch every scene with its shape twin (EmbeddedConfig.shape_twins)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: area fraction kept; (1, 1) with
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # ratio (1, 1) turns cropping off (square images)
    batch_size: int = 64
    workers: int = 0
    tokenizer: str | None = None  # None: the teacher's, else the model's; "clip", "embedded", "words" (built from the captions)
    vocab_path: str | None = None  # a CLIP merges file, or a word list (JSON list / one per line) for "words"
    vocab_samples: int | None = None  # "words": samples whose captions make the vocabulary (None: all)
    vocab_min_count: int = 1  # "words": keep words seen at least this often
    max_unknown_rate: float = 0.05  # refuse to train when more of the first batches' caption tokens are <unk>
    tokenizer_check_samples: int = 512  # samples of the first batches checked for unknown tokens
    image_key: str = "filepath"  # CSV/TSV columns
    caption_key: str = "title"
    synthetic_keys: tuple[str, ...] = ()  # CSV/TSV synthetic caption columns (or one column holding a JSON list)
    max_skip_fraction: float | None = 0.5  # an epoch skipping more of its samples stops the run (an empty one always does)
    # ── data quality (issue 30) ──
    caption_noise: float = 0.0  # embedded world only: this fraction of training pairs carries another scene's captions (EmbeddedConfig.caption_noise)
    subset: str | None = None  # a JSON list of sample indices (siclip filter's kept_indices.json): train on those samples only


@dataclass
class TrainConfig:
    model: str = "mobileclip_tiny"
    model_overrides: dict = field(default_factory=dict)  # e.g. {"siclip": {"sharing": "optimal", "sharing_max_groups": 2}}
    teacher: str | None = None  # checkpoint: the student inherits from it (SiCLIP) and distils from it
    inherit: bool = True  # a SiCLIP student inherits the teacher's weights (WI); False: built from scratch, the teacher only distils
    # Learning-rate factor of the inherited parameters a student trains (SiCLIPConfig.freeze="none"): they start
    # where the teacher left them, so a lower lr keeps them near it while the new SAS-P blocks learn at full lr.
    inherited_lr_scale: float = 1.0
    teacher_model: str = "mobileclip_s0"  # the registered config a teacher file in Apple's layout is built as
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10
    # Per-tower learning rates: lr × tower_lr_scale[tower], and 0 before step tower_frozen_steps[tower]
    # (towers "image", "text"; the rest, e.g. the temperature, follows lr). A text tower held still
    # while the image tower starts makes the image learn what the random text features tell apart.
    tower_lr_scale: dict = field(default_factory=dict)
    tower_frozen_steps: dict = field(default_factory=dict)
    grad_clip: float = 1.0
    accumulation: int = 1
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU
    compile: bool = False
    fuse_frozen_towers: bool = False  # reparameterise the teacher and fully frozen student towers: 1.5× step rate on an H100;
    # off by default because fused towers have fewer parameters (BatchNorm folded), which would skew parameter tables
    grad_checkpointing: bool = False  # recompute trainable blocks' activations in backward (memory for time)
    channels_last: bool = True  # images and convolution weights in NHWC, the layout cuDNN prefers (CUDA only)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    evaluate: bool = True
    eval_zeroshot: str | None = None  # the user's zero-shot set: class-per-subfolder directory or filepath,label CSV
    eval_classnames: str | None = None  # class names file (one per line or JSON list)
    eval_templates: str | None = None  # prompt templates file ({} placeholder); None: CLIP's 80-template ensemble
    eval_retrieval: str | None = None  # the user's retrieval set: filepath,title CSV (rows grouped by image) or shards
    eval_embedded: bool | None = None  # None: only when training on the embedded world with no user benchmark
    eval_zero_shot_per_class: int = 5
    eval_retrieval_images: int = 500
    calibration_captions: int = 128  # for sharing chosen by divergence
    calibration_captions_file: str | None = None  # one caption per line; None: captions of the training data
    device: str = "auto"
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective before the run fails
    # ── image towers and compute budgets (issue 30) ──
    # A tower preset that replaces the model's image tower (siclip.models.towers): "cnn_tiny", "vit_tiny", "vit_small",
    # "mci_tiny", or "timm:NAME" (any timm model); model_overrides["image"] then adjusts it (e.g. {"image_size": 96}).
    image_tower: str | None = None
    # Train for this many TFLOPs (siclip.train.budget): the steps are set from the measured forward + backward FLOPs of
    # one training step of this run (student, teacher, every loss term, extra views, masking); epochs then follow.
    budget_tflops: float | None = None
    budget_measure_steps: int = 1  # batches the step cost is averaged over (1 is exact when every step costs the same)
