"""Your model, simplified: convert a model's blocks to SAS-P, measure the divergence between its blocks on your inputs,
share weights by a plan, and save a checkpoint that reloads to the same model.

    siclip convert --model hf:models/clip-vit-b32 --calibration-captions captions.txt --calibration-images photos/ --out converted.pt
    siclip convert --model open_clip:ViT-B-32:weights.pt --calibration-captions captions.txt --calibration-images photos/ \\
        --sharing optimal --max-groups 6 --out converted.pt
    siclip convert --model timm:vit_small_patch16_224:vit_s16.pt --calibration-images photos/ --sharing adjacent --out vit.pt
    siclip convert --model runs/digits/model.pt --calibration-captions captions.txt --calibration-images photos/ --out siclip.pt

--model: any model spec. hf:DIR (a transformers model saved with save_pretrained: CLIP, SigLIP, ViT, GPT-2…),
open_clip:ARCH:FILE (an architecture or model-config JSON and a weights file), timm:NAME:FILE (a timm model name or a
JSON of name and kwargs, and a weights file): converted and saved as a converted file. A converted file: the stacks
not converted yet are converted, and unshared stacks shared by the plan. A siclip MobileCLIP (a registered name, a
checkpoint, one trained on your data with its own tokenizer, Apple's mobileclip_s0.pt): converted into a SiCLIP
student that inherits its weights (the paper's recipe), saved as a siclip checkpoint. Nothing is downloaded.

1. Reads the model and, for each stack of blocks (a tower: text, vision…), the Jensen–Shannon divergence between its
   blocks' attention on your captions and images (each through the model's own tokenizer and preprocessing, over the
   query rows that are real tokens); a siclip model without calibration files reads the embedded world's.
2. Converts the blocks of the chosen stacks (--stacks, default all) to SAS-P and shares them by the plan --sharing
   picks: none, adjacent pairs, optimal (the partition into --max-groups runs with the least divergence inside),
   threshold (adjacent pairs below --threshold nats); --scope block shares whole blocks, attention W_Q, W_K and gains.
3. Prints the divergence table, what was inherited, dropped and added, and parameters and FLOPs before and after.
4. Saves the converted model (data, no code; a converted file carries its tokenizer and preprocessing, so the
   original's folder is not needed again) and checks that it reloads to the same outputs; a model whose outputs are
   NaN or Inf on your inputs is not saved. Heatmaps, divergence.md and divergence.json go to --report-dir (default:
   next to --out).

--out is checked before anything loads: an earlier file convert wrote is replaced (atomically), any other file only
with --overwrite, never the model's own files or a device. --calibration-count is at most 4096, --beta-ff in (0, 100].

A converted CLIP trains as a SiCLIP student against its original (siclip train --model converted.pt --teacher SPEC
--wikd) and is evaluated by siclip evaluate --model converted.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.interop.calibration import MEASURABLE_HELP, check_measurable_spec

from .divergence import MAX_CALIBRATION

DEFAULT_COUNT = 64
STRATEGIES = ("none", "adjacent", "optimal", "threshold")


def build_parser() -> argparse.ArgumentParser:
    """``siclip convert``'s arguments (the vocabulary test reads this parser without running anything)."""
    from siclip.blocks import SASPConversion

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("legacy_model", nargs="?", help=argparse.SUPPRESS)  # the old positional SPEC, checked below
    parser.add_argument("--model", type=cli.checked(check_measurable_spec), metavar="SPEC", help=f"the model to convert: {MEASURABLE_HELP}")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="the converted checkpoint to write (an earlier one convert wrote there is replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when it is a file convert did not write (never implied)")
    parser.add_argument("--calibration-captions", type=cli.existing_file, metavar="FILE", help="calibration captions, one per line")
    parser.add_argument("--calibration-images", type=cli.existing_dir, metavar="DIR", help="a folder of calibration images")
    parser.add_argument("--calibration-count", type=cli.int_in_range(2, MAX_CALIBRATION), default=None, metavar="N",
                        help=f"calibration captions and images to use ({DEFAULT_COUNT}; at most {MAX_CALIBRATION})")  # fmt: skip
    # Old spellings: --captions, --images and --count here, --caption-file and --image-folder in siclip divergence.
    cli.add_renamed(parser, "--captions", "--caption-file", new="--calibration-captions", dest="calibration_captions", type=cli.existing_file)
    cli.add_renamed(parser, "--images", "--image-folder", new="--calibration-images", dest="calibration_images", type=cli.existing_dir)
    cli.add_renamed(parser, "--count", new="--calibration-count", dest="calibration_count", type=cli.int_in_range(2, MAX_CALIBRATION))
    parser.add_argument("--stacks", nargs="+", help="the stacks to convert, by name (as the divergence table prints them); default all")
    parser.add_argument("--sharing", choices=STRATEGIES, default="none", help="the sharing plan of the converted stacks (none)")
    parser.add_argument("--max-groups", type=cli.positive_int, metavar="N", help="--sharing optimal: runs per stack (default half its blocks)")
    parser.add_argument("--threshold", type=cli.positive_float, help="--sharing threshold: largest adjacent divergence shared, in nats")
    parser.add_argument("--scope", choices=["block", "attention"], help="share whole blocks or W_Q, W_K and gains (block; a siclip "
                        "model: block for text, attention for images, the paper's)")  # fmt: skip
    parser.add_argument("--beta-ff", type=cli.float_in_range(0, 100, above_low=True), default=SASPConversion.beta_ff,
                        help=f"initial MLP branch gain β_FF, in (0, 100] ({SASPConversion.beta_ff})")  # fmt: skip
    parser.add_argument("--zero-query", action="store_true", help="W_Q = 0: each attention starts as the identity")
    parser.add_argument("--apple-model", default="mobileclip_s0",
                        help="a file in Apple's layout is built as this registered configuration (mobileclip_s0)")  # fmt: skip
    parser.add_argument("--report-dir", type=Path, metavar="DIR",
                        help="folder for the divergence tables, divergence.json and heatmaps (default: <out>_report)")
    cli.add_renamed(parser, "--report", new="--report-dir", dest="report_dir", type=Path)  # --report is the studies' switch
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments: each refusal one line, before any model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and args.legacy_model is not None:
        parser.error("give the model once: --model SPEC")
    if args.legacy_model is not None:
        cli.note_renamed(parser.prog, "the positional SPEC is now --model SPEC", "form")
        try:
            args.model = check_measurable_spec(args.legacy_model)
        except (OSError, ValueError) as err:
            parser.error(f"argument --model: {err}")
    if args.model is None:
        parser.error("the following arguments are required: --model")
    if args.sharing == "threshold" and args.threshold is None:
        parser.error("--sharing threshold needs --threshold")
    if args.threshold is not None and args.sharing != "threshold":
        parser.error(f"--threshold is the threshold of --sharing threshold, not of --sharing {args.sharing}")
    if args.max_groups is not None and args.sharing not in ("optimal", "none"):
        parser.error(f"--max-groups is the number of runs of --sharing optimal, not of --sharing {args.sharing}")
    from siclip.interop import spec_files
    from siclip.storage import check_output

    # Before anything loads: never over a file convert did not write, its own input, or a device.
    check_output(args.out, kind="file", ours=written_by_convert, overwrite=args.overwrite, inputs=spec_files(args.model))
    if args.report_dir is not None and args.report_dir.exists() and not args.report_dir.is_dir():
        parser.error(f"--report-dir: {args.report_dir} exists and is not a directory")
    from .divergence import check_calibration_files

    check_calibration_files(parser, args)
    args.calibration_count = args.calibration_count or DEFAULT_COUNT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from siclip.train.malloc import keep_freed_memory

    from .divergence import report_of

    keep_freed_memory()
    cli.on_interrupt(f"{args.out} is written whole or not at all: {cli.NOTHING_SAVED}")
    with cli.user_input(NotImplementedError):  # a block siclip does not convert (e.g. Post-LN): the user's model, not a bug
        loaded, divergence, where = report_of(args.model, args.calibration_captions, args.calibration_images, args.calibration_count,
                                              args.max_groups, args.apple_model)  # fmt: skip
    print(f"calibration: {where}\n")
    print(divergence)
    report_dir = args.report_dir or args.out.with_name(args.out.stem + "_report")
    divergence.save(report_dir)
    stacks = args.stacks or list(divergence.groups)
    unknown = sorted(set(stacks) - set(divergence.groups))
    if unknown:
        raise cli.UserError(f"--stacks {unknown} are not stacks of this model; its stacks: {list(divergence.groups)}")
    plans = {stack: _plan(args, divergence.groups[stack]) for stack in stacks}
    convert = _convert_siclip if loaded.kind == "siclip" else _convert_foreign
    with cli.user_input(NotImplementedError, TypeError):  # the model's blocks do not take this plan
        done = convert(args, loaded, divergence, plans)
    print("\nsharing: " + "; ".join(f"{s}: {[list(g) for g in p.groups]} ({done['scopes'][s]})" for s, p in plans.items()))
    print(f"\nsaved {args.out}; it reloads to the same model (max |Δ| of the outputs on your inputs: {done['difference']:.1e})")
    print(f"divergence tables (divergence.md), divergence.json and heatmaps in {report_dir}")
    return 0


