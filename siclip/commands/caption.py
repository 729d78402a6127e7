"""Write synthetic captions into WebDataset shards or a CSV/TSV table (CC12M → CC12M-SYN), resumably.

    siclip caption --data data/shards --captioner hf:models/blip-base --num-captions 5 --out data/shards_syn
    siclip caption --data data/shards --captioner open_clip:coca_ViT-L-14:coca_vit_l14.pt --temperature 0 --num-captions 1
    siclip caption --data train.csv --captioner hf:models/git-base --out train_syn.csv   # adds a synthetic_captions column
    siclip caption --data data/shards --captioner ground-truth                            # embedded-world shards only
    siclip caption --data data/shards --captioner mypkg.captioners:coca --batch-size 64   # any callable of yours

--captioner:
  hf:DIR               any transformers image-to-text model saved in DIR with its processor (BLIP, GIT, BLIP-2, …);
                       read with local_files_only and trust_remote_code off (nothing downloaded or run)
  open_clip:ARCH:FILE  open_clip's CoCa: a coca_* architecture (or model-config JSON) and its weights file
  ground-truth         embedded-world shards: exact captions from the scenes recorded in their .json
  module:attribute     any callable mapping a list of (H, W, 3) uint8 images to one list of captions per image (it may
                       also take keys= and seed=); a factory is called once if it takes no arguments
Sampling (hf:, open_clip:): --num-captions per image, --temperature (0: greedy, one caption), --top-p, --max-new-tokens,
--seed (each batch's seed derives from it, the shard and the batch: a shard captioned again gets the same captions).

Shards are rewritten in place, or written to --out (a folder); a table goes to --out (a new .csv/.tsv: the same rows
and a column, --column, holding each row's captions as a JSON list: siclip train --synthetic-keys COLUMN). Each shard (or
chunk of rows) is written whole and recorded in captions.json beside the output with the captioner and its settings: run
the same command again after a stop and it continues; a different captioner or setting is refused, and so are shards
or a table at --out that this captioning did not write (--overwrite starts over, replacing what is there; never
implied). Every argument and the captioner are checked before any image is read; a bad one ends in one line, status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data.captioners import GroundTruthCaptioner
from siclip.data.captioning import MANIFEST, CaptionSettings, caption_table, recaption_shards
from siclip.data.embedded import EmbeddedConfig
from siclip.data.tabular import is_table
from siclip.storage import check_output, refuse_special
from siclip.wording import count


def load_captioner(spec: str, settings: CaptionSettings, world_seed: int = 0, device: str = "auto"):
    """The captioner ``spec`` names (see the module docstring); a bad spec is a :class:`cli.UserError` naming it."""
    from siclip.interop.captioners import is_captioner_spec, load_captioner as load_model_captioner

    if spec == "ground-truth":
        return GroundTruthCaptioner(EmbeddedConfig(seed=world_seed), num_captions=settings.num_captions, seed=settings.seed)
    if is_captioner_spec(spec):
        with cli.user_input():
            return load_model_captioner(spec, settings, device)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise cli.UserError(f"--captioner must be hf:DIR, open_clip:ARCH:FILE, 'ground-truth' or 'module:attribute', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise cli.UserError(f"--captioner {spec}: no module {err.name!r} on the Python path") from None
    if not hasattr(module, attribute):
        raise cli.UserError(f"--captioner {spec}: module {module_name} has no attribute {attribute!r}")
    captioner = getattr(module, attribute)
    if inspect.isclass(captioner) or (callable(captioner) and not inspect.signature(captioner).parameters):
        captioner = captioner()
    return captioner


def check_shard_destination(data: str, out_dir: Path, record: dict, overwrite: bool) -> None:
    """``--out`` receives one shard per input shard, by the same name: refused when it is no folder, or when it
    already holds files of those names that this captioning did not write (neither the inputs themselves nor recorded
    in its captions.json), unless ``overwrite``, which starts over, replacing what is there."""
    from siclip.data.captioning import shards_not_ours

    refuse_special(out_dir, "folder", "--out")  # a device, socket or link is no folder to write shards into
    if out_dir.exists() and not out_dir.is_dir():
        raise cli.UserError(f"--out {out_dir} exists and is not a folder")
    with cli.user_input():
        clashes = shards_not_ours(data, out_dir, record, overwrite=overwrite)
    if clashes:
        raise cli.UserError(f"--out {out_dir} already holds {', '.join(clashes[:3])}{' …' if len(clashes) > 3 else ''}, which captioning "
                            "would replace: choose another --out, or pass --overwrite to start over, replacing them")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", metavar="SRC", help="shards (a directory, glob, brace range or .tar) or a .csv/.tsv table (required)")
    parser.add_argument("legacy_data", nargs="?", help=argparse.SUPPRESS)  # the old positional SRC
    parser.add_argument("--captioner", default="ground-truth", metavar="SPEC",
                        help="hf:DIR, open_clip:ARCH:FILE, ground-truth or module:attribute (default: ground-truth)")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="shards: a folder for the captioned shards (default: rewrite them in place); a table: the new table (required)")
    cli.add_renamed(parser, "--out-dir", new="--out", dest="out", type=Path)
    parser.add_argument("--num-captions", type=cli.positive_int, default=5, metavar="N", help="captions per image (default: 5)")
    parser.add_argument("--temperature", type=cli.non_negative_float, default=1.0, metavar="T",
                        help="sampling temperature; 0: greedy decoding, one caption per image (default: 1.0)")
    parser.add_argument("--top-p", type=cli.positive_float, default=0.9, metavar="P",
                        help="nucleus sampling: draw from the most probable tokens whose probability reaches P, at most 1 (default: 0.9)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=30, metavar="N", help="longest caption in tokens (default: 30)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sampling and of ground-truth wording (default: 0)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64, metavar="N", help="images per captioner call (default: 64)")
    parser.add_argument("--mode", choices=["replace", "append"], default="replace",
                        help="replace the synthetic captions there, or add after them (default: replace)")
    parser.add_argument("--device", type=cli.device, default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--world-seed", type=int, default=0, metavar="N", help="seed of the embedded world (ground-truth) (default: 0)")
    parser.add_argument("--image-key", default="filepath", metavar="COLUMN", help="a table's image path column (default: filepath)")
    parser.add_argument("--column", default="synthetic_captions", metavar="NAME",
                        help="a table's column for the captions, a JSON list per row (default: synthetic_captions)")
    parser.add_argument("--chunk-rows", type=cli.positive_int, default=1000, metavar="N",
                        help="a table's rows per resumable chunk (default: 1000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over, replacing what is there: shards or a table at --out this captioning did not write, "
                             "and what an earlier run with other settings recorded (never implied; default: off)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.legacy_data is not None:
        if args.data is not None:
            parser.error("give the data once: --data SRC")
        cli.note_renamed(parser.prog, "the positional SRC is now --data SRC", "form")
        args.data = args.legacy_data
    if args.data is None:
        parser.error("the following arguments are required: --data")
    table = is_table(args.data)
    if table and args.out is None:
        parser.error(f"--out: a table is not rewritten in place; name the captioned table to write (e.g. {Path(args.data).stem}_captioned.csv)")
    if args.top_p > 1:
        parser.error(f"--top-p must be at most 1, got {args.top_p:g}")
    try:
        settings = CaptionSettings(num_captions=args.num_captions, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    if table and not Path(args.data).is_file():
        parser.error(f"table not found: {args.data}")
    record = {"captioner": args.captioner, "mode": args.mode, **settings.to_dict(),
              **({"world_seed": args.world_seed} if args.captioner == "ground-truth" else {})}  # fmt: skip
    if table:
        check_output(args.out, kind="file", overwrite=args.overwrite, inputs=[args.data])
    elif args.out is not None:
        check_shard_destination(args.data, args.out, record, args.overwrite)
    where = args.out.with_name(args.out.name + ".parts") if table else args.out or "the shards' folder"
    cli.on_interrupt(f"each finished {'chunk' if table else 'shard'} is recorded in {MANIFEST} in {where}: run the same command again "
                     "to continue")  # fmt: skip
    captioner = load_captioner(args.captioner, settings, args.world_seed, args.device)
    with cli.user_input():
        if table:
            stats = caption_table(args.data, captioner, out=args.out, image_key=args.image_key, column=args.column, mode=args.mode,
                                  chunk_rows=args.chunk_rows, batch_size=args.batch_size, record=record, overwrite=args.overwrite,
                                  seed=args.seed)  # fmt: skip
        else:
            stats = recaption_shards(args.data, captioner, out_dir=args.out, batch_size=args.batch_size, mode=args.mode, record=record,
                                     overwrite=args.overwrite, seed=args.seed)  # fmt: skip
    unit = "chunk(s)" if table else "shard(s)"
    print(f"captioned {count(stats['captioned'], 'image')}, skipped {stats['skipped']} undecodable ones"
          + (f", dropped {stats['empty']} empty captions" if stats["empty"] else "")
          + (f"; {stats['units_done_before']} {unit} were done before" if stats["units_done_before"] else ""))  # fmt: skip
    if table:
        print(f"wrote {args.out}: train with siclip train --data {args.out} --synthetic-keys {args.column}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
