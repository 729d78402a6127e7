"""Your model, simplified: convert a transformers, open_clip or timm model's blocks to SAS-P, measure the divergence
between its blocks on your inputs, share weights by a plan, and save a checkpoint that reloads to the same model.

    python experiments/convert_model.py hf:models/clip-vit-b32 --captions captions.txt --images photos/ --out converted.pt
    python experiments/convert_model.py open_clip:ViT-B-32:weights.pt --captions captions.txt --images photos/ \
        --sharing optimal --max-groups 6 --out converted.pt
    python experiments/convert_model.py timm:vit_small_patch16_224:vit_s16.pt --images photos/ --sharing adjacent --out vit.pt

SPEC: hf:DIR (a transformers model saved with save_pretrained: CLIP, SigLIP, ViT, GPT-2…), open_clip:ARCH:FILE (an
architecture or model-config JSON and a weights file), timm:NAME:FILE (a timm model name and a weights file).
Nothing is downloaded.

1. Reads the model and, for each stack of blocks (a tower: text, vision…), the Jensen–Shannon divergence between its
   blocks' attention on your captions and images (each through the model's own tokenizer and preprocessing).
2. Converts the blocks of the chosen stacks (--stacks, default all) to SAS-P and shares them by the plan --sharing
   picks: none, adjacent pairs, optimal (the partition into --max-groups runs with the least divergence inside),
   threshold (adjacent pairs below --threshold nats); --scope block shares whole blocks, attention W_Q, W_K and gains.
3. Prints what was inherited, dropped and added, and parameters and FLOPs before and after (on your inputs).
4. Saves the converted model (siclip-converted-1: data, no code) and checks that it reloads to the same outputs.
   Heatmaps and divergence.json go to --report (default: next to --out).

A converted CLIP trains as a SiCLIP student against its original (train.py --model converted.pt --teacher SPEC
--wikd) and is evaluated by evaluate.py --model converted.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

import torch

from siclip.analysis.divergence import spec_divergences
from siclip.analysis.flops import model_report
from siclip.blocks import SASPConversion, plan_sharing
from siclip.data.sources import read_image_folder
from siclip.interop import spec_files
from siclip.interop.converted import (
    ConvertedRecipe, architecture_of, convert, is_converted_file, load_converted, original_preprocess, save_converted,
)  # fmt: skip
from siclip.storage import check_output
from siclip.train.evaluation import read_caption_file
from siclip.train.malloc import keep_freed_memory


MAX_CALIBRATION = 4096  # calibration captions and images held in memory at once


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="hf:DIR, open_clip:ARCH:FILE or timm:NAME:FILE")
    parser.add_argument("--out", type=Path, required=True, help="the converted checkpoint to write (an earlier converted file there is replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when it is a file convert did not write (never implied)")
    parser.add_argument("--captions", type=cli.existing_file, help="calibration captions, one per line")
    parser.add_argument("--images", type=cli.existing_dir, help="a folder of calibration images")
    parser.add_argument("--count", type=cli.int_in_range(2, MAX_CALIBRATION), default=64,
                        help=f"calibration captions and images to use (64; at most {MAX_CALIBRATION})")
    parser.add_argument("--stacks", nargs="+", help="the stacks to convert, by name (as the divergence table prints them); default all")
    parser.add_argument("--sharing", choices=["none", "adjacent", "optimal", "threshold"], default="none")
    parser.add_argument("--max-groups", type=cli.positive_int, help="optimal sharing: runs per stack (default half its blocks)")
    parser.add_argument("--threshold", type=cli.positive_float, help="threshold sharing: largest adjacent divergence shared (nats)")
    parser.add_argument("--scope", choices=["block", "attention"], default="block", help="share whole blocks or W_Q, W_K and gains")
    parser.add_argument("--beta-ff", type=cli.float_in_range(0, 100, above_low=True), default=SASPConversion.beta_ff,
                        help="initial MLP branch gain β_FF, in (0, 100] (0.1)")
    parser.add_argument("--zero-query", action="store_true", help="W_Q = 0: each attention starts as the identity")
    parser.add_argument("--report", type=Path, help="folder for heatmaps and divergence.json (default: <out>_report)")
    args = parser.parse_args(argv)
    if args.sharing == "threshold" and args.threshold is None:
        parser.error("--sharing threshold needs --threshold")
    # Before anything loads: never over a file convert did not write, its own input, or a device.
    check_output(args.out, kind="file", ours=is_converted_file, overwrite=args.overwrite, inputs=spec_files(args.spec))
    if args.report is not None and args.report.exists() and not args.report.is_dir():
        parser.error(f"--report: {args.report} exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    keep_freed_memory()
    cli.on_interrupt(f"{args.out} is written whole or not at all: {cli.NOTHING_SAVED}")
    with cli.user_input(NotImplementedError):  # a block siclip does not convert (e.g. Post-LN): the user's model, not a bug
        captions = read_caption_file(args.captions)[: args.count] if args.captions else None
        images = read_image_folder(args.images, args.count) if args.images else None
        model, run, divergence = spec_divergences(args.spec, captions=captions, images=images, max_groups=args.max_groups)
    print(divergence)
    report_dir = args.report or args.out.with_name(args.out.stem + "_report")
    divergence.save(report_dir)
    stacks = args.stacks or list(divergence.groups)
    unknown = sorted(set(stacks) - set(divergence.groups))
    if unknown:
        raise cli.UserError(f"--stacks {unknown} are not stacks of this model; its stacks: {list(divergence.groups)}")
    before = model_report(model, lambda: run(model))
    sharing = {}
    for stack in stacks:
        g = divergence.groups[stack]
        n = len(g["blocks"])
        matrix = g["attention"].numpy()
        plan = plan_sharing(args.sharing, n, matrix, threshold=args.threshold, max_groups=args.max_groups or max(1, n // 2))
        sharing[stack] = {"groups": [list(group) for group in plan.groups], "scope": args.scope}
    recipe = ConvertedRecipe(
        origin=args.spec, architecture=architecture_of(args.spec, model), blocks=[b for s in stacks for b in divergence.groups[s]["blocks"]],
        options=dataclasses.asdict(SASPConversion(beta_ff=args.beta_ff, zero_query=args.zero_query)), sharing=sharing,
        preprocess=(lambda p: p.to_dict() if p is not None else None)(original_preprocess(args.spec, model)),
    )  # fmt: skip
    try:
        conversion = convert(model, recipe)
    except (NotImplementedError, TypeError, ValueError) as err:  # the model's blocks do not take this plan
        raise cli.UserError(str(err)) from None
    after = model_report(model, lambda: run(model))
    _check_finite(run, model, args)
    print(f"\n{conversion}\n")
    print(conversion.summary().to_string())
    print("\n| | parameters | GFLOPs on your inputs |\n|---|---:|---:|")
    print(f"| original | {before['params']:,} | {before['gflops']:.3f} |")
    print(f"| converted | {after['params']:,} ({after['params'] / before['params']:.3f}×) | {after['gflops']:.3f} "
          f"({after['gflops'] / before['gflops']:.3f}×) |")  # fmt: skip
    print("\nsharing: " + "; ".join(f"{s}: {p['groups']} ({p['scope']})" for s, p in sharing.items()))
    save_converted(model, recipe, args.out)
    reloaded, _ = load_converted(args.out)
    difference = _max_difference(run, model.eval(), reloaded)
    print(f"\nsaved {args.out}; it reloads to the same model (max |Δ| of the outputs on your inputs: {difference:.1e})")
    print(f"divergence heatmaps and divergence.json in {report_dir}")
    return 0


@torch.no_grad()
def _check_finite(run, model, args) -> None:
    """The converted model's outputs on the calibration inputs are finite, or nothing is saved (a gain such as
    ``--beta-ff 1e38`` overflows them)."""
    outputs = _flatten(run(model.eval()))
    if not all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point()):
        raise cli.UserError(f"the converted model gives NaN or Inf on your inputs (--beta-ff {args.beta_ff:g}): {args.out} was not written; "
                            "convert with a smaller --beta-ff")  # fmt: skip


@torch.no_grad()
def _max_difference(run, model, reloaded) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(_flatten(run(model)), _flatten(run(reloaded))))


def _flatten(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flatten(o)]
    return [v for v in vars(output).values() if isinstance(v, torch.Tensor)] if hasattr(output, "__dict__") else []


if __name__ == "__main__":
    sys.exit(cli.run(main))