def written_by_convert(path: Path) -> bool:
    """Whether ``path`` is a file convert writes (replaced without ``--overwrite``): a converted file, or a siclip
    checkpoint carrying the divergences its sharing was chosen from (a siclip model converted)."""
    from siclip.interop.converted import is_converted
    from siclip.storage import CheckpointError, load_weights

    try:
        payload = load_weights(path, mmap=True)
    except CheckpointError:  # not loadable as data: not ours either way
        return False
    return is_converted(payload) or (isinstance(payload, dict) and payload.get("format") == "siclip-model-1" and "sharing_divergence" in payload)


def _check_finite(run, model, args) -> None:
    """The converted model's outputs on the calibration inputs are finite, or nothing is saved (a gain such as
    ``--beta-ff 1e38`` overflows them)."""
    import torch

    with torch.no_grad():
        outputs = _flatten(run(model.eval()))
    if not all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point()):
        raise cli.UserError(f"the converted model gives NaN or Inf on your inputs (--beta-ff {args.beta_ff:g}): {args.out} was not written; "
                            "convert with a smaller --beta-ff")  # fmt: skip


def _plan(args, group: dict):
    from siclip.blocks import plan_sharing

    n = len(group["blocks"])
    return plan_sharing(args.sharing, n, group["attention"].numpy(), threshold=args.threshold, max_groups=args.max_groups or max(1, n // 2))


def _print_costs(before: dict, after: dict) -> None:
    print("\n| | parameters | GFLOPs on your inputs |\n|---|---:|---:|")
    print(f"| before (--model) | {before['params']:,} | {before['gflops']:.3f} |")
    print(f"| converted | {after['params']:,} ({after['params'] / before['params']:.3f}×) | {after['gflops']:.3f} "
          f"({after['gflops'] / before['gflops']:.3f}×) |")  # fmt: skip


def _convert_foreign(args, loaded, divergence, plans) -> dict:
    """An original (hf:, open_clip:, timm:) or a converted file: the recipe grows by the chosen stacks' blocks and plans."""
    from siclip.analysis.flops import model_report
    from siclip.blocks import SASPConversion
    from siclip.data.tokenizer import tokenizer_spec
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_converted, save_converted

    model, run = loaded.module, loaded.run
    scope = args.scope or "block"
    options = dataclasses.asdict(SASPConversion(beta_ff=args.beta_ff, zero_query=args.zero_query))
    if loaded.kind == "converted":
        old = loaded.recipe
        if options != old.options:
            raise cli.UserError(f"--model {args.model} was converted with {old.options}; its other stacks convert with the same options "
                                "(leave --beta-ff and --zero-query out, or convert the original again)")  # fmt: skip
        shared = [s for s in plans if s in old.sharing and any(len(g) > 1 for g in old.sharing[s]["groups"])]
        if shared:
            raise cli.UserError(f"--model {args.model}: {shared} are shared already ({[old.sharing[s]['groups'] for s in shared]}); "
                                f"convert the original ({old.origin}) to share them otherwise, or name other --stacks")  # fmt: skip
    else:
        old = ConvertedRecipe(origin=args.model, architecture=architecture_of(args.model, model), blocks=[], options=options,
                              tokenizer=tokenizer_spec(loaded.tokenizer) if loaded.tokenizer is not None else None,
                              preprocess=loaded.preprocess.to_dict() if loaded.preprocess is not None else None)  # fmt: skip
    new_blocks = [b for s in plans for b in divergence.groups[s]["blocks"] if b not in old.blocks]
    sharing = {s: {"groups": [list(g) for g in p.groups], "scope": scope} for s, p in plans.items()}
    before = model_report(model, lambda: run(model))
    step = ConvertedRecipe(origin=old.origin, architecture=old.architecture, blocks=new_blocks, options=old.options, sharing=sharing)
    conversion = convert(model, step)
    after = model_report(model, lambda: run(model))
    recipe = dataclasses.replace(old, blocks=[*old.blocks, *new_blocks], sharing={**old.sharing, **sharing})
    print(f"\n{conversion}\n")
    print(conversion.summary().to_string())
    _print_costs(before, after)
    _check_finite(run, model, args)
    save_converted(model, recipe, args.out)
    reloaded, _ = load_converted(args.out)
    return {"difference": _max_difference(run, model.eval(), reloaded), "scopes": {s: scope for s in plans}}


def _convert_siclip(args, loaded, divergence, plans) -> dict:
    """A siclip MobileCLIP: a SiCLIP student inheriting its weights (:func:`siclip.models.siclip.build_siclip`), its
    towers converted and shared by the plans, saved as a siclip checkpoint with the measured divergences (which rebuild
    a plan chosen from them)."""
    from siclip.analysis.flops import model_report
    from siclip.models import SiCLIPConfig, load_checkpoint, save_checkpoint
    from siclip.models.siclip import attention_stage, build_siclip

    teacher = loaded.module
    if teacher.config.siclip is not None:
        raise cli.UserError(f"--model {args.model} is a SiCLIP model already (its blocks are SAS-P): convert the MobileCLIP it came from")
    towers = {"text.transformer": "text"}
    try:
        towers[attention_stage(teacher)[0]] = "image"
    except ValueError:
        pass  # an image encoder without an MCi attention stage: its text tower alone converts
    unknown = [s for s in plans if s not in towers]
    if unknown:
        raise cli.UserError(f"--stacks {unknown}: a siclip model converts {list(towers)}")
    defaults = SiCLIPConfig()
    fields, divergences = {"convert": tuple(towers[s] for s in plans)}, {}
    for stack, plan in plans.items():
        tower = towers[stack]
        prefix = "" if tower == "text" else "image_"
        scope = args.scope or defaults.tower_sharing(tower)["scope"]
        fields.update({f"{prefix}sharing": args.sharing, f"{prefix}sharing_threshold": args.threshold,
                       f"{prefix}sharing_max_groups": len(plan.groups) if args.sharing == "optimal" else None, f"{prefix}sharing_scope": scope})
        divergences[tower] = divergence.groups[stack]["attention"].numpy()
    config = dataclasses.replace(defaults, beta_ff=args.beta_ff, zero_query=args.zero_query, **fields)
    student, report = build_siclip(teacher, config, divergence=divergences)
    run = loaded.run
    before, after = model_report(teacher, lambda: run(teacher)), model_report(student, lambda: run(student))
    print("\n" + report.summary().to_string())
    _print_costs(before, after)
    _check_finite(run, student, args)
    save_checkpoint(student.eval(), args.out, tokenizer=loaded.tokenizer_spec, sharing_divergence={t: d.tolist() for t, d in divergences.items()})
    reloaded = load_checkpoint(args.out)
    scopes = {s: config.tower_sharing(towers[s])["scope"] for s in plans}
    return {"difference": _max_difference(run, student.eval(), reloaded.eval()), "scopes": scopes}


def _max_difference(run, model, reloaded) -> float:
    import torch

    with torch.no_grad():
        return max(float((a - b).abs().max()) for a, b in zip(_flatten(run(model)), _flatten(run(reloaded))))


def _flatten(output) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flatten(o)]
    return [v for v in vars(output).values() if isinstance(v, torch.Tensor)] if hasattr(output, "__dict__") else []


if __name__ == "__main__":
    sys.exit(cli.run(main))
