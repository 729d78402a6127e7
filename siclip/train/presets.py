"""Named training configurations: the README's main job (the demo teacher and its SiCLIP student).

The demo's sizes come from measurements on the 2-core CPU (``experiments/RESULTS.md``, "What limits the
demo"): zero-shot accuracy on the embedded classes is limited by learning the objects' *shapes* (colour
is learned within a hundred steps, shape stays at chance for hundreds more), so the teacher gets as
many optimiser steps as the time allows.
"""

from __future__ import annotations

from siclip.distill import ObjectiveConfig

from .config import DataConfig, TrainConfig

PRESETS = {
    # MobileCLIP-tiny with the CLIP loss on the embedded world: the teacher.
    # Two attention blocks in the image tower's last stage (as SiCLIP-S0 has), so both towers have adjacent
    # blocks to compare; raw captions half the time: their canonical "red circle, blue star" alt-text makes
    # the shape word carry the contrast (see RESULTS.md).
    "demo": TrainConfig(model="mobileclip_tiny", model_overrides={"image": {"layers": [1, 1, 2, 2]}}, out_dir="runs/demo", epochs=1,
                        lr=2e-3, warmup_steps=20, log_every=10, checkpoint_every=50, eval_zero_shot_per_class=5,
                        eval_retrieval_images=500, data=DataConfig(num_train=40_960, batch_size=128, p_synthetic=0.5)),
    # SiCLIP-tiny from the demo teacher: weight inheritance, WIKD (feature, relation, interactive) and PM,
    # towers converted as siclip_tiny.json says; the same world, so both are evaluated on the same items.
    "demo-student": TrainConfig(model="siclip_tiny", teacher="runs/demo/model.pt", out_dir="runs/demo_student", epochs=1, lr=2e-3,
                                warmup_steps=10, log_every=10, checkpoint_every=50, objective=ObjectiveConfig(),
                                eval_zero_shot_per_class=5, eval_retrieval_images=500,
                                data=DataConfig(num_train=12_800, batch_size=128, p_synthetic=0.5)),
}  # fmt: skip
