"""Training strategies × image towers (issue 30): does each combination train, what a step costs, how fast it runs.

    python benchmarks/strategies.py [--threads 2] [--batch-size 32] [--image-size 64] [--rounds 30] [--out strategies.json]
    python benchmarks/strategies.py --flops-only       # every cell built, stepped once and counted: no timing
    python benchmarks/strategies.py --smoke            # tiny towers, batch 4, 2 rounds (the test suite runs this): measures nothing

Rows are *Scaling (Down) CLIP*'s strategies (Li, Xie, Cubuk 2024) as ``TrainConfig`` settings, columns the image towers;
each cell is a run's own :class:`~siclip.train.TrainingTask` and loader, assembled by the training loop's own
:func:`~siclip.train.loop.build_task` and :func:`~siclip.train.loop.build_data` from a ``TrainConfig`` (student,
SLIP's head and views, FLIP's maskers, the augmentation policy, the teacher), so the table measures what
``siclip train`` trains:

| row | TrainConfig |
|---|---|
| CLIP | the defaults (CLIP loss) |
| SLIP | ``objective.ssl_scale = 1`` (two SimCLR views per image through the image tower, SLIP's head, NT-Xent) |
| FLIP 0.5 | ``mask_ratio = 0.5`` |
| CLIP+DA (``strong``) | ``data.augment = "strong"``, ``data.text_augment = 0.1`` (the README's CLIP + DA command) |
| + WIKD and PM (SiCLIP student) | a SiCLIP student of the column's tower, inheriting (WI) from a random CLIP of that tower (the teacher), ``ObjectiveConfig()``: the paper's λ for feature, relation and interactive distillation and pair matching |

| column | model (the SiCLIP student's) |
|---|---|
| MobileCLIP-tiny (hybrid) | ``mobileclip_tiny`` (``siclip_tiny`` from it) |
| CNN tower | ``clip_cnn_tiny`` (the same, text tower converted to SAS-P: a pure CNN has no attention to convert) |
| ViT-tiny | ``clip_vit_tiny`` (its ViT and text blocks converted to SAS-P, ``siclip: {}``) |
| converted transformers ViT | a random ``transformers.CLIPModel`` at ViT-tiny's image shape (width, depth, heads, patch, size) and a 4-layer text tower of width 128 on the embedded world's words, built and saved here with ``save_pretrained`` (nothing downloaded), every encoder layer converted to SAS-P by :mod:`siclip.interop.converted` as ``siclip convert`` does; it trains its converted blocks (``freeze="inherited"``), and the student row distils from the original (``--teacher hf:DIR``) |

All towers take the same image size (``--image-size``) and the same embedded-world batch (``--batch-size``).

Each cell records: **works** (``yes`` after one optimiser step with finite loss terms, or ``refused: …``, the
project's own error when a combination is refused by design, e.g. FLIP on the hybrid MCi tower); **GFLOPs per step**
(forward + backward of the task on its first batch, :func:`siclip.train.budget.measure_step_flops`, what a compute
budget counts: extra views, masking and the teacher's forward included; the optimiser's element-wise update is not
counted); **images/s** of the training step: ``batch / median time`` of forward, backward, gradient clipping and
AdamW's step on that batch (:func:`siclip.train.step.forward_terms` and :func:`~siclip.train.step.backward_and_step`,
the loop's calls), float32. Every working cell is timed round-robin in one run (:func:`time_interleaved`: each round
runs every cell once, in reversed order every other round), so all cells share the machine's conditions.

The loader's cost is the same for every tower but not for every strategy (CLIP+DA's augmentation and SLIP's two
extra views run in the loader, not in the model), so the same interleaved run also times one batch of each distinct
data policy made in this process (``first_batches``: rendering the embedded world's scenes, cropping, augmenting and
collating, no workers), reported as loader images/s below the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from siclip.analysis.benchmark import device_name, time_interleaved
from siclip.distill import ObjectiveConfig
from siclip.storage import write_text_atomic
from siclip.train import DataConfig, TrainConfig
from siclip.train.budget import first_batches, measure_step_flops
from siclip.train.inputs import prepare_run
from siclip.train.loop import build_data, build_task, student_model_config
from siclip.train.malloc import keep_freed_memory
from siclip.train.step import backward_and_step, create_optimizer, forward_terms
from siclip.train.strategies import check_strategies

CLIP_ONLY = ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0)  # TrainConfig's default objective
STUDENT_ROW = "+ WIKD and PM (SiCLIP student)"
STRATEGIES: dict[str, dict] = {  # the row's TrainConfig fields ("data": DataConfig fields)
    "CLIP": {},
    "SLIP": {"objective": dataclasses.replace(CLIP_ONLY, ssl_scale=1.0)},
    "FLIP 0.5": {"mask_ratio": 0.5},
    "CLIP+DA (strong)": {"data": {"augment": "strong", "text_augment": 0.1}},
    STUDENT_ROW: {"objective": ObjectiveConfig()},
}
DATA_POLICIES = {"clip": "CLIP", "clip + SLIP's two strong views": "SLIP", "strong + EDA 0.1": "CLIP+DA (strong)"}  # loader rows
CONVERTED = "converted transformers ViT"


@dataclass(frozen=True)
class Tower:
    """A column: the CLIP's registered model and the SiCLIP student's (model, its ``siclip`` section); None for the
    converted transformers ViT, which is built at run time."""

    model: str | None
    student: str | None = None
    student_siclip: dict | None = None


TOWERS: dict[str, Tower] = {
    "MobileCLIP-tiny (hybrid)": Tower("mobileclip_tiny", "siclip_tiny", None),
    "CNN tower": Tower("clip_cnn_tiny", "clip_cnn_tiny", {"convert": ["text"]}),
    "ViT-tiny": Tower("clip_vit_tiny", "clip_vit_tiny", {}),
    CONVERTED: Tower(None),
}


@dataclass(frozen=True)
class Sizes:
    """The run's sizes: the registered towers' image and text overrides (beside ``image_size``), the transformers CLIP's
    text tower, batch and timing rounds."""

    image_size: int = 64
    batch: int = 32
    rounds: int = 30
    warmup: int = 2
    mci: dict = dataclasses.field(default_factory=dict)  # MobileCLIP-tiny's and the CNN tower's stages
    vit: dict = dataclasses.field(default_factory=dict)  # ViT-tiny: the registered preset (width 96, 6 blocks, 3 heads, patch 8)
    text: dict = dataclasses.field(default_factory=dict)  # MobileCLIP-tiny's text tower (width 128, 4 layers, 4 heads, 32 tokens)
    hf_text: dict = dataclasses.field(default_factory=lambda: {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                                                               "num_attention_heads": 4, "max_position_embeddings": 32})  # fmt: skip


SMOKE = Sizes(image_size=32, batch=4, rounds=2, warmup=0, mci={"layers": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
              vit={"width": 48, "layers": 1, "heads": 3}, text={"layers": 1, "width": 32, "heads": 2},
              hf_text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "max_position_embeddings": 32})  # fmt: skip


def image_overrides(tower: Tower, sizes: Sizes) -> dict:
    family = sizes.vit if tower.model == "clip_vit_tiny" else sizes.mci
    return {"image_size": sizes.image_size, **family}


def embedded_words_tokenizer():
    """A transformers fast tokenizer with the embedded world's word vocabulary (siclip's ``embedded`` tokenizer: the
    same words, ids, start and end tokens, lower-cased, punctuation split off), built offline. CLIP's own BPE would do
    as well but makes every converted file carry, and every load parse, a 49,408-token vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from siclip.data import create_tokenizer

    words = create_tokenizer("embedded").words
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<sot> $A <eot>", special_tokens=[(w, vocab[w]) for w in ("<sot>", "<eot>")])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<sot>", eos_token="<eot>")


