"""Write synthetic captions into WebDataset shards (CC12M → CC12M-SYN).

    python experiments/caption_shards.py data/shards --captioner mypkg.captioners:coca --batch-size 64
    python experiments/caption_shards.py data/shards --captioner ground-truth   # embedded shards only

``--captioner`` names any callable ``module:attribute`` mapping a list of (H, W, 3) uint8 images to one
list of captions per image (it may also take ``keys=``); a factory is called once if it takes no
arguments. ``ground-truth`` describes embedded-world shards from the scenes recorded in their ``.json``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data.captioners import GroundTruthCaptioner
from siclip.data.embedded import EmbeddedConfig
from siclip.data.webdataset import recaption_shards
from siclip.storage import refuse_special


def load_captioner(spec: str, num_captions: int, seed: int, world_seed: int = 0):
    if spec == "ground-truth":
        return GroundTruthCaptioner(EmbeddedConfig(seed=world_seed), num_captions=num_captions, seed=seed)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise cli.UserError(f"--captioner must be 'module:attribute' or 'ground-truth', got {spec!r}")
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


def check_shard_destination(shards: str, out_dir: Path, overwrite: bool) -> None:
    """``--out-dir`` receives one shard per input shard, by the same name: refused when it is no folder, or when it
    already holds files of those names that are not the inputs themselves (unless ``overwrite``)."""
    from siclip.data.webdataset import expand_shards

    refuse_special(out_dir, "folder", "--out-dir")  # a device, socket or link is no folder to write shards into
    if out_dir.exists() and not out_dir.is_dir():
        raise cli.UserError(f"--out-dir {out_dir} exists and is not a folder")
    with cli.user_input():
        names = [p for p in expand_shards(shards)]
    clashes = [p.name for p in names if (out_dir / p.name).exists() and (out_dir / p.name).resolve() != p.resolve()]
    if clashes and not overwrite:
        raise cli.UserError(f"--out-dir {out_dir} already holds {', '.join(clashes[:3])}{' …' if len(clashes) > 3 else ''}, which captioning "
                            "would replace: choose another --out-dir, or pass --overwrite")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a shard directory, glob, brace range or single .tar")
    parser.add_argument("--captioner", default="ground-truth")
    parser.add_argument("--num-captions", type=cli.positive_int, default=5, help="for the ground-truth captioner")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the embedded world (ground-truth)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the caption wording (ground-truth)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64)
    parser.add_argument("--mode", choices=["replace", "append"], default="replace")
    parser.add_argument("--out-dir", type=Path, help="write new shards here instead of rewriting in place")
    parser.add_argument("--overwrite", action="store_true", help="with --out-dir: replace shards of the same names already there (never implied)")
    args = parser.parse_args(argv)
    if args.out_dir is not None:
        check_shard_destination(args.shards, args.out_dir, args.overwrite)
    done = "every shard is rewritten whole or not at all, and the ones done keep their new captions"
    cli.on_interrupt(f"{done}: run the same command again to caption them all" if args.mode == "replace" or args.out_dir else
                     f"{done} (appended once): run again on the shards not done yet, or they get the captions twice")  # fmt: skip
    captioner = load_captioner(args.captioner, args.num_captions, args.seed, args.world_seed)
    with cli.user_input():
        stats = recaption_shards(args.shards, captioner, out_dir=args.out_dir, batch_size=args.batch_size, mode=args.mode)
    print(f"captioned {stats['captioned']} images, skipped {stats['skipped']} undecodable ones")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
