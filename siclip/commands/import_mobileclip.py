"""Convert Apple's MobileCLIP-S0 checkpoint (``mobileclip_s0.pt``) into a siclip checkpoint.

    siclip import-mobileclip --model mobileclip_s0.pt --out runs/mobileclip_s0.pt

The result loads with ``load_checkpoint`` and carries its tokenizer (CLIP BPE); siclip train --teacher also reads
Apple's file directly. (The old form ``SOURCE OUT [--model NAME]`` still works for one release.)
"""

from __future__ import annotations

import argparse
import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data.tokenizer import create_tokenizer, tokenizer_spec
from siclip.models import list_models, load_mobileclip_s0, save_checkpoint
from siclip.storage import check_output

APPLE_MODELS = [m for m in list_models() if m.startswith("mobileclip")]


def build_parser() -> argparse.ArgumentParser:
    """``siclip import-mobileclip``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="FILE", help="Apple's mobileclip_s0.pt (a state dict, possibly under 'state_dict')")
    parser.add_argument("--out", metavar="FILE",
                        help="the siclip checkpoint to write (never over an existing file without --overwrite, never over --model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at --out (never implied)")
    parser.add_argument("--apple-model", default="mobileclip_s0", choices=APPLE_MODELS, metavar="NAME",
                        help=f"registered MobileCLIP configuration the weights fit: {', '.join(APPLE_MODELS)} (default: mobileclip_s0)")
    parser.add_argument("legacy", nargs="*", help=argparse.SUPPRESS)  # the old positional SOURCE OUT
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments; the old ``SOURCE OUT [--model NAME]`` read as ``--model SOURCE --out OUT [--apple-model NAME]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.legacy:
        if len(args.legacy) != 2 or args.out is not None:
            parser.error("give --model FILE --out FILE")
        if args.model is not None:  # the old --model NAME: the configuration
            if args.model not in APPLE_MODELS:
                parser.error(f"argument --apple-model: invalid choice: {args.model!r} (choose from {', '.join(APPLE_MODELS)})")
            cli.note_renamed(parser.prog, "--model NAME is now --apple-model NAME")
            args.apple_model = args.model
        cli.note_renamed(parser.prog, "SOURCE OUT are now --model SOURCE --out OUT", "form")
        args.model, args.out = args.legacy
    missing = [flag for flag, value in (("--model", args.model), ("--out", args.out)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        cli.existing_file(args.model)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --model: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check_output(args.out, kind="file", overwrite=args.overwrite, inputs=[args.model], flag="--out")
    cli.on_interrupt(f"{args.out} is written whole or not at all: {cli.NOTHING_SAVED}")
    with cli.user_input():
        model = load_mobileclip_s0(args.model, model=args.apple_model, what=args.model)
    tokenizer = create_tokenizer(model.config.text.tokenizer, context_length=model.config.text.context_length)
    save_checkpoint(model, args.out, tokenizer=tokenizer_spec(tokenizer))
    print(f"{args.model} ({args.apple_model}, tokenizer {tokenizer.name}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
