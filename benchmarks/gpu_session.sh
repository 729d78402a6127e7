#!/usr/bin/env bash
# Every GPU measurement this project still owes, in one call of under 10 minutes on an H100.
#
#     bash benchmarks/gpu_session.sh OUT_DIR
#
# Each step has its own time limit and writes under OUT_DIR as it goes, so a step cut short loses
# only itself. Afterwards, record the figures with the device name in benchmarks/RESULTS.md:
# blocks_*.md (issue 2); step/train_step.{jsonl,md,png} and loader.txt (issue 7).
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
timeout 100 python3 benchmarks/gpu_blocks.py --modes eager --out "$out/blocks_eager.md"
timeout 170 python3 benchmarks/gpu_blocks.py --modes compile --no-attention --out "$out/blocks_compile.md"
# The training step after the teacher-first order, and the checkpointed all-trainable ladder.
timeout 150 python3 benchmarks/gpu_train_step.py --out "$out/step" --skip ladder trainable profile
timeout 110 python3 benchmarks/gpu_train_step.py --out "$out/step" --skip main --ladder-variants siclip --ladder 1024 2048 \
    --trainable-ladder 192 224 256 --trainable-ladder-ckpt 256 512 768 1024
python3 benchmarks/gpu_train_step.py --out "$out/step" --from-jsonl "$out/step/train_step.jsonl" > /dev/null
timeout 70 python3 benchmarks/data_throughput.py --sizes 256 --workers 16 --samples 16384 --writers 16 \
    --batch-size 256 --generate 1000 | tee "$out/loader.txt"
