"""Block benchmarks on a CUDA GPU: SAS-P against Pre-LN, eager and compiled, bf16, forward + backward.

    python benchmarks/gpu_blocks.py --out benchmarks/results/gpu_blocks.md
    python benchmarks/gpu_blocks.py --modes eager --profile --attention-tokens --out blocks.md   # one part
    python benchmarks/gpu_blocks.py --smoke --device cpu        # tiny shapes, any machine: checks the script

Targets (issues 2 and 15), on an H100: SAS-P ≥ 1.15× Pre-LN throughput compiled-against-compiled and
≥ 1.20× eager-against-eager at the three shapes below, with 15–20 % fewer parameters; shaped attention
within 1.10× of plain SDPA time, with memory linear in tokens. Each SAS-P variant is timed: ``sasp``
combines α/β/γ with PyTorch ops, ``sasp_triton`` with the Triton kernels (where they run). The report
states each target as met or missed, and ``--profile`` adds the top kernels of each variant's eager step.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from siclip.analysis.benchmark import (
    VARIANTS,
    BlockShape,
    available_variants,
    compare_attention,
    compare_blocks,
    device_name,
    forward_backward_step,
    make_block,
    to_markdown,
)

SHAPES = [BlockShape(512, 8, 77, 1536), BlockShape(512, 8, 256, 256), BlockShape(768, 12, 197, 256)]
SMOKE_SHAPES = [BlockShape(64, 2, 17, 4)]
TARGETS = {"eager": 1.20, "compile": 1.15}
ATTENTION_TARGET = 1.10


def profile_variants(shape: BlockShape, variants: list[str], device: str, dtype: torch.dtype, steps: int = 3) -> str:
    """The top kernels by device time of each variant's eager forward + backward at ``shape``."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    parts = []
    for name in variants:
        kind, backend = VARIANTS[name]
        block = make_block(kind, shape.dim, shape.heads, backend=backend).to(device)
        x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
        step = forward_backward_step(block, x, dtype)
        for _ in range(3):
            step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if on_cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
        parts += [f"#### {name} at {shape}, {steps} steps", "", "```", table.strip(), "```", ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", nargs="*", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: every one that runs here")
    parser.add_argument("--attention-tokens", type=int, nargs="*", default=[256, 1024, 4096],
                        help="token counts of the shaped attention against SDPA table (none: skip it)")  # fmt: skip
    parser.add_argument("--no-attention", action="store_true", help="skip the shaped-attention against SDPA table")
    parser.add_argument("--profile", action="store_true", help="add each variant's top kernels at the first shape")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, float32, two steps: check the script")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_blocks.py measures CUDA kernels and needs a CUDA device; none is available here "
              "(try --smoke --device cpu).", file=sys.stderr)  # fmt: skip
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    shapes, dtype, batch_tokens = SHAPES, torch.bfloat16, 8192
    if args.smoke:
        shapes, dtype, batch_tokens, args.steps, args.warmup = SMOKE_SHAPES, torch.float32, 64, 2, 1
        if args.attention_tokens:
            args.attention_tokens = [t for t in args.attention_tokens if t <= 64] or [16]
    if args.no_attention:
        args.attention_tokens = []
    variants = args.variants or available_variants(args.device)
    kw = {"device": args.device, "dtype": dtype, "steps": args.steps, "warmup": args.warmup}
    blocks = [row for mode in args.modes for row in compare_blocks(shapes, compile=mode == "compile", variants=variants, **kw)]
    attention = compare_attention(args.attention_tokens, batch_tokens=batch_tokens, **kw) if args.attention_tokens else []
    profiles = profile_variants(shapes[0], variants, args.device, dtype) if args.profile else ""

    triton = ""
    if "sasp_triton" in variants:
        import triton as triton_module

        triton = f", triton {triton_module.__version__}"
    cuda = f" (CUDA {torch.version.cuda})" if torch.device(args.device).type == "cuda" else ""
    lines = [
        f"## Blocks on {device_name(args.device)}: {', '.join(args.modes) or 'attention only'}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}{cuda}{triton}, {str(dtype).removeprefix('torch.')} "
        f"{'autocast' if dtype != torch.float32 else '(no autocast)'}, forward + backward, median of {args.steps} interleaved steps after {args.warmup} warm-up; "
        f"command: `python {' '.join(sys.argv)}`",
        "",
    ]
    if blocks:
        lines += [to_markdown(blocks), ""]
    if attention:
        lines += [f"Shaped attention against SDPA and an explicit softmax(QKᵀ)V (batch × tokens = {batch_tokens}, "
                  "8 heads of 64):", "", to_markdown(attention), ""]  # fmt: skip
    if blocks or attention:
        lines.append("Targets:")
    for row in blocks:
        target = TARGETS[row["mode"]]
        for name in variants[1:]:
            speedup = row["speedup" + name.removeprefix("sasp")]
            verdict = "met" if speedup >= target else "MISSED"
            lines.append(f"- {row['mode']} {name} d{row['dim']} t{row['tokens']} b{row['batch']}: {speedup:.2f}× "
                         f"Pre-LN (target ≥ {target}×) {verdict}")  # fmt: skip
    for row in attention:
        for key in (k for k in row if k.endswith("_vs_sdpa")):
            verdict = "met" if row[key] <= ATTENTION_TARGET else "MISSED"
            lines.append(f"- {key.removesuffix('_vs_sdpa')} at {row['tokens']} tokens: {row[key]:.2f}× SDPA time "
                         f"(target ≤ {ATTENTION_TARGET}×) {verdict}")  # fmt: skip
    if profiles:
        lines += ["", "Where the time goes (eager, top kernels by self device time):", "", profiles]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a" if args.append else "w") as f:
            f.write(report + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
