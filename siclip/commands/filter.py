"""Keep the best pairs of a dataset by a CLIP's image–text cosine (DataComp's CLIP-score filter).

    siclip filter --model runs/demo/model.pt --data embedded --caption-noise 0.5 --num-train 4000 --keep-fraction 0.5 --out runs/kept
    siclip filter --model hf:clip-vit-b32 --data pairs.csv --threshold 0.28 --out runs/pairs_kept
    siclip filter --model open_clip:ViT-B-32:weights.pt --data "shards/{000..009}.tar" --keep-fraction 0.3 --out runs/shards_kept
    siclip train --data embedded --caption-noise 0.5 --num-train 4000 --subset runs/kept/kept_indices.json ...

Every pair's raw caption is scored against its image, each through the model's own tokenizer and preprocessing
(siclip.data.quality). --out receives:
  scores.csv          index, key, clip_score (empty: not scored, with the reason), kept, noisy (where the data says)
  kept_indices.json   the kept samples' indices (what `siclip train --subset` reads)
  kept.csv / kept.tsv the kept rows of a CSV/TSV with every original column and clip_score (image paths re-rooted)
  shards/             the kept samples of shards or of the embedded world as WebDataset shards, clip_score in each .json
  filter.json         counts, the rule, the lowest kept score and, on data that flags its noisy pairs (the noisy
                      embedded world, shards written from it), the filter's precision and recall as a noise detector
  cache/              the scores in chunks, written atomically: --resume continues an interrupted scoring, and reselects
                      (another --keep-fraction or --threshold) without scoring again
An --out holding a filter run is refused unless --resume or --overwrite. A bad argument or input file ends in one
line `siclip filter: error: …` (status 2) before the model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.commands.train import data_spec
from siclip.data import EmbeddedConfig, open_source
from siclip.data.quality import MANIFEST, noise_report, score_pairs, select_pairs, write_csv_subset, write_indices
from siclip.data.sources import SubsetSource
from siclip.data.tabular import is_table
from siclip.interop import check_model_spec
from siclip.storage import OutputRefused, check_output, write_text_atomic

OUTPUTS = ("scores.csv", "kept_indices.json", "kept.csv", "kept.tsv", "filter.json", "shards", "cache")


def build_parser() -> argparse.ArgumentParser:
    """``siclip filter``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=cli.checked(check_model_spec),
                        help="the scoring CLIP, any model spec: a siclip checkpoint, Apple's mobileclip_s0.pt, hf:DIR, "
                        "open_clip:ARCH:FILE or an exported directory")  # fmt: skip
    parser.add_argument("--data", required=True, type=data_spec, help="'embedded', a .csv/.tsv (filepath,title) or shards")
    parser.add_argument("--out", required=True, type=Path, help="output directory (see above)")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--keep-fraction", type=cli.fraction, help="keep the best round(F·n) of the n scored pairs")
    rule.add_argument("--threshold", type=cli.finite_float, help="keep every pair whose cosine is at least T")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64, help="pairs per forward pass (64)")
    parser.add_argument("--chunk-size", type=cli.positive_int, default=512, help="pairs per cached chunk of scores (512)")
    parser.add_argument("--device", type=cli.device, default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda:1', … (auto)")
    parser.add_argument("--num-train", type=cli.positive_int, default=2000, help="embedded world: training pairs (2000, as siclip train)")
    parser.add_argument("--world-seed", type=cli.non_negative_int, default=0, metavar="N", help="embedded world: its seed (default: 0)")
    cli.add_renamed(parser, "--seed", new="--world-seed", dest="world_seed", type=cli.non_negative_int)
    parser.add_argument("--caption-noise", type=cli.fraction, default=0.0, help="embedded world: fraction of pairs with another scene's captions (0)")
    parser.add_argument("--image-size", type=cli.positive_int, default=64, help="embedded world: rendered image size of the written shards (64)")
    parser.add_argument("--image-key", default="filepath", help="CSV image path column (filepath)")
    parser.add_argument("--caption-key", default="title", help="CSV caption column (title)")
    parser.add_argument("--samples-per-shard", type=cli.positive_int, default=1000, help="samples per written shard (1000)")
    parser.add_argument("--resume", action="store_true", help="continue the filter run in --out (its cached scores)")
    parser.add_argument("--overwrite", action="store_true", help="delete the filter run in --out and start over")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments: each refusal one line, before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the filter run in --out and --overwrite deletes it: choose one")
    try:  # a device, a file, the folder it runs in, or a folder holding its inputs: refused (it writes only OUTPUTS there)
        spec_path = args.model.split(":")[-1] if ":" in args.model else args.model
        check_output(args.out, kind="folder", overwrite=True, inputs=[None if args.data == "embedded" else args.data, spec_path])
    except OutputRefused as err:
        parser.error(str(err))
    if args.data != "embedded" and args.caption_noise:
        parser.error(f"--caption-noise misaligns pairs of the embedded world; --data is {args.data!r}")
    held = [name for name in OUTPUTS if (args.out / name).exists()]
    if held and not (args.resume or args.overwrite):
        parser.error(f"{args.out} already holds a filter run ({', '.join(held)}): pass --resume to continue it or --overwrite to start over")
    if args.resume and held and not (args.out / "cache" / MANIFEST).is_file():
        parser.error(f"{args.out} holds filter outputs but no score cache to continue: pass --overwrite to start over")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from siclip.eval.run import image_encoder, text_encoder
    from siclip.interop import load_clip
    from siclip.train.malloc import keep_freed_memory

    keep_freed_memory()
    cli.on_interrupt(f"the scores computed so far are kept in {args.out / 'cache'}: continue with --resume")
    with cli.user_input():  # the data and the device are checked before the model loads
        world = EmbeddedConfig(seed=args.world_seed, num_train=args.num_train, image_size=args.image_size, caption_noise=args.caption_noise)
        source = open_source(args.data, world, image_key=args.image_key, caption_key=args.caption_key)
        if args.overwrite:
            for name in OUTPUTS:
                path = args.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        loaded = load_clip(args.model)
        model = loaded.model.to(cli.resolved_device(args.device)).eval() if hasattr(loaded.model, "to") else loaded.model
        identity = {"model": args.model, "data": args.data, "caption": "raw"}
        if args.data == "embedded":
            identity["world"] = {"seed": args.world_seed, "num_train": args.num_train, "caption_noise": args.caption_noise}
        pairs = score_pairs(source, image_encoder(model), text_encoder(model, loaded.tokenizer), args.out / "cache", identity=identity,
                            chunk_size=args.chunk_size, batch_size=args.batch_size)  # fmt: skip
    kept = select_pairs(pairs.scores, keep_fraction=args.keep_fraction, threshold=args.threshold)
    write_outputs(args, source, pairs, kept)
    return 0


def write_outputs(args: argparse.Namespace, source, pairs, kept) -> None:
    """scores.csv, kept_indices.json, the kept subset (CSV or shards) and filter.json; prints the summary."""
    import pandas as pd

    from siclip.data.webdataset import write_shards

    out = args.out
    flags = pairs.noisy if any(f is not None for f in pairs.noisy) else None
    table = pd.DataFrame({"index": range(len(pairs.keys)), "key": pairs.keys, "clip_score": pairs.scores,
                          "kept": False, "not_scored": pairs.reasons})  # fmt: skip
    table.loc[kept, "kept"] = True
    if flags is not None:
        table["noisy"] = flags
    write_text_atomic(table.to_csv(index=False), out / "scores.csv")
    write_indices(kept, out / "kept_indices.json")
    if is_table(args.data):
        subset = write_csv_subset(source, kept, pairs.scores, out / f"kept{Path(args.data).suffix.lower()}")
    else:
        shards = out / "shards"
        shutil.rmtree(shards, ignore_errors=True)  # a reselection replaces the shards of an earlier one
        scored = SubsetSource(source, kept, [{"clip_score": float(pairs.scores[i])} for i in kept])
        write_shards(scored, shards, samples_per_shard=args.samples_per_shard)
        subset = shards
    scored = int(pairs.scored.sum())
    summary = {"model": args.model, "data": args.data, "pairs": len(pairs.keys), "scored": scored, "kept": int(len(kept)),
               "rule": {"keep_fraction": args.keep_fraction} if args.threshold is None else {"threshold": args.threshold},
               "lowest_kept_score": float(pairs.scores[kept].min()) if len(kept) else math.nan, "subset": str(subset),
               "noise": noise_report(pairs, kept)}  # fmt: skip
    write_text_atomic(json.dumps(summary, indent=1), out / "filter.json")
    print(f"scored {scored} of {len(pairs.keys)} pairs with {args.model}; kept {len(kept)} "
          f"(lowest kept score {summary['lowest_kept_score']:.4f}) in {subset}")  # fmt: skip
    if summary["noise"] is not None:
        noise = summary["noise"]
        print(f"noisy pairs: {noise['noise_before']:.1%} before, {noise['noise_after']:.1%} after; of the {noise['dropped']} dropped, "
              f"{noise['precision']:.1%} were noisy (precision), {noise['recall']:.1%} of the noisy pairs dropped (recall)")  # fmt: skip
    print(f"scores.csv, kept_indices.json and filter.json in {out}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
