"""Named training configurations: the README's main job (the demo teacher and its SiCLIP student).

The recipe comes from measurements on the 2-core CPU (``experiments/RESULTS.md``, "What limits the demo"):
on the embedded world, zero-shot accuracy is limited by learning the objects' *shapes*; colour and
position tell almost every pair in a batch apart, so plain contrastive training learns colour and stays
at chance on shape. Five changes together lift the demo teacher from 8.8 % to 52.6 % top-1 in 448 steps.
"""

from __future__ import annotations

from siclip.distill import ObjectiveConfig

from .config import DataConfig, TrainConfig

# The embedded-world recipe that learns shape (RESULTS.md, "What limits the demo"): 96 px images, text
# attention blind to padding, shape twins in every batch, no random crops (each procedural sample is
# seen once, and crops cut objects out of captioned scenes), the image tower at 2.5× the lr while the
# text tower stays still for its first ~third of the steps.
WORLD_DATA = {"batch_size": 128, "p_synthetic": 0.5, "shape_twins": True, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
WORLD_MODEL = {"image": {"image_size": 96}, "text": {"mask_padding": True}}
WORLD_IMAGE_LR_SCALE, WORLD_TEXT_FROZEN_FRACTION = 2.5, 1 / 3

PRESETS = {
    # MobileCLIP-tiny with the CLIP loss on the embedded world: the teacher. Two attention blocks in the
    # image tower's last stage (as SiCLIP-S0 has), so both towers have adjacent blocks to compare.
    "demo": TrainConfig(model="mobileclip_tiny", model_overrides=WORLD_MODEL, out_dir="runs/demo", epochs=1, lr=2e-3, warmup_steps=20,
                        tower_lr_scale={"image": WORLD_IMAGE_LR_SCALE}, tower_frozen_steps={"text": 150}, log_every=10, checkpoint_every=50,
                        eval_zero_shot_per_class=5, eval_retrieval_images=500, data=DataConfig(num_train=57_344, **WORLD_DATA)),
    # SiCLIP-tiny from the demo teacher: weight inheritance, WIKD (feature, relation, interactive) and PM,
    # towers converted as siclip_tiny.json says; the same world, so both are evaluated on the same items.
    "demo-student": TrainConfig(model="siclip_tiny", model_overrides={"image": {"image_size": 96}}, teacher="runs/demo/model.pt",
                                out_dir="runs/demo_student", epochs=1, lr=2e-3, warmup_steps=10, log_every=10, checkpoint_every=50,
                                objective=ObjectiveConfig(), eval_zero_shot_per_class=5, eval_retrieval_images=500,
                                data=DataConfig(num_train=12_800, **WORLD_DATA)),
}  # fmt: skip
