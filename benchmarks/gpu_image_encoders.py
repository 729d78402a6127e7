"""SiCLIP-S0 against MobileCLIP-S0 image encoders on a CUDA GPU, bf16: training and inference throughput (issue 12).

    python benchmarks/gpu_image_encoders.py --out benchmarks/results/gpu_image_encoders.md      # on a CUDA GPU
    python benchmarks/gpu_image_encoders.py --device cpu --batch 4 --steps 2 --warmup 1 --tiny  # smoke test, any machine

- training: the train-time encoders (every parameter trainable), forward + backward of a fixed upstream
  gradient under bf16 autocast, channels-last;
- inference: the reparameterised encoders, forward under ``inference_mode`` and bf16 autocast.

Both encoders of a mode are timed round-robin in one run (median of ``--steps``), eager and, with
``--compile``, compiled. Images per second and peak memory per encoder; the ratio is SiCLIP / MobileCLIP.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from siclip.analysis.benchmark import device_name, forward_backward_step, time_interleaved, to_markdown
from siclip.models import create_model, reparameterize_model


def encoders(names: tuple[str, str], device: torch.device, *, fused: bool) -> dict[str, torch.nn.Module]:
    out = {}
    for name in names:
        visual = create_model(name).visual.to(device)
        out[name] = reparameterize_model(visual.eval()).requires_grad_(False) if fused else visual.train()
    return out


def inference_step(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """One forward of ``module`` on ``x`` under ``inference_mode`` and autocast to ``dtype``."""

    def step() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype):
            module(x)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
    parser.add_argument("--tiny", action="store_true", help="mobileclip_tiny / siclip_tiny (smoke test)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_image_encoders.py needs a CUDA device (or --device cpu for a smoke test).", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    names = ("mobileclip_tiny", "siclip_tiny") if args.tiny else ("mobileclip_s0", "siclip_s0")
    size = create_model(names[0]).config.image.image_size
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = torch.rand(args.batch, 3, size, size, device=device).contiguous(memory_format=layout)
    rows = []
    for compiled in [False, True] if args.compile else [False]:
        for mode in ("training", "inference"):
            models = {n: m.to(memory_format=layout) for n, m in encoders(names, device, fused=mode == "inference").items()}
            runs = {n: torch.compile(m) if compiled else m for n, m in models.items()}
            step = forward_backward_step if mode == "training" else inference_step
            steps = {n: step(run, images, torch.bfloat16) for n, run in runs.items()}
            results = time_interleaved(steps, device, rounds=args.steps, warmup=args.warmup)
            rate = {n: args.batch / (r["ms"] / 1e3) for n, r in results.items()}
            row = {"mode": mode, "compiled": compiled}
            for n in names:
                row |= {f"{n} img/s": rate[n], f"{n} GiB": results[n]["peak_gib"]}
            rows.append(row | {"ratio": rate[names[1]] / rate[names[0]]})
            del models, runs, steps
    lines = [
        f"## Image encoders on {device_name(device)}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, bf16 autocast, batch {args.batch} at {size} px, "
        f"median of {args.steps} steps after {args.warmup} warm-up; command: `python {' '.join(sys.argv)}`",
        "",
        to_markdown(rows),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
