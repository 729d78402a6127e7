"""Precompute a teacher's embeddings for a dataset once, so distillation can skip the teacher.

    python experiments/cache_teacher.py --teacher mobileclip_s0.pt --data data/shards --tokenizer clip \
        --vocab-path bpe_simple_vocab_16e6.txt.gz --out data/shards/teacher_cache
    python experiments/cache_teacher.py --teacher runs/teacher/model.pt --data embedded --out cache/

``--teacher`` is Apple's ``mobileclip_s0.pt`` or a checkpoint of this package; ``--data`` a shard
directory/pattern, a ``.csv``/``.tsv`` file, or ``embedded`` (the embedded world's training split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siclip.data import AugmentConfig, EmbeddedConfig, build_teacher_cache, create_tokenizer, open_source
from siclip.data.tokenizer import tokenizer_for
from siclip.distill import FrozenTeacher
from siclip.models import load_model
from siclip.train.malloc import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", choices=["embedded", "clip", "words"], help="default: the one saved with the teacher, else its config's")
    parser.add_argument("--vocab-path", type=Path)
    parser.add_argument("--num-train", type=int, default=10_000, help="size of the embedded split")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args(argv)
    keep_freed_memory()
    loaded, spec = load_model(args.teacher)
    model = FrozenTeacher(loaded).model
    if args.tokenizer is None:
        tokenizer = tokenizer_for(model.config.text, spec, str(args.teacher))
    else:
        tokenizer = create_tokenizer(args.tokenizer, vocab_path=args.vocab_path, context_length=model.config.text.context_length)
    path = build_teacher_cache(
        open_source(args.data, EmbeddedConfig(num_train=args.num_train)), model.encode_image, model.encode_text, tokenizer, args.out,
        augment_config=AugmentConfig(model.config.image.image_size), batch_size=args.batch_size,
        teacher=f"{model.config.name} from {args.teacher}", dtype=args.dtype, logit_scale=float(model.scale()),
    )  # fmt: skip
    print(f"teacher cache written to {path} (logit scale {float(model.scale()):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
