"""The real path on one GPU: SiCLIP-S0 inheriting from a MobileCLIP-S0 file in Apple's layout, trained on
shards with train.py (bf16 on CUDA), evaluated at the end on a zero-shot folder and a retrieval CSV.

    python benchmarks/real_path.py OUT                 # CUDA: siclip_s0, ~300 steps
    python benchmarks/real_path.py OUT --smoke         # CPU, tiny models, two steps (run in CI)

With no ``mobileclip_s0.pt`` at hand (``--apple-file``), a random-weight file in Apple's exact layout
is written first. The data are the embedded world written as user files: shards for training, a
class-per-subfolder zero-shot folder with a class names file, and a retrieval CSV with five captions
per image, so every reader and the device handling of every evaluation are exercised.
Writes OUT/run (train.py's outputs, eval/*.json), OUT/real_path.json and prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from siclip.data import EmbeddedConfig, EmbeddedSource, encode_image, retrieval_set, write_shards, zero_shot_prompts
from siclip.models import create_model, to_apple_state_dict

ROOT = Path(__file__).resolve().parent.parent


def write_user_files(out: Path, image_size: int, train: int, per_class: int, retrieval_images: int) -> dict[str, Path]:
    """Shards, a zero-shot folder + class names, a retrieval CSV: the embedded world in the user's formats."""
    world = EmbeddedConfig(seed=1, image_size=image_size, num_train=train, num_test=retrieval_images, zero_shot_per_class=per_class)
    write_shards(EmbeddedSource(world, "train"), out / "shards", samples_per_shard=1000, progress=False)
    zeroshot = EmbeddedSource(world, "zeroshot")
    classnames, templates = zero_shot_prompts()
    for i in range(len(zeroshot)):
        folder = out / "zeroshot" / f"{zeroshot.label(i):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(encode_image(zeroshot.load(i).image))
    (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (out / "templates.txt").write_text("\n".join(templates) + "\n")
    source, captions = retrieval_set(world, "test")
    (out / "retrieval").mkdir(exist_ok=True)
    with open(out / "retrieval.csv", "w", newline="") as f:  # the csv module quotes captions with commas
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(len(source)):
            (out / "retrieval" / f"{i:05d}.png").write_bytes(encode_image(source.load(i).image))
            writer.writerows([f"retrieval/{i:05d}.png", caption] for caption in captions[i])
    return {"shards": out / "shards", "zeroshot": out / "zeroshot", "classnames": out / "classnames.txt",
            "templates": out / "templates.txt", "retrieval": out / "retrieval.csv"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, two steps")
    parser.add_argument("--apple-file", help="Apple's mobileclip_s0.pt; a random-weight file in its layout otherwise")
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_model, student = ("mobileclip_tiny", "siclip_tiny") if args.smoke else ("mobileclip_s0", "siclip_s0")
    samples, batch, epochs, workers = (32, 16, 1, 0) if args.smoke else (args.train_samples, args.batch_size, args.epochs, args.workers)
    apple = Path(args.apple_file) if args.apple_file else out / f"{teacher_model}_apple_layout.pt"
    if not args.apple_file:
        torch.manual_seed(0)
        torch.save(to_apple_state_dict(create_model(teacher_model)), apple)
    image_size = create_model(teacher_model).config.image.image_size if args.smoke else 256
    started = time.perf_counter()
    files = write_user_files(out / "data", image_size, samples, per_class=1 if args.smoke else 5, retrieval_images=16 if args.smoke else 500)
    written = time.perf_counter() - started
    command = [sys.executable, str(ROOT / "experiments/train.py"), "--model", student, "--teacher", str(apple), "--apple-model", teacher_model,
               "--wikd", "--data", str(files["shards"]), "--epochs", str(epochs), "--batch-size", str(batch), "--workers", str(workers),
               "--out", str(out / "run"), "--zeroshot", str(files["zeroshot"]), "--classnames", str(files["classnames"]),
               "--templates", str(files["templates"]), "--retrieval", str(files["retrieval"])]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    trained = time.perf_counter() - started
    summary = json.loads((out / "run" / "summary.json").read_text())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "student": student, "teacher": f"{teacher_model} (Apple layout: {apple.name})",
              "steps": summary["steps"], "batch_size": batch, "precision": "bf16 autocast" if torch.cuda.is_available() else "float32",
              "seconds_writing_data": round(written, 1), "seconds_train_and_eval": round(trained, 1),
              "final_loss": summary["final_loss"], "eval": summary.get("eval", {})}  # fmt: skip
    (out / "real_path.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