def save_transformers_clip(directory: Path, sizes: Sizes, seed: int = 0) -> str:
    """A random ``transformers.CLIPModel`` whose vision tower has ViT-tiny's shape at ``sizes`` (what ``clip_vit_tiny``
    builds), saved as its users save one (``save_pretrained``): weights, tokenizer (:func:`embedded_words_tokenizer`)
    and image processor. Returns its spec, ``hf:DIR``."""
    import transformers

    from siclip.models import get_model_config

    vit = get_model_config("clip_vit_tiny", image={"image_size": sizes.image_size, **sizes.vit}).image
    torch.manual_seed(seed)
    tokenizer = embedded_words_tokenizer()
    text = transformers.CLIPTextConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **sizes.hf_text)  # fmt: skip
    vision = transformers.CLIPVisionConfig(hidden_size=vit.width, intermediate_size=int(vit.width * vit.mlp_ratio), num_hidden_layers=vit.layers,
                                           num_attention_heads=vit.heads, image_size=vit.image_size, patch_size=vit.patch_size)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=128)
    transformers.CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = sizes.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(directory)
    return f"hf:{directory}"


def convert_transformers_clip(spec: str, path: Path) -> str:
    """``spec``'s every encoder layer (vision and text) converted to SAS-P and saved as a converted file, as
    ``siclip convert --model hf:DIR --sharing none`` writes one; returns its path."""
    from siclip.interop.converted import ConvertedRecipe, architecture_of, convert, load_original, original_preprocess, save_converted

    original = load_original(spec)
    blocks = [name for name, module in original.named_modules() if type(module).__name__ == "CLIPEncoderLayer"]
    recipe = ConvertedRecipe(origin=spec, architecture=architecture_of(spec, original), blocks=blocks,
                             preprocess=original_preprocess(spec, original).to_dict())  # fmt: skip
    convert(original, recipe)
    return str(save_converted(original, recipe, path))


