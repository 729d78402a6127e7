"""Named training configurations: the README's main job (the demo teacher and its SiCLIP student), and the paper's
recipe for SiCLIP-S0 on the user's data (``paper-s0``).

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
    # SiCLIP-S0 as the paper trains it (arXiv 2411.14789, implementation details): AdamW, batch 1536, weight decay 0.1,
    # lr 1e-3, 10k warm-up steps, 32 epochs, λ1 = 4000, λ2 = λ3 = 1, λ4 = 0.1, one 24 GB GPU; bf16 autocast there
    # ("auto"). The student inherits from Apple's MobileCLIP-S0 and distils from it: the paper does not name its KD
    # teacher, and paper_math.md's reading (#7, #9) is the model the weights come from (512 wide, no map); a wider
    # teacher the user holds goes in --distill-teacher (FD's learned map, ICL in the teacher's width). Where the paper
    # is silent: AdamW betas (0.9, 0.98) and eps 1e-6 (CLIP's), gradient clip 1, cosine decay, half the steps on a
    # synthetic caption (p_synthetic 0.5). Frozen towers fused: the full step at batch 1536 measured 19.8 GiB on an
    # H100 (benchmarks/RESULTS.md, issue 7), inside the paper's 24 GB.
    "paper-s0": TrainConfig(model="siclip_s0", teacher="mobileclip_s0.pt", out_dir="runs/paper_s0", epochs=32, lr=1e-3, weight_decay=0.1,
                            betas=(0.9, 0.98), eps=1e-6, warmup_steps=10_000, grad_clip=1.0, objective=ObjectiveConfig(), precision="auto",
                            fuse_frozen_towers=True, log_every=50, checkpoint_every=500,
                            data=DataConfig(source="data/shards", batch_size=1536, workers=8, p_synthetic=0.5)),
}  # fmt: skip
