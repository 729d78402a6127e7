"""Data pipeline throughput: embedded-world generation, and decode + augment from shards.

    python benchmarks/data_throughput.py                  # CPU here; samples/s per worker
    python benchmarks/data_throughput.py --workers 0 2 14 --generate 50000
    python benchmarks/data_throughput.py --sizes 256 --workers 0 16 --samples 16384 --writers 16 --batch-size 256

The loader must outpace the training step: compare samples/s per worker × workers with the step's
images/s (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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


def write_part(out_dir: Path, part: int, count: int, size: int, image_format: str) -> list[Path]:
    """One writer's shards: its own slice of worlds (seed = part), so writers never share a file."""
    source = EmbeddedSource(EmbeddedConfig(num_train=count, image_size=size, seed=part), "train")
    return write_shards(source, out_dir, samples_per_shard=512, image_format=image_format, prefix=f"part{part:02d}", progress=False)


def write_shard_set(out_dir: Path, samples: int, size: int, image_format: str, writers: int) -> list[Path]:
    """``samples`` embedded samples as shards, written by ``writers`` processes."""
    counts = [samples // writers + (i < samples % writers) for i in range(writers)]
    if writers == 1:
        return write_part(out_dir, 0, samples, size, image_format)
    with ProcessPoolExecutor(writers) as pool:
        parts = pool.map(write_part, [out_dir] * writers, range(writers), counts, [size] * writers, [image_format] * writers)
        return sorted(p for part in parts for p in part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1536, help="samples per shard set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--generate", type=int, default=50_000, help="embedded samples to generate for the rate")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--writers", type=int, default=1, help="processes writing the shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--outputs", nargs="+", default=["float32", "uint8"], choices=["float32", "uint8"],
                        help="what workers hand over: normalised float32, or uint8 crops normalised on the device")
    args = parser.parse_args()
    rows = [generation_rate(args.generate, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shards = write_shard_set(Path(tmp) / f"px{size}", args.samples, size, args.format, args.writers)
            for output, workers in ((o, w) for o in args.outputs for w in args.workers):
                config = AugmentConfig(size, normalize=output == "float32")
                dataset = ImageTextDataset(ShardSource(shards), create_tokenizer(), augment_config=config)
                # A DataLoader worker runs torch single-threaded; so does the main process here, so
                # that "0 workers" measures what one worker does.
                threads = torch.get_num_threads()
                torch.set_num_threads(1 if workers == 0 else threads)
                loader = ImageTextLoader(dataset, batch_size=args.batch_size, num_workers=workers)
                result = loader_throughput(loader)
                torch.set_num_threads(threads)
                per_worker = result["samples_per_s"] / max(1, workers)
                rows.append({"what": f"shards ({args.format}) → decode + crop + tokenise → {output}, {workers} workers", "px": size,
                             "seconds": result["seconds"], "samples_per_s": result["samples_per_s"], "per_worker": per_worker})  # fmt: skip
    for row in rows:
        row.setdefault("per_worker", row["samples_per_s"])
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