def cell_config(strategy: str, tower_name: str, sizes: Sizes, work: Path, converted: tuple[str, str] | None) -> TrainConfig:
    """The run a cell measures: the row's strategy on the column's tower (a teacher saved under ``work`` for the student row)."""
    from siclip.models import create_model, save_checkpoint

    fields = dict(STRATEGIES[strategy])
    data = DataConfig(num_train=2 * sizes.batch, batch_size=sizes.batch, **fields.pop("data", {}))
    tower = TOWERS[tower_name]
    if tower.model is None:  # the converted transformers CLIP; its original is the student's teacher
        model, overrides, teacher = converted[1], {}, converted[0]
    else:
        overrides = {"image": image_overrides(tower, sizes), **({"text": sizes.text} if sizes.text else {})}
        model, teacher = tower.model, None
        if strategy == STUDENT_ROW:
            path = work / f"teacher_{tower.model}.pt"
            if not path.exists():
                torch.manual_seed(0)
                save_checkpoint(create_model(tower.model, **overrides), path)
            model, teacher = tower.student, str(path)
            if tower.student_siclip is not None:
                overrides["siclip"] = tower.student_siclip
    if strategy != STUDENT_ROW:
        teacher = None
    return TrainConfig(model=model, model_overrides=overrides, teacher=teacher, data=data, out_dir=str(work / "unused"), evaluate=False,
                       device="cpu", precision="float32", warmup_steps=1, **fields)  # fmt: skip


@dataclass
class Cell:
    strategy: str
    tower: str
    works: str
    gflops_per_step: float = math.nan
    images_per_s: float = math.nan
    step_ms: float = math.nan
    loss_terms: tuple[str, ...] = ()
    error: str = ""


