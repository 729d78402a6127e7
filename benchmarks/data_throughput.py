"""Data pipeline throughput: embedded-world generation, and decode + augment from shards.

    python benchmarks/data_throughput.py                  # CPU here; samples/s per worker
    python benchmarks/data_throughput.py --workers 0 2 14 --generate 50000

The loader must outpace the training step: compare samples/s per worker × workers with the step's
images/s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from siclip.analysis.benchmark import loader_throughput, to_markdown
from siclip.data import AugmentConfig, EmbeddedConfig, EmbeddedSource, ImageTextDataset, ImageTextLoader, ShardSource
from siclip.data import create_tokenizer, write_shards


def generation_rate(count: int, image_size: int) -> dict:
    source = EmbeddedSource(EmbeddedConfig(num_train=count, image_size=image_size), "train")
    t0 = time.perf_counter()
    for i in range(count):
        source.load(i)
    seconds = time.perf_counter() - t0
    return {"what": f"generate {count:,} samples (image + 6 captions)", "px": image_size, "seconds": seconds, "samples_per_s": count / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1536, help="samples per shard set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--generate", type=int, default=50_000, help="embedded samples to generate for the rate")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    args = parser.parse_args()
    rows = [generation_rate(args.generate, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shards = write_shards(
                EmbeddedSource(EmbeddedConfig(num_train=args.samples, image_size=size), "train"),
                Path(tmp) / f"px{size}", samples_per_shard=512, image_format=args.format, progress=False,
            )  # fmt: skip
            dataset = ImageTextDataset(ShardSource(shards), create_tokenizer(), augment_config=AugmentConfig(size))
            for workers in args.workers:
                # A DataLoader worker runs torch single-threaded; so does the main process here, so
                # that "0 workers" measures what one worker does.
                threads = torch.get_num_threads()
                torch.set_num_threads(1 if workers == 0 else threads)
                loader = ImageTextLoader(dataset, batch_size=64, num_workers=workers)
                result = loader_throughput(loader)
                torch.set_num_threads(threads)
                per_worker = result["samples_per_s"] / max(1, workers)
                rows.append({"what": f"shards ({args.format}) → decode + crop + tokenise, {workers} workers", "px": size,
                             "seconds": result["seconds"], "samples_per_s": result["samples_per_s"], "per_worker": per_worker})  # fmt: skip
    for row in rows:
        row.setdefault("per_worker", row["samples_per_s"])
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
