#!/usr/bin/env bash
# The real path on one GPU (issue 11): SiCLIP-S0 inheriting from a MobileCLIP-S0 file in Apple's layout,
# a few hundred bf16 steps of train.py on shards, end-of-run evaluation on a zero-shot folder and a
# retrieval CSV. About 5 minutes on an H100. Record OUT/real_path.json with the device in RESULTS.md.
#
#     bash benchmarks/real_path.sh OUT [--apple-file mobileclip_s0.pt]      # add --smoke for the CPU check
set -eu
out=${1:?usage: bash benchmarks/real_path.sh OUT [--smoke] [--apple-file FILE]}
shift
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
python3 "$(dirname "$0")/real_path.py" "$out" "$@" 2>&1 | tee "$out.log"