def build_cell(config: TrainConfig):
    """``(task, loader, batch, step, last)`` of ``config``'s run (a ValueError: refused): ``step()`` is one optimiser step
    on the loader's first batch, ``last`` its loss terms."""
    check_strategies(config)
    torch.manual_seed(config.seed)
    inputs = prepare_run(config, student_model_config(config))
    task = build_task(config, inputs).train()
    loader = build_data(config, inputs, task.student.preprocess.size, 0, 1)
    (batch,) = first_batches(loader, 1)
    optimizer = create_optimizer(task, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
                                 inherited=task.inherited_parameters(), inherited_lr_scale=config.inherited_lr_scale)  # fmt: skip
    params = [p for p in task.parameters() if p.requires_grad]
    last: dict = {}

    def step() -> None:
        terms = forward_terms(task, batch, bf16=False)
        backward_and_step(terms["total"], optimizer, params, grad_clip=config.grad_clip)
        last.update(terms)

    return task, loader, batch, step, last


def refusal(err: Exception) -> str:
    """The project's own message, its first clause (the table cell; the JSON keeps all of it)."""
    first = str(err).strip().splitlines()[0]
    return "refused: " + first.split(": ")[0]


def run(sizes: Sizes, *, timed: bool, work: Path, progress=print) -> tuple[list[Cell], list[dict]]:
    """Every cell built, stepped once and counted; then (``timed``) every working cell and loader timed in one interleaved run."""
    spec = save_transformers_clip(work / "hf_clip", sizes)
    converted = (spec, convert_transformers_clip(spec, work / "converted.pt"))
    cells, steps, loaders = [], {}, {}
    for strategy in STRATEGIES:
        for tower in TOWERS:
            cell = Cell(strategy, tower, works="")
            try:
                config = cell_config(strategy, tower, sizes, work, converted)
                task, loader, batch, step, last = build_cell(config)
            except ValueError as err:  # a combination refused by design, with the project's reason
                cell.works, cell.error = refusal(err), str(err)
                cells.append(cell)
                progress(f"  {strategy} × {tower}: {cell.works}")
                continue
            cell.gflops_per_step = measure_step_flops(task, [batch], device=torch.device("cpu")) / 1e9
            step()
            cell.loss_terms = tuple(sorted(last))
            finite = all(bool(torch.isfinite(v).all()) for v in last.values())
            cell.works = "yes" if finite else "NO: non-finite loss " + ", ".join(k for k, v in last.items() if not torch.isfinite(v).all())
            cells.append(cell)
            steps[(strategy, tower)] = step
            for policy, row in DATA_POLICIES.items():
                if row == strategy and policy not in loaders:
                    loaders[policy] = lambda loader=loader: first_batches(loader, 1)
            progress(f"  {strategy} × {tower}: {cell.works}, {cell.gflops_per_step:.3f} GFLOPs per step")
    loader_rows = []
    if timed:
        progress(f"timing {len(steps)} training steps and {len(loaders)} loaders round-robin: {sizes.rounds} rounds after {sizes.warmup} warm-up")
        entries = {f"step {s} × {t}": fn for (s, t), fn in steps.items()} | {f"loader {p}": fn for p, fn in loaders.items()}
        timings = time_interleaved(entries, torch.device("cpu"), rounds=sizes.rounds, warmup=sizes.warmup)
        for cell in cells:
            key = f"step {cell.strategy} × {cell.tower}"
            if key in timings:
                cell.step_ms = timings[key]["ms"]
                cell.images_per_s = sizes.batch / (cell.step_ms / 1e3)
        for policy in loaders:
            ms = timings[f"loader {policy}"]["ms"]
            loader_rows.append({"data policy": policy, "rows": DATA_POLICIES[policy], "batch ms": ms, "images/s": sizes.batch / (ms / 1e3)})
    return cells, loader_rows


def cell_text(cell: Cell, timed: bool) -> str:
    if cell.works != "yes":
        return cell.works
    speed = f", {cell.images_per_s:.0f} img/s" if timed else ""
    return f"yes, {cell.gflops_per_step:.3g} GFLOPs{speed}"


