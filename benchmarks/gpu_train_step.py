"""The consumer-GPU claim, measured: the full SiCLIP training step at batch 1536 in bf16 (issue 7).

    python benchmarks/gpu_train_step.py --out benchmarks/results/train_step          # on a CUDA GPU
    python benchmarks/gpu_train_step.py --smoke --device cpu --out /tmp/step         # tiny models, any machine

Measures, in one run (variants in :mod:`siclip.analysis.train_step`):

1. the bf16 matrix-product rate of the device (utilisation is quoted against it);
2. at batch 1536: the full step (``siclip``), the same with the teacher cache (``siclip_cached``), the
   last-stage-only image-encoder baseline (``image_last_stage``), each plain and with the frozen towers
   reparameterised, and the cached step with activation checkpointing: median images/s over the timed
   steps, peak ``torch.cuda.max_memory_allocated``, FLOPs per step (``torch.utils.flop_counter``) and
   utilisation;
3. a batch ladder of each variant for the memory / throughput plot, and the largest batch at which the
   all-trainable step fits 24 GiB, with and without activation checkpointing;
4. a profile of the cached step (top kernels by GPU time).

Writes ``train_step.jsonl`` (one row per measurement, as it goes), ``train_step.md`` (the tables, the
targets met or missed), ``train_step.png`` (the plot) and ``profile.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from siclip.analysis.benchmark import device_name, to_markdown
from siclip.analysis.train_step import StepConfig, matmul_rate, measure_step, plot_step_scaling, prepare_step

BUDGET_GIB, TARGET_GIB = 24.0, 20.0
COLUMNS = ["variant", "batch", "checkpointing", "reparameterize_frozen", "steps", "ms", "images_per_s", "peak_gib",
           "tflops_per_step", "tflops_per_s", "utilisation", "trainable_params", "oom"]  # fmt: skip


def profile_step(config: StepConfig, device: str, path: Path, steps: int = 3) -> str:
    """The top kernels of ``steps`` steps by device time (self time), as torch.profiler tabulates them."""
    from torch.profiler import ProfilerActivity, profile

    step, _, _ = prepare_step(config, device)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(steps):
            step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    path.write_text(table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="directory for the jsonl, markdown, plot and profile")
    parser.add_argument("--batch", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per main measurement (median)")
    parser.add_argument("--ladder-steps", type=int, default=8, help="timed steps per ladder point")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ladder", type=int, nargs="*", default=[256, 512, 1024, 1536, 2048])
    parser.add_argument("--main-variants", nargs="*", default=["siclip", "siclip_cached", "image_last_stage"],
                        help="variants measured at --batch (each plain, fused and, but the baseline, checkpointed)")
    parser.add_argument("--ladder-variants", nargs="*", default=["siclip", "siclip_cached", "image_last_stage"])
    parser.add_argument("--trainable-ladder", type=int, nargs="*", default=[64, 128, 192, 256, 384])
    parser.add_argument("--trainable-ladder-ckpt", type=int, nargs="*", default=[128, 256, 384, 512, 768, 1024])
    parser.add_argument("--skip", nargs="*", default=[], choices=["main", "ladder", "trainable", "profile"])
    parser.add_argument("--from-jsonl", type=Path, nargs="*", help="measure nothing: report and plot these logs' rows")
    parser.add_argument("--smoke", action="store_true", help="tiny models and batches: check the script anywhere")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_jsonl:
        rows = [json.loads(line) for path in args.from_jsonl for line in path.read_text().splitlines() if line.strip()]
        return finish(rows, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_train_step.py measures a CUDA training step; no CUDA device here (try --smoke --device cpu).", file=sys.stderr)
        return 2
    models = {"teacher": "mobileclip_tiny", "student": "siclip_tiny"} if args.smoke else {}
    if args.smoke:
        args.batch, args.steps, args.ladder_steps, args.warmup = 16, 2, 1, 1
        args.ladder, args.trainable_ladder, args.trainable_ladder_ckpt = [8, 16], [8, 16], [16]
    log = (args.out / "train_step.jsonl").open("a")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    on_cuda = torch.device(args.device).type == "cuda"
    matmul_dtype = torch.bfloat16 if on_cuda else torch.float32  # a CPU without AMX crawls through bf16
    rate = matmul_rate(args.device, size=8192 if on_cuda else 512, dtype=matmul_dtype)
    print(f"{device_name(args.device)}: {matmul_dtype} matmul {rate:.1f} TFLOP/s", flush=True)
    rows: list[dict] = []

    def run(config: StepConfig, steps: int, flops: bool) -> dict:
        row = measure_step(config, args.device, steps=steps, warmup=args.warmup, flops=flops, keep_going=True)
        row |= {"device_name": device_name(args.device), "matmul_tflops": rate, "steps": steps, "torch": torch.__version__}
        if "error" in row:
            print(f"{config}: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        return row

    B = args.batch
    fused = {"reparameterize_frozen": True, **models}
    main_configs = [
        StepConfig("siclip", B, **models), StepConfig("siclip", B, **fused), StepConfig("siclip", B, checkpointing=True, **fused),
        StepConfig("siclip_cached", B, **models), StepConfig("siclip_cached", B, **fused),
        StepConfig("siclip_cached", B, checkpointing=True, **fused), StepConfig("image_last_stage", B, **models),
    ]  # fmt: skip
    main_configs = [c for c in main_configs if c.variant in args.main_variants]
    if "main" not in args.skip:
        for config in tqdm(main_configs, desc=f"step @ {B}"):
            run(config, args.steps, flops=True)
    if "ladder" not in args.skip:
        ladder = [StepConfig(v, b, **(models if v == "image_last_stage" else fused)) for v in args.ladder_variants for b in args.ladder if b != B]
        for config in tqdm(ladder, desc="batch ladder"):
            run(config, args.ladder_steps, flops=False)
    if "trainable" not in args.skip:
        for checkpointing, batches in ((False, args.trainable_ladder), (True, args.trainable_ladder_ckpt)):
            for b in tqdm(batches, desc=f"all trainable, checkpointing={checkpointing}"):
                row = run(StepConfig("all_trainable", b, checkpointing=checkpointing, **models), args.ladder_steps, flops=False)
                if not fits_budget(row):
                    break
    if "profile" not in args.skip:
        profile = profile_step(StepConfig("siclip_cached", B, **fused), args.device, args.out / "profile.txt")
        print("\nProfile of the cached step (top kernels by device time):\n" + "\n".join(profile.splitlines()[:20]))
    return finish(rows, args)


def finish(rows: list[dict], args) -> int:
    first = rows[0]
    title = f"siclip_s0 training step, bf16, {first.get('device_name', first['device'])}, torch {first.get('torch', '')}"
    plot_step_scaling(rows, args.out / "train_step.png", budget_gib=BUDGET_GIB, target_gib=TARGET_GIB, title=title)
    report = render_report(rows, args.batch)
    (args.out / "train_step.md").write_text(report + "\n")
    print(report)
    return 0


def fits_budget(row: dict) -> bool:
    """Whether a measured step ran and peaked within the 24 GiB budget (a NaN peak, from a CPU, does not fit)."""
    return not row["oom"] and "error" not in row and row["peak_gib"] <= BUDGET_GIB


def largest_fitting(rows: list[dict], checkpointing: bool) -> tuple[int | None, int | None]:
    """(largest measured batch of the all-trainable step within the budget, smallest measured over it)."""
    runs = [r for r in rows if r["variant"] == "all_trainable" and r["checkpointing"] == checkpointing and "error" not in r]
    fits = [r["batch"] for r in runs if fits_budget(r)]
    over = [r["batch"] for r in runs if not fits_budget(r)]
    return (max(fits) if fits else None), (min(over) if over else None)


def render_report(rows: list[dict], batch: int) -> str:
    main = [r for r in rows if r["batch"] == batch and r["variant"] != "all_trainable"]
    for r in rows:
        if "tflops_per_s" in r:
            r["utilisation"] = r["tflops_per_s"] / r["matmul_tflops"]
    table = [{c: r.get(c) for c in COLUMNS} for r in rows]
    first = rows[0]
    lines = [
        f"## Training step on {first['device_name']}",
        "",
        f"{datetime.date.today()}, torch {first['torch']}, bf16 autocast, channels-last (CUDA), fused AdamW, random "
        f"weights and data; matmul rate {first['matmul_tflops']:.1f} TFLOP/s measured (bf16 8192³ on CUDA), "
        "utilisation = model TFLOP/s over it. Median of `steps` timed steps after warm-up. Command: "
        "`python benchmarks/gpu_train_step.py --out DIR` (see its --help).",
        "",
        to_markdown(table),
        "",
        "Targets:",
    ]

    def best(variant: str) -> dict | None:
        ok = [r for r in main if r["variant"] == variant and "ms" in r]
        return max(ok, key=lambda r: r["images_per_s"]) if ok else None

    full, cached, base = best("siclip"), best("siclip_cached"), best("image_last_stage")
    if full and cached:
        for r, name in ((full, "full step"), (cached, "cached step")):
            if r["peak_gib"] != r["peak_gib"]:  # NaN: no CUDA allocator to ask
                lines.append(f"- {name} at batch {batch}: peak memory not measured on {r['device']}")
                continue
            verdict = "met" if r["peak_gib"] <= TARGET_GIB else "MISSED"
            setup = ", ".join(k for k in ("reparameterize_frozen", "checkpointing") if r[k]) or "plain"
            lines.append(f"- {name} at batch {batch} (fastest setup: {setup}): {r['images_per_s']:.0f} img/s, peak "
                         f"{r['peak_gib']:.1f} GiB (target ≤ {TARGET_GIB:g} GiB) {verdict}")  # fmt: skip
    if cached and base:
        ratio = cached["images_per_s"] / base["images_per_s"]
        verdict = "met" if ratio >= 0.8 else "MISSED"
        lines.append(f"- cached step {cached['images_per_s']:.0f} img/s = {ratio:.2f}× the last-stage baseline's "
                     f"{base['images_per_s']:.0f} img/s (target ≥ 0.8×) {verdict}")  # fmt: skip
    if full and cached:
        teacher_ms = full["ms"] - cached["ms"]
        lines.append(f"- the teacher's forward costs {teacher_ms:.0f} ms of the full step's {full['ms']:.0f} ms "
                     f"({teacher_ms / full['ms']:.0%}); full step {full['images_per_s']:.0f} img/s")  # fmt: skip
    for checkpointing in (False, True):
        fits, over = largest_fitting(rows, checkpointing)
        if fits or over:
            lines.append(f"- every module trainable{' + activation checkpointing' if checkpointing else ''}: largest measured "
                         f"batch within {BUDGET_GIB:g} GiB = {fits} (next measured, over: {over})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
