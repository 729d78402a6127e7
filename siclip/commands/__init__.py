"""The ``siclip`` command: one entry point, a subcommand per task.

    siclip train --model siclip_tiny --teacher runs/demo/model.pt --wikd --out runs/student
    siclip evaluate --model runs/student/model.pt --zeroshot data/test
    siclip study data-scale --preset smoke
    siclip <command> --help

Each subcommand is a module of this package with ``main(argv) -> int``; ``experiments/<script>.py`` are thin callers
of the same functions. Modules are imported only when their command runs, so ``siclip --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

from siclip import cli  # first: a Ctrl-C while the rest imports ends in one line

# command → (module in siclip.commands, one-line summary); "study" holds the studies' drivers.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a CLIP (MobileCLIP, SiCLIP, a converted CLIP) on the embedded world or your data, then evaluate it"),
    "evaluate": ("evaluate", "zero-shot classification and retrieval of any model spec on your benchmarks (CLIP_benchmark JSON)"),
    "convert": ("convert", "measure, convert to SAS-P, share and save any model (hf:, open_clip:, timm:, converted, siclip)"),
    "divergence": ("divergence", "Jensen–Shannon divergences between blocks, heatmaps and sharing plans"),
    "flops": ("flops", "parameters and FLOPs of every registered model"),
    "export": ("export", "export both encoders to ONNX, checked under ONNX Runtime against PyTorch"),
    "caption": ("caption", "write synthetic captions (BLIP, GIT, CoCa, yours) into WebDataset shards or a CSV, resumably"),
    "cache-teacher": ("cache_teacher", "precompute a teacher's embeddings for distillation"),
    "import-mobileclip": ("import_mobileclip", "convert Apple's mobileclip_s0.pt into a siclip checkpoint"),
    "demo": ("demo", "the main job: a MobileCLIP-tiny teacher and its SiCLIP-tiny student, one table"),
    "filter": ("filter", "score every image–text pair with a CLIP and keep the best (DataComp's CLIP-score filter)"),
}
STUDIES: dict[str, tuple[str, str]] = {
    "ablation": ("ablation", "SiCLIP's ablation: one factor at a time, 3 seeds, intervals and plots"),
    "data-scale": ("data_scale", "when distillation pays: the method ladder across training-set sizes"),
    "scaling-down": ("scaling_down", "Scaling (Down) CLIP's claims at equal compute, SiCLIP beside them, teacher quality"),
}


def _usage(table: dict[str, tuple[str, str]], prog: str) -> str:
    width = max(len(name) for name in table)
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in table.items())
    return f"usage: {prog} <command> [options]\n\ncommands:\n{rows}\n\n'{prog} <command> --help' describes a command's options."


def dispatch(argv: list[str], table: dict[str, tuple[str, str]], prog: str) -> int:
    """Run ``argv[0]``'s module from ``table`` with the rest of ``argv``, its messages named ``prog argv[0]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(table, prog))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: error: unknown command {name!r}; commands: {', '.join(table)}", file=sys.stderr)
        return 2
    sys.argv = [f"{prog} {name}", *rest]  # argparse and cli.run name the command as the user typed it
    module = importlib.import_module(f"siclip.commands.{table[name][0]}")
    return cli.run(module.main, rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = {**COMMANDS, "study": ("", "run a study: " + ", ".join(STUDIES))}
    if argv and argv[0] == "study":
        return dispatch(argv[1:], STUDIES, "siclip study")
    return dispatch(argv, table, "siclip")


__all__ = ["COMMANDS", "STUDIES", "dispatch", "main"]
