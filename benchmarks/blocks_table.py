"""The block benchmarks as one table: Pre-LN against SAS-P, forward + backward (the demo's main job).

    python benchmarks/blocks_table.py            # CPU, small shapes, eager
    python benchmarks/blocks_table.py --device cuda --dtype bfloat16

Ratios on a CPU say little about a GPU; quote absolute times only from a GPU (benchmarks/gpu_blocks.py).
"""

from __future__ import annotations

import argparse

import torch

from siclip.analysis.benchmark import BlockShape, compare_attention, compare_blocks, device_name, to_markdown

CPU_SHAPES = [BlockShape(128, 4, 64, 32), BlockShape(256, 8, 77, 16), BlockShape(384, 6, 197, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    blocks = compare_blocks(CPU_SHAPES, device=args.device, dtype=dtype, steps=args.steps, warmup=3)
    attention = compare_attention([64, 256, 1024], batch_tokens=4096, device=args.device, steps=args.steps, warmup=3)
    # Absolute times are quoted only from a GPU; a CPU run reports ratios.
    times = ["pre_ln_ms", "sasp_ms"] if args.device.startswith("cuda") else []
    attention_times = ["sdpa_ms", "shaped_ms", "explicit_ms"] if times else []
    for row in attention:
        row["explicit_vs_sdpa"] = row["explicit_ms"] / row["sdpa_ms"]
    print(f"\nDevice: {device_name(args.device)}, torch {torch.__version__}, dtype {args.dtype}\n")
    print("Blocks, forward + backward (speedup = Pre-LN time / SAS-P time, medians of interleaved steps):\n")
    columns = ["dim", "heads", "tokens", "batch", *times, "speedup", "pre_ln_params", "sasp_params", "param_saving"]
    print(to_markdown([{c: r[c] for c in columns} for r in blocks]))
    print("\nAttention, forward + backward (time relative to SDPA):\n")
    columns = ["tokens", "batch", "heads", "head_dim", *attention_times, "shaped_vs_sdpa", "explicit_vs_sdpa"]
    print(to_markdown([{c: r[c] for c in columns} for r in attention]))


if __name__ == "__main__":
    main()
