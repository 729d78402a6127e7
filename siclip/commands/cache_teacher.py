"""Precompute a teacher's embeddings for a dataset once, so distillation can skip the teacher.

    siclip cache-teacher --teacher mobileclip_s0.pt --data data/shards --tokenizer clip \\
        --vocab-path bpe_simple_vocab_16e6.txt.gz --out data/shards/teacher_cache
    siclip cache-teacher --teacher runs/teacher/model.pt --data embedded --out cache/

``--teacher`` is any model spec: Apple's ``mobileclip_s0.pt``, a checkpoint of this package, ``hf:DIR`` or
``open_clip:ARCH:FILE``; ``--data`` a shard directory/pattern, a ``.csv``/``.tsv`` file, or ``embedded`` (the
embedded world's training split). Images go through the teacher's own preprocessing, which the cache records.

``--out`` is checked before the teacher loads: a new or empty folder, or an earlier cache (nothing else in it), which
is replaced atomically once the new one is complete; a folder holding anything else needs ``--overwrite``; the data's
own folder (``--data X --out X``) and the teacher's files are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

from siclip.data import EmbeddedConfig, build_teacher_cache, create_tokenizer, open_source
from siclip.data.embedded import MAX_SPLIT
from siclip.data.teacher_cache import is_teacher_cache
from siclip.distill import FrozenTeacher
from siclip.interop import check_model_spec, load_clip, spec_files
from siclip.storage import check_output
from siclip.train.malloc import keep_freed_memory



def data_files(spec: str) -> list[str]:
    """The files ``--data`` reads (the CSV, the shard folder or each shard a pattern names): never written over."""
    if spec == "embedded" or Path(spec).exists():
        return [] if spec == "embedded" else [spec]
    from siclip.data.webdataset import expand_shards

    try:
        return [str(p) for p in expand_shards(spec)]
    except (OSError, ValueError):
        return []


def build_parser() -> argparse.ArgumentParser:
    """``siclip cache-teacher``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, type=cli.checked(check_model_spec),
                        metavar="SPEC", help="model spec: a checkpoint, Apple's mobileclip_s0.pt, hf:DIR or open_clip:ARCH:FILE")
    parser.add_argument("--data", required=True, metavar="SRC",
                        help="'embedded' (the embedded world's training split), a shard directory/pattern or a .csv/.tsv")
    parser.add_argument("--out", type=Path, required=True, help="the cache folder (an earlier cache there is replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when it holds files a cache did not write (never implied)")
    parser.add_argument("--tokenizer", choices=["embedded", "clip", "words"],
                        help="a siclip teacher's tokenizer (default: the one saved with the teacher, else its config's)")
    parser.add_argument("--vocab-path", type=cli.existing_file, metavar="FILE",
                        help="CLIP merges file, or a word list for --tokenizer words (default: the tokenizer's own)")
    parser.add_argument("--num-train", type=cli.int_in_range(1, MAX_SPLIT), default=10_000,
                        help=f"size of the embedded split (10000; at most {MAX_SPLIT:,})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=256, metavar="N", help="pairs per teacher forward (default: 256)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="precision of the stored embeddings (default: float16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = [*spec_files(args.teacher), *data_files(args.data)]
    check_output(args.out, ours=is_teacher_cache, overwrite=args.overwrite, inputs=inputs)  # before the teacher loads
    keep_freed_memory()
    cli.on_interrupt(f"the cache {args.out} is written whole or not at all: {cli.NOTHING_SAVED}")
    with cli.user_input():
        loaded = load_clip(args.teacher)
        model = FrozenTeacher(loaded.model).model
        if args.tokenizer is None:
            tokenizer = loaded.tokenizer
        elif not loaded.is_siclip:
            parser.error(f"--tokenizer: {args.teacher} reads its own tokenizer's ids; leave --tokenizer out")
        else:
            tokenizer = create_tokenizer(args.tokenizer, vocab_path=args.vocab_path, context_length=model.config.text.context_length)
        source = open_source(args.data, EmbeddedConfig(num_train=args.num_train))
    path = build_teacher_cache(source, model.encode_image, model.encode_text, tokenizer, args.out, preprocess=model.preprocess,
                               batch_size=args.batch_size, teacher=f"{model.name} from {args.teacher}", dtype=args.dtype,
                               logit_scale=float(model.scale()), overwrite=args.overwrite, inputs=inputs)  # fmt: skip
    print(f"teacher cache written to {path} (logit scale {float(model.scale()):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
