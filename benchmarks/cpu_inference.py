"""CPU inference: SiCLIP against MobileCLIP-S0 encoders, reparameterised, batch 32, 2 threads.

    python benchmarks/cpu_inference.py [--threads 2] [--batch 32] [--rounds 5]

The paper reports 39.5 (SiCLIP) against 38.2 (MobileCLIP-S0) images/s on a Xeon. Both models are
timed round-robin in one run; only their ratio carries over to other machines.
"""

from __future__ import annotations

import argparse

import torch

from siclip.analysis.benchmark import device_name, encoder_throughput, to_markdown
from siclip.models import create_model, reparameterize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: reparameterize_model(create_model(name).eval()) for name in ("mobileclip_s0", "siclip_s0")}
    images = torch.rand(args.batch, 3, 256, 256)
    ids = torch.randint(1, 49000, (args.batch, 77))
    ids[:, 20] = 49407
    image_rate = encoder_throughput({n: m.encode_image for n, m in models.items()}, images, rounds=args.rounds)
    text_rate = encoder_throughput({n: m.encode_text for n, m in models.items()}, ids, rounds=args.rounds)
    rows = [
        {"encoder": "image (256 px)", "mobileclip_s0 /s": image_rate["mobileclip_s0"], "siclip_s0 /s": image_rate["siclip_s0"],
         "ratio": image_rate["siclip_s0"] / image_rate["mobileclip_s0"]},
        {"encoder": "text (77 tokens)", "mobileclip_s0 /s": text_rate["mobileclip_s0"], "siclip_s0 /s": text_rate["siclip_s0"],
         "ratio": text_rate["siclip_s0"] / text_rate["mobileclip_s0"]},
    ]  # fmt: skip
    print(f"{device_name('cpu')}, torch {torch.__version__}, batch {args.batch}, reparameterised, {args.rounds} rounds\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
