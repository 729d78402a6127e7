"""Predicted eager GPU time of Pre-LN and SAS-P blocks from their memory traffic (a roofline model).

    python benchmarks/block_traffic.py                     # the three issue-2 shapes, H100 figures
    python benchmarks/block_traffic.py --tflops 600 --tbps 3.0 --top 10
    TRITON_INTERPRET=1 python benchmarks/block_traffic.py    # also SAS-P with the Triton combination kernels

Traces one bf16-autocast forward + backward of each block op by op on this machine
(:mod:`siclip.analysis.traffic`), at two small batches extrapolated to the target batch, and predicts
eager time as Σ max(FLOPs/P, bytes/B) + launches. A model for comparing designs without a GPU, not a
measurement. The default P is an assumed effective bf16 matmul rate at these shapes (an 8192³ product
ran at 788 TFLOP/s on the H100 this project measured); B = 3.0 TB/s is a device-to-device copy on that
H100 kind. Under Triton's interpreter the ``sasp_triton`` variant is traced too: each of its kernels
counts as one op that reads its inputs and writes its outputs once, which is what the kernels do.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from siclip.analysis.benchmark import VARIANTS, BlockShape, available_variants, make_block, to_markdown
from siclip.analysis.traffic import OpTraffic, extrapolate, roofline_ms, trace_traffic

SHAPES = [BlockShape(512, 8, 77, 1536), BlockShape(512, 8, 256, 256), BlockShape(768, 12, 197, 256)]
# Modelled only (not in the timed tables): SAS-P with autograd composing norm, projection and activation,
# to show what the fused input function (siclip.blocks.parallel_input) saves.
MODEL_ONLY = {"sasp_unfused": ("sasp", "sdpa", {"fused_input": False})}


def block_traffic(variant: str, shape: BlockShape, small: tuple[int, int] = (2, 4)) -> list[OpTraffic]:
    """Ops of one forward + backward of a ``variant`` block at ``shape``, extrapolated from two small batches."""
    torch.manual_seed(0)
    kind, backend, options = MODEL_ONLY[variant] if variant in MODEL_ONLY else (*VARIANTS[variant], {})
    block = make_block(kind, shape.dim, shape.heads, backend=backend, **options)

    def trace(batch: int) -> list[OpTraffic]:
        x = torch.randn(batch, shape.tokens, shape.dim, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        upstream = torch.randn_like(y)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(x)
            out.backward(upstream)
            x.grad = None
            for p in block.parameters():
                p.grad = None

        step()  # one untraced call, so both traces see the same (warm) program
        return trace_traffic(step)

    b1, b2 = small
    return extrapolate(trace(b1), trace(b2), (shape.batch - b1) / (b2 - b1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=600.0, help="effective matmul rate, TFLOP/s")
    parser.add_argument("--tbps", type=float, default=3.0, help="memory bandwidth, TB/s (read + write)")
    parser.add_argument("--launch-us", type=float, default=4.0, help="per-op launch cost, µs")
    parser.add_argument("--top", type=int, default=6, help="largest non-matmul ops listed per SAS-P shape")
    args = parser.parse_args()
    rows, heavy = [], []
    variants = [*available_variants("cpu"), *MODEL_ONLY]
    for shape in SHAPES:
        row = {"shape": str(shape)}
        for kind in variants:
            ops = block_traffic(kind, shape)
            row[f"{kind}_tflop"] = sum(o.flops for o in ops) / 1e12
            row[f"{kind}_other_gb"] = sum(o.bytes for o in ops if not o.flops) / 1e9
            row[f"{kind}_ops"] = len(ops)
            row[f"{kind}_ms"] = roofline_ms(ops, tflops=args.tflops, tbytes_per_s=args.tbps, launch_us=args.launch_us)
            if kind != "pre_ln":
                by_op = Counter()
                for o in ops:
                    if not o.flops:
                        by_op[o.op] += o.bytes / 1e9
                ranked = ", ".join(f"{op} {gb:.2f} GB" for op, gb in by_op.most_common(args.top))
                heavy.append(f"- {kind} {shape}: {ranked}")
        for kind in variants[1:]:
            row["predicted_speedup" + kind.removeprefix("sasp")] = row["pre_ln_ms"] / row[f"{kind}_ms"]
        rows.append(row)
    print(f"Predicted eager forward + backward, bf16 autocast (P = {args.tflops:g} TFLOP/s, B = {args.tbps:g} TB/s, "
          f"{args.launch_us:g} µs per op); 'other' = bytes moved by non-matmul ops:\n")  # fmt: skip
    print(to_markdown(rows))
    print("\nSAS-P's largest non-matmul traffic:\n" + "\n".join(heavy))


if __name__ == "__main__":
    main()