def markdown(cells: list[Cell], timed: bool) -> str:
    lines = ["| | " + " | ".join(TOWERS) + " |", "|---|" + "---|" * len(TOWERS)]
    for strategy in STRATEGIES:
        row = {c.tower: c for c in cells if c.strategy == strategy}
        lines.append(f"| {strategy} | " + " | ".join(cell_text(row[t], timed) for t in TOWERS) + " |")
    return "\n".join(lines)


def write_out(path: Path, header: dict, cells: list[Cell], loader_rows: list[dict]) -> None:
    """``.csv``: one row per cell; ``.json``: the run's settings, the cells and the loader rows."""
    rows = [dataclasses.asdict(c) | {"loss_terms": " ".join(c.loss_terms)} for c in cells]
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]  # nothing measured: empty
    if path.suffix.lower() == ".csv":
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(buffer.getvalue(), path)
    else:
        write_text_atomic(json.dumps({**header, "cells": rows, "loaders": loader_rows}, indent=2) + "\n", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--batch-size", type=int, default=Sizes.batch, help=f"pairs per training step ({Sizes.batch})")
    parser.add_argument("--image-size", type=int, default=Sizes.image_size, help=f"every tower's input size in pixels ({Sizes.image_size})")
    parser.add_argument("--rounds", type=int, default=Sizes.rounds, help=f"interleaved timing rounds ({Sizes.rounds})")
    parser.add_argument("--flops-only", action="store_true", help="build, step once and count every cell; no timing (off)")
    parser.add_argument("--smoke", action="store_true", help="tiny towers, batch 4, 2 rounds: checks the script, measures nothing (off)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write the cells: .csv (one row per cell) or .json (with the settings and loaders; default: none)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch_size < 2 or args.rounds < 2 or args.image_size < 16 or args.image_size % 8:
        parser.error("--threads ≥ 1, --batch-size ≥ 2, --rounds ≥ 2 and --image-size a multiple of 8 (the ViTs' patch), at least 16")
    if args.out is not None and (args.out.is_dir() or args.out.suffix.lower() not in (".json", ".csv")):
        parser.error(f"--out {args.out}: give a .json or .csv file")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else Sizes(image_size=args.image_size, batch=args.batch_size, rounds=args.rounds)
    timed = not args.flops_only
    header = {"date": str(datetime.date.today()), "device": device_name("cpu"), "torch": torch.__version__, "batch": sizes.batch,
              "image_size": sizes.image_size, "rounds": sizes.rounds if timed else 0, "warmup": sizes.warmup, "mode": "smoke" if args.smoke else "full",
              "precision": "float32"}  # fmt: skip
    print(", ".join(f"{k} {v}" for k, v in header.items()), file=sys.stderr)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="siclip-strategies-") as work:
        cells, loader_rows = run(sizes, timed=timed, work=Path(work), progress=lambda line: print(line, file=sys.stderr, flush=True))
    header["wall_s"] = round(time.perf_counter() - started, 1)
    what = f"images/s of the training step (median of {sizes.rounds} interleaved rounds)" if timed else "no timing (--flops-only)"
    print(f"{header['date']}, {header['device']}, torch {header['torch']}, batch {sizes.batch}, {sizes.image_size} px, float32, "
          f"{'smoke sizes (measures nothing)' if args.smoke else 'embedded world'}; each cell: works, GFLOPs per training step "
          f"(forward + backward), {what}; wall {header['wall_s']} s\n")  # fmt: skip
    print(markdown(cells, timed))
    if loader_rows:
        print("\nThe loader, one process (rendering, augmentation, collation of one batch):\n")
        print("| data policy | rows | batch ms | images/s |\n|---|---|---:|---:|")
        for row in loader_rows:
            print(f"| {row['data policy']} | {row['rows']} | {row['batch ms']:.1f} | {row['images/s']:.0f} |")
    refused = [c for c in cells if c.error]
    if refused:
        print("\nRefusals, in full:")
        for c in refused:
            print(f"- {c.strategy} × {c.tower}: {c.error}")
    if args.out is not None:
        write_out(args.out, header, cells, loader_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
