"""Convert Apple's MobileCLIP-S0 checkpoint (``mobileclip_s0.pt``) into a siclip checkpoint.

    python experiments/import_mobileclip.py mobileclip_s0.pt runs/mobileclip_s0.pt

The result loads with ``load_checkpoint`` and carries its tokenizer (CLIP BPE); ``train.py --teacher``
also reads Apple's file directly.
"""

from __future__ import annotations

import argparse
import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data.tokenizer import create_tokenizer, tokenizer_spec
from siclip.models import list_models, load_mobileclip_s0, save_checkpoint
from siclip.storage import check_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=cli.existing_file, help="Apple's mobileclip_s0.pt (a state dict, possibly under 'state_dict')")
    parser.add_argument("out", help="siclip checkpoint to write (never over an existing file without --overwrite, never over the source)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at OUT (never implied)")
    parser.add_argument("--model", default="mobileclip_s0", choices=[m for m in list_models() if m.startswith("mobileclip")],
                        help="registered MobileCLIP config the weights fit")  # fmt: skip
    args = parser.parse_args(argv)
    check_output(args.out, kind="file", overwrite=args.overwrite, inputs=[args.source], flag="OUT")
    cli.on_interrupt(f"{args.out} is written whole or not at all: {cli.NOTHING_SAVED}")
    with cli.user_input():
        model = load_mobileclip_s0(args.source, model=args.model, what=args.source)
    tokenizer = create_tokenizer(model.config.text.tokenizer, context_length=model.config.text.context_length)
    save_checkpoint(model, args.out, tokenizer=tokenizer_spec(tokenizer))
    print(f"{args.source} ({args.model}, tokenizer {tokenizer.name}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
