"""Block benchmarks on a CUDA GPU: SAS-P against Pre-LN, eager and compiled, bf16, forward + backward.

    python benchmarks/gpu_blocks.py --out benchmarks/results/gpu_blocks.md

Targets (issue 2), on an H100: SAS-P ≥ 1.15× Pre-LN throughput compiled-against-compiled and ≥ 1.20×
eager-against-eager at the three shapes below, with 15–20 % fewer parameters; shaped attention within
1.10× of plain SDPA time, with memory linear in tokens. The report states each target as met or missed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from siclip.analysis.benchmark import BlockShape, compare_attention, compare_blocks, device_name, to_markdown

SHAPES = [BlockShape(512, 8, 77, 1536), BlockShape(512, 8, 256, 256), BlockShape(768, 12, 197, 256)]
TARGETS = {"eager": 1.20, "compile": 1.15}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--no-attention", action="store_true", help="skip the shaped-attention against SDPA table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_blocks.py measures CUDA kernels and needs a CUDA device; none is available here.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    kw = {"device": "cuda", "dtype": torch.bfloat16, "steps": args.steps, "warmup": args.warmup}
    blocks = [row for mode in args.modes for row in compare_blocks(SHAPES, compile=mode == "compile", **kw)]
    attention = [] if args.no_attention else compare_attention([256, 1024, 4096], **kw)

    lines = [
        f"## Blocks on {device_name('cuda')}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__} (CUDA {torch.version.cuda}), bf16 autocast, forward + backward,",
        f"median of {args.steps} steps after {args.warmup} warm-up; command: `python {' '.join(sys.argv)}`",
        "",
        to_markdown(blocks),
        "",
        "Shaped attention against SDPA and an explicit softmax(QKᵀ)V (batch × tokens = 8192, 8 heads of 64):",
        "",
        to_markdown(attention),
        "",
        "Targets:",
    ]
    for row in blocks:
        target = TARGETS[row["mode"]]
        verdict = "met" if row["speedup"] >= target else "MISSED"
        lines.append(f"- {row['mode']} d{row['dim']} t{row['tokens']} b{row['batch']}: {row['speedup']:.2f}× (target ≥ {target}×) {verdict}")
    for row in attention:
        verdict = "met" if row["shaped_vs_sdpa"] <= 1.10 else "MISSED"
        lines.append(f"- shaped attention at {row['tokens']} tokens: {row['shaped_vs_sdpa']:.2f}× SDPA time (target ≤ 1.10×) {verdict}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
