"""Training configuration: plain dataclasses, saved with every checkpoint and run summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from siclip.distill import ObjectiveConfig


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded", a shard directory/pattern, or a .csv/.tsv file
    num_train: int = 2000  # embedded world only
    seed: int = 0  # embedded world only
    p_synthetic: float = 0.5
    batch_size: int = 64
    workers: int = 0
    normalize_on_device: bool = False  # loader workers hand over uint8 crops; (x/255 − mean)/std runs on the device
    tokenizer: str = "embedded"
    vocab_path: str | None = None
    max_skip_fraction: float | None = 0.5  # an epoch skipping more of its samples stops the run (an empty one always does)


@dataclass
class TrainConfig:
    model: str = "mobileclip_tiny"
    model_overrides: dict = field(default_factory=dict)  # e.g. {"siclip": {"sharing": "optimal", "sharing_max_groups": 2}}
    teacher: str | None = None  # checkpoint: the student inherits from it (SiCLIP) and distils from it
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10
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
    eval_zero_shot_per_class: int = 5
    eval_retrieval_images: int = 500
    calibration_captions: int = 128  # for sharing chosen by divergence
    device: str = "auto"
    dist_timeout: float = 1800.0  # seconds a rank waits for the others in a collective before the run fails
