"""Export a model's two encoders to ONNX, checked under ONNX Runtime against PyTorch.

    siclip export --model runs/mine/model.pt --out runs/mine/onnx
    siclip export --model mobileclip_s0.pt --out runs/s0_onnx --quantize int8

--model: any model whose encoders are torch modules: a siclip checkpoint (its tokenizer is saved in it), Apple's
       mobileclip_s0.pt (CLIP BPE), a converted file (siclip convert), hf:DIR, open_clip:ARCH:FILE.
--out: the exported directory: image.onnx and text.onnx (reparameterised encoders, dynamic batch axis, unit-norm
       embeddings) and siclip_onnx.json (preprocessing, tokenizer, logit scale, embedding size, name, the check).
       An earlier export there (nothing else beside it) is replaced atomically, once every check has passed; a
       directory holding other files needs --overwrite; the model's own folder, the current one (--out .) and
       devices are refused before any work.
--attention: the attention the graphs compute: 'sdpa' (ONNX's Attention op at opset 23) or 'math' (explicit products).
--quantize int8: also write OUT/int8/, the encoders with ONNX Runtime's dynamic int8 quantisation, run one sample
       per call (dynamic quantisation takes an activation's range over the whole call, so batched calls would make a
       sample's embedding depend on its batch).
The check runs both encoders under ONNX Runtime and PyTorch on scikit-learn's sample photographs and real captions,
batched and one at a time: a max relative error above 1e-4 (float32) fails the export, naming the encoder; an int8
embedding whose cosine to the float32 one is below 0.7 fails it too (measured: siclip/deploy/export.py).
Evaluate the result like any model: siclip evaluate --model runs/mine/onnx/ --zeroshot ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

import torch

from siclip.deploy import ATTENTION_KERNELS, DEFAULT_ATTENTION, DEFAULT_OPSET, export_clip
from siclip.deploy.export import written_by_export
from siclip.deploy.runtime import OPSETS
from siclip.interop import check_model_spec, load_clip, spec_files
from siclip.storage import check_output
from siclip.train.malloc import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    """``siclip export``'s arguments (the vocabulary test reads this parser without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=cli.checked(check_model_spec), metavar="SPEC",
                        help="the model to export: a siclip checkpoint, Apple's mobileclip_s0.pt, a converted file, hf:DIR or "
                        "open_clip:ARCH:FILE")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, metavar="PATH", help="directory to write the exported model into")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when it holds files an export did not write (never implied)")
    parser.add_argument("--attention", choices=ATTENTION_KERNELS, default=DEFAULT_ATTENTION, help=f"attention kernel traced ({DEFAULT_ATTENTION})")
    parser.add_argument("--opset", type=cli.int_in_range(*OPSETS), default=DEFAULT_OPSET,
                        help=f"ONNX opset, {OPSETS[0]} to {OPSETS[1]} ({DEFAULT_OPSET}: the Attention op)")
    parser.add_argument("--quantize", choices=["int8"], help="also write OUT/int8/ (ONNX Runtime dynamic quantisation)")
    parser.add_argument("--apple-model", default="mobileclip_s0", help="registered configuration a file in Apple's layout is built as (default: mobileclip_s0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.user_input():  # before any model loads: a destination it may not write is refused now, not after the export
        check_output(args.out, ours=written_by_export, overwrite=args.overwrite, inputs=spec_files(args.model))
    keep_freed_memory()
    cli.on_interrupt(f"{args.out} is replaced whole or not at all (an earlier export there is intact): {cli.NOTHING_SAVED}")
    with cli.user_input(ImportError):  # a missing file, a foreign model, a missing library or a failed check: one line
        loaded = load_clip(args.model, apple_model=args.apple_model)
        if not isinstance(loaded.model, torch.nn.Module) or hasattr(loaded.model, "sessions"):
            raise ValueError(f"{args.model}: an exported ONNX model is exported already; export the model it came from")
        done = export_clip(loaded.model, loaded.tokenizer, args.out, attention=args.attention, opset=args.opset, quantize=args.quantize,
                           source=_source(args.model), overwrite=args.overwrite, inputs=spec_files(args.model))  # fmt: skip
    manifest = done.manifest
    errors = manifest["check"]["max_relative_error"]
    for encoder in ("image", "text"):
        entry = manifest[encoder]
        print(f"{done.directory / entry['file']}: {entry['bytes'] / 2**20:.1f} MiB, input {entry['input']} {entry['input_shape']}, "
              f"max relative error against PyTorch {errors[encoder]:.2e} (bound {manifest['check']['bound']:g})")  # fmt: skip
    if done.int8 is not None:
        cosines, bound = done.int8_manifest["check"]["min_cosine_to_float32"], done.int8_manifest["check"]["bound"]
        for encoder in ("image", "text"):
            entry = done.int8_manifest[encoder]
            print(f"{done.int8 / entry['file']}: {entry['bytes'] / 2**20:.1f} MiB ({entry['bytes'] / manifest[encoder]['bytes']:.0%} of "
                  f"float32), smallest cosine to the float32 embeddings {cosines[encoder]:.5f} (bound {bound}; one sample per call)")  # fmt: skip
    print(f"exported {manifest['name']} to {done.directory} (evaluate it with siclip evaluate --model {done.directory}/)")
    return 0


def _source(spec: str) -> str:
    """Where the model came from, its paths absolute (a spec's scheme kept)."""
    from siclip.interop.converted import resolve_origin

    head = spec.partition(":")[0]
    return resolve_origin(spec) if head in ("hf", "open_clip", "timm") else str(Path(spec).resolve())


if __name__ == "__main__":
    sys.exit(cli.run(main))
