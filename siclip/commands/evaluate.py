"""Evaluate a model on your own benchmark sets (CLIP_benchmark's tasks and JSON layout).

    siclip evaluate --model runs/mine/model.pt --zeroshot data/test --classnames classes.txt --out runs/mine/eval
    siclip evaluate --model mobileclip_s0.pt --zeroshot test.csv --templates prompts.txt --retrieval val.csv
    siclip evaluate --model mobileclip_s0.pt --zeroshot imagenet/val --classnames imagenet1k --templates imagenet1k

--model: a model spec: a siclip checkpoint (its tokenizer is saved in it), Apple's mobileclip_s0.pt (CLIP BPE),
         hf:DIR (a transformers CLIPModel or SiglipModel saved with its tokenizer and preprocessor_config.json), or
         open_clip:ARCH:FILE (an open_clip architecture or model-config JSON, and a weights file), or a directory
         siclip export wrote (the ONNX encoders under ONNX Runtime). Every image goes through the model's
         own preprocessing (resize, crop, mean and std), every prompt through its tokenizer.
--zeroshot: a folder with one subfolder per class, or a CSV/TSV with filepath,label columns.
--classnames: one name per line or a JSON list, in class order; class folders named after their
              classes match by name, other folders follow sorted folder order. Or a standard set by name:
              imagenet1k (CLIP's curated names; folders named by WordNet id n01440764 …, index or name), cifar10,
              cifar100 (folders by index or name); any subset of the classes may be present.
--templates: one prompt per line with a {} or {c} placeholder, or CLIP's sets by name: imagenet1k (80),
             imagenet1k-simple (7), cifar (18); CLIP's 80-template ensemble by default.
--retrieval: a CSV/TSV with filepath,title rows (one row per caption) or WebDataset shards.
Writes {dataset}_{task}.json per task into --out and prints the metrics as one table. A bad argument or input file ends
in one line ``siclip evaluate: error: …`` (status 2).
"""

from __future__ import annotations

import argparse
import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

import torch

from siclip.eval import run_benchmarks
from siclip.eval.named import CLASSNAME_SETS, TEMPLATE_SETS, classnames_spec, templates_spec
from siclip.interop import check_model_spec, load_clip
from siclip.train.malloc import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    """``siclip evaluate``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=cli.checked(check_model_spec),
                        help="siclip checkpoint, Apple-layout mobileclip_s0.pt, hf:DIR, open_clip:ARCH:FILE or an exported directory")
    parser.add_argument("--zeroshot", type=cli.existing_path, help="class-per-subfolder directory or filepath,label CSV/TSV (default: none)")
    parser.add_argument("--classnames", type=classnames_spec, metavar="FILE-or-NAME",
                        help=f"class names file (one per line or JSON list) or a standard set: {', '.join(CLASSNAME_SETS)} (default: the folder names)")
    parser.add_argument("--templates", type=templates_spec, metavar="FILE-or-NAME",
                        help=f"prompt templates file, one per line with {{}} or {{c}}, or a set: {', '.join(TEMPLATE_SETS)} (default: CLIP's 80)")
    parser.add_argument("--retrieval", help="filepath,title CSV/TSV (several rows per image) or shards (default: none)")
    parser.add_argument("--out", help="directory for the JSON results (default: none, printed only)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=256, help="images or prompts per forward (default: 256)")
    parser.add_argument("--device", type=cli.device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-unknown-rate", type=cli.fraction, default=0.05,
                        help="refuse prompts or captions whose tokens are more than this fraction <unk> (default: 0.05)")
    return parser


def results_table(records: list[dict]) -> str:
    """The results as one table, a row per metric of each task (per-class accuracies are in the JSON files)."""
    lines = ["| dataset | task | metric | value |", "|---|---|---|---:|"]
    for record in records:
        for metric, value in record["metrics"].items():
            if metric != "per_class_accuracy":
                shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
                lines.append(f"| {record['dataset']} | {record['task']} | {metric} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    if args.zeroshot is None and args.retrieval is None:
        parser.error("nothing to evaluate: give --zeroshot and/or --retrieval")
    for flag, value in (("--classnames", args.classnames), ("--templates", args.templates)):
        if value is not None and args.zeroshot is None:
            parser.error(f"{flag} needs --zeroshot")
    cli.on_interrupt(f"each result in {args.out} is written whole when its task ends: run the command again" if args.out
                     else cli.NOTHING_SAVED)  # fmt: skip
    with cli.user_input():  # a missing file or a malformed benchmark is the user's to fix: say what and where
        loaded = load_clip(args.model)
        model = loaded.model.to(cli.resolved_device(args.device)).eval()
        records = run_benchmarks(model, loaded.tokenizer, model_name=model.name, zeroshot=args.zeroshot, classnames=args.classnames,
                                 templates=args.templates, retrieval_data=args.retrieval, out_dir=args.out, batch_size=args.batch_size,
                                 max_unknown_rate=args.max_unknown_rate)  # fmt: skip
    print(results_table(records))
    if args.out:
        print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
