"""A transformers model you hold, converted to SAS-P: its speed against the original on the CPU (issue 22).

    python benchmarks/convert_speed.py [--threads 2] [--batch 8] [--rounds 40]
    python benchmarks/convert_speed.py --smoke          # a tiny tower, a few rounds (the test suite runs this)

The model is transformers' ``CLIPVisionModel`` with ViT-B/32's configuration (12 layers of width 768, 12 heads, MLP
3072, 224 px in patches of 32: 50 tokens), GELU, random weights, float32; the converted one is the same model
after ``convert_to_sasp`` (every layer SAS-P: W_V and W_P dropped, attention and MLP in parallel). Forward (inference
mode) and forward + backward (of a fixed random gradient on the pooled output) are timed round-robin in one run;
each speedup is the geometric mean of per-round ratios with a 95 % bootstrap interval, and a target counts as met
when the whole interval clears it. The FLOP ratio (PyTorch's counter, every matrix product and attention) bounds
what the conversion can give.
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch
import transformers

from siclip.analysis.benchmark import device_name, paired_speedup, time_interleaved, to_markdown
from siclip.analysis.flops import module_flops
from siclip.blocks import convert_to_sasp
from siclip.train.malloc import keep_freed_memory

VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32,
               hidden_act="gelu")  # fmt: skip
SMOKE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu")
TARGETS = {"forward": 1.10, "forward + backward": 1.08}


def models(config: dict) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    original = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**config)).eval()
    converted, _ = convert_to_sasp(copy.deepcopy(original))
    return {"original": original, "converted": converted.eval()}


def steps(model: torch.nn.Module, pixels: torch.Tensor, upstream: torch.Tensor) -> dict:
    def forward():
        with torch.inference_mode():
            return model(pixel_values=pixels).pooler_output

    def forward_backward():
        out = model(pixel_values=pixels).pooler_output
        out.backward(upstream)
        for p in model.parameters():
            p.grad = None

    return {"forward": forward, "forward + backward": forward_backward}


def compare(config: dict, batch: int, rounds: int) -> list[dict]:
    pair = models(config)
    pixels = torch.randn(batch, 3, config["image_size"], config["image_size"])
    upstream = torch.randn(batch, config["hidden_size"])
    flops = {name: module_flops(m, {"pixel_values": pixels})[0] for name, m in pair.items()}
    rows = []
    for mode in TARGETS:
        timed = time_interleaved({name: steps(m, pixels, upstream)[mode] for name, m in pair.items()}, torch.device("cpu"), rounds=rounds)
        speedup = paired_speedup(timed["original"]["times_ms"], timed["converted"]["times_ms"])
        target = TARGETS[mode]
        rows.append({"mode": mode, "original ms": timed["original"]["ms"], "converted ms": timed["converted"]["ms"],
                     "speedup": f"{speedup.mean:.3f}× [{speedup.low:.3f}, {speedup.high:.3f}]",
                     "FLOP bound": f"{flops['original'] / flops['converted']:.3f}×", "target": f"≥ {target}×",
                     "met": "yes" if speedup.low >= target else ("point estimate only" if speedup.mean >= target else "NO")})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="a tiny tower and 3 rounds: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch < 1 or args.rounds < 2:
        parser.error("--threads and --batch must be ≥ 1, --rounds ≥ 2")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    config, rounds = (SMOKE, 3) if args.smoke else (VIT_B32, args.rounds)
    print(f"{datetime.date.today()}, {device_name('cpu')}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, batch {args.batch}, {rounds} rounds, {'smoke' if args.smoke else 'ViT-B/32'} vision tower, float32\n")  # fmt: skip
    print(to_markdown(compare(config, args.batch, rounds)))


if __name__ == "__main__":
    main()
