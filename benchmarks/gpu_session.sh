#!/usr/bin/env bash
# Every GPU measurement this project still owes, in one call of under 10 minutes on an H100.
#
#     bash benchmarks/gpu_session.sh OUT_DIR
#     SMOKE=1 bash benchmarks/gpu_session.sh OUT_DIR      # tiny sizes on the CPU, no time limits: checks the script
#
# In this order (issues 2, 7, 11, 12, 15):
#   1. the block table, Pre-LN against SAS-P with PyTorch ops and with the Triton kernels, eager then
#      compiled, with the eager profile of each variant (blocks.md);
#   2. shaped attention against SDPA, time and peak memory, up to 4,096 tokens (blocks.md);
#   3. the training-step figures still predicted in RESULTS.md: the teacher-first peak at batch 1536, the
#      checkpointed all-trainable ladder, the profile (step/), the uint8 loader handover (loader.txt);
#      SiCLIP-S0 against MobileCLIP-S0 image encoders, bf16 training and inference (appended to blocks.md);
#   4. benchmarks/real_path.sh, when it exists, given what time is left (real_path.tar.gz).
# Each step has its own time limit and writes under OUT_DIR as it goes, so a step cut short loses only
# itself; the call ends by naming every failed step (exit 1). At most 8 files: session.log (device and every step's output), blocks.md, loader.txt,
# step/{train_step.jsonl,train_step.md,train_step.png,profile.txt}, real_path.tar.gz.
# Afterwards, record the figures with the device name in benchmarks/RESULTS.md.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec > >(tee -a "$out/session.log") 2>&1
smoke=${SMOKE:-0}
budget=570  # seconds for the whole call; step 4 gets what steps 1-3 leave

# A step's time limit: its share on the GPU, none in a CPU smoke run (`timeout 0` never fires).
limit() { if [ "$smoke" = 1 ]; then echo 0; else echo "$1"; fi; }

# Run one step under its limit; a failure is recorded and the next step still runs (the device time is spent
# either way), and the summary at the end names every failed step, so a partial session cannot pass for whole.
failed=()
run_step() {
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@"
    local status=$?
    if [ "$status" -ne 0 ]; then
        failed+=("$name (exit $status$([ "$status" = 124 ] && echo ', time limit'))")
    fi
    return 0
}

if [ "$smoke" = 1 ]; then
    blocks=(--smoke --device cpu) step=(--smoke --device cpu) encoders=(--tiny --device cpu --steps 2 --warmup 1)
    loader=(--sizes 64 --workers 0 --samples 64 --writers 1 --batch-size 16 --generate 50)
    ladder=(--trainable-ladder-ckpt 16)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    blocks=() step=(--steps 10) encoders=(--compile)
    loader=(--sizes 256 --workers 16 --samples 16384 --writers 16 --batch-size 256 --generate 1000)
    ladder=(--trainable-ladder-ckpt 256 512 768 1024)
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    || echo "triton is not importable: the block table has no sasp_triton rows"

echo "== 1. blocks, eager (with each variant's profile), then compiled"
run_step "1. blocks eager" "$(limit 80)" python3 benchmarks/gpu_blocks.py "${blocks[@]}" --modes eager --attention-tokens \
    --profile --out "$out/blocks.md" --append
run_step "1. blocks compiled" "$(limit 170)" python3 benchmarks/gpu_blocks.py "${blocks[@]}" --modes compile \
    --attention-tokens --steps 10 --warmup 3 --out "$out/blocks.md" --append
echo "== 2. shaped attention against SDPA"
run_step "2. attention" "$(limit 45)" python3 benchmarks/gpu_blocks.py "${blocks[@]}" --modes --attention-tokens 256 1024 4096 \
    --out "$out/blocks.md" --append
echo "== 3. training step: teacher-first peak at batch 1536, checkpointed all-trainable ladder, profile; loader"
run_step "3. step, main" "$(limit 90)" python3 benchmarks/gpu_train_step.py "${step[@]}" --out "$out/step" \
    --main-variants siclip siclip_cached --skip ladder trainable profile
run_step "3. step, ladder" "$(limit 90)" python3 benchmarks/gpu_train_step.py "${step[@]}" --out "$out/step" --skip main ladder \
    --trainable-ladder "${ladder[@]}"
run_step "3. step table" 0 python3 benchmarks/gpu_train_step.py --out "$out/step" --from-jsonl "$out/step/train_step.jsonl" > /dev/null
run_step "3. loader" "$(limit 50)" python3 benchmarks/data_throughput.py "${loader[@]}" --outputs float32 uint8 > "$out/loader.txt"
cat "$out/loader.txt"
echo "== 3b. SiCLIP-S0 against MobileCLIP-S0 image encoders (issue 12)"
run_step "3b. image encoders" "$(limit 60)" python3 benchmarks/gpu_image_encoders.py "${encoders[@]}" --out "$out/image_encoders.tmp"
[ -f "$out/image_encoders.tmp" ] && cat "$out/image_encoders.tmp" >> "$out/blocks.md"
rm -f "$out/image_encoders.tmp"

echo "== 4. the real path (issue 11)"
if [ ! -f benchmarks/real_path.sh ]; then
    echo "benchmarks/real_path.sh does not exist yet: skipped"
elif [ "$smoke" = 1 ]; then
    echo "benchmarks/real_path.sh needs a GPU: skipped in a smoke run"
else
    left=$((budget - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "only ${left}s left of ${budget}s: real_path.sh skipped"
    else
        scratch=$(mktemp -d)
        run_step "4. real path" "$left" bash benchmarks/real_path.sh "$scratch/real_path"
        tar -czf "$out/real_path.tar.gz" -C "$scratch" real_path  # one file, whatever the script wrote
        rm -rf "$scratch"
    fi
fi
echo "== done in ${SECONDS}s"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed steps (the others' results are in $out):"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
