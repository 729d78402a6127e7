"""Evaluation on the user's own benchmark sets, in CLIP_benchmark's tasks and result layout.

- Zero-shot classification (:func:`zero_shot_dataset`, :func:`zero_shot_classification`): images from
  a folder with one subfolder per class (named after its class, else classes in sorted folder order)
  or a CSV/TSV with ``filepath,label`` (a label is a class index or a class name); class names from a file (one per
  line, or a JSON list, in class order) or a standard set by name (``imagenet1k``, ``cifar10``, ``cifar100``, whose
  folders may be named by WordNet id, index or name, :mod:`siclip.eval.named`); templates from a file (one per line,
  each with a ``{}`` or ``{c}`` placeholder) or CLIP's sets by name, CLIP's 80-template ensemble by default. Reports
  top-1, top-5 (capped at the number of classes) and per-class accuracy; ``mean_per_class_recall`` is their mean over
  the classes present.
- Retrieval (:func:`retrieval_dataset`, :func:`retrieval`): a CSV/TSV whose rows repeat an image
  path once per caption (COCO style; the caption column and any extra caption columns count), or
  WebDataset shards whose samples carry their captions (``.txt`` and the ``.json`` list). Recall@1/5/10
  both ways, with CLIP_benchmark's names: ``image_retrieval_recall@k`` (a caption finds its image) and
  ``text_retrieval_recall@k`` (an image finds any of its captions).

Each result is a record ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` as
CLIP_benchmark writes it; :func:`write_record` saves one as ``{dataset}_{task}.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from siclip.data import RawSample, SampleError
from siclip.data.sources import image_files
from siclip.data.tabular import is_table, read_table
from siclip.data.tokenizer import check_unknown_rate, read_string_list
from siclip.storage import write_text_atomic

from .metrics import per_class_accuracy, topk_accuracy
from .named import CLASSNAME_SETS, TEMPLATE_SETS, BenchmarkClasses, builtin_classnames, builtin_templates, comparable
from .run import retrieval_eval, zero_shot_logits
from .templates import CLIP_TEMPLATES


class ImageFileSource:
    """A :class:`~siclip.data.sources.Source` over image files listed by path (no captions)."""

    def __init__(self, paths: Sequence[Path], keys: Sequence[str]) -> None:
        self.paths, self.keys = list(paths), list(keys)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> RawSample:
        try:
            data = self.paths[index].read_bytes()
        except OSError as err:
            raise SampleError(self.keys[index], f"missing image file {self.paths[index]} ({type(err).__name__})") from None
        return RawSample(self.keys[index], data, None)


def read_classnames(path: str | Path) -> list[str]:
    """Class names in class order: a JSON list, or one per line; or, when no such file exists, a standard set's
    (``imagenet1k``, ``cifar10``, ``cifar100``: a :class:`~siclip.eval.named.BenchmarkClasses`, which also knows its
    classes' folder names)."""
    if not Path(path).exists() and str(path) in CLASSNAME_SETS:
        return builtin_classnames(str(path))
    names = read_string_list(path, "class names")
    if not all(n.strip() for n in names):
        raise ValueError(f"{path}: expected a non-empty list of non-empty class names")
    return [n.strip() for n in names]


def read_templates(path: str | Path | None) -> list[str]:
    """Prompt templates, one per line, each with one placeholder for the class name, ``{}`` or CLIP_benchmark's
    ``{c}`` (read as ``{}``); a prompt set of CLIP's by name (``imagenet1k``, ``imagenet1k-simple``, ``cifar``) when no
    such file exists; CLIP's 80-template ensemble when ``path`` is None."""
    if path is None:
        return list(CLIP_TEMPLATES)
    if not Path(path).exists() and str(path) in TEMPLATE_SETS:
        return builtin_templates(str(path))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file not found: {path} (or a built-in set: {', '.join(TEMPLATE_SETS)})")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") + t.count("{c}") != 1]
    if not templates or bad:
        raise ValueError(f"{path}: every template needs exactly one {{}} placeholder (or {{c}}) for the class name; wrong: {bad[:3]}")
    return [t.replace("{c}", "{}") for t in templates]


def folder_labels(root: Path, folders: Sequence[Path], names: Sequence[str]) -> list[int]:
    """The class index of each (sorted) class folder.

    Folders named after the class names (``_`` read as a space, case ignored) take the class of their
    name, in whatever order the names are listed; otherwise class i is the i-th folder in sorted order.
    A folder named after one class but placed, by that order, on another is refused: its every image
    would be scored against the wrong name.
    """
    folder_names = [comparable(f.name) for f in folders]
    index = {comparable(n): i for i, n in enumerate(names)}
    if sorted(folder_names) == sorted(index) and len(index) == len(names):
        return [index[n] for n in folder_names]
    given = [comparable(n) for n in names]
    clashes = [(f.name, names[i], names[index[n]]) for i, (f, n) in enumerate(zip(folders, folder_names)) if n in index and given[i] != n]
    if clashes:
        examples = "; ".join(f"folder {f!r} would be class {given!r}, not {own!r}" for f, given, own in clashes[:3])
        raise ValueError(
            f"{root}: class folders are matched to class names in sorted folder order, and {len(clashes)} folder(s) are named "
            f"after a different class ({examples}). Name every folder after its class, or list the class names in sorted "
            f"folder order: {[f.name for f in folders][:10]}"
        )
    return list(range(len(folders)))


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of ``root`` in class order: sorted by name, or by number when every name is an integer
    (``2`` before ``10``, which a string sort would swap), said once when the two orders differ."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root}: expected one subfolder of images per class, found none")
    if all(f.name.isdigit() for f in folders):
        numeric = sorted(folders, key=lambda f: (int(f.name), f.name))
        if numeric != folders:
            warnings.warn(f"{root}: class folders are all numbers, so they take class names in numeric order "
                          f"({', '.join(f.name for f in numeric[:4])}, …), not as text sorts them", stacklevel=3)  # fmt: skip
        folders = numeric
    return folders


def zero_shot_dataset(path: str | Path, classnames: Sequence[str] | None = None, *, image_key: str = "filepath",
                      label_key: str = "label") -> tuple[ImageFileSource, torch.Tensor, list[str]]:  # fmt: skip
    """``(source, labels, class names)`` from a class-per-subfolder directory or a ``filepath,label`` table.

    Without ``classnames`` the classes are named after the folders (``_`` read as a space) or, for a
    table, are its sorted distinct labels. With them, folders are matched to names by
    :func:`folder_labels`.
    """
    path = Path(path)
    if isinstance(classnames, BenchmarkClasses):
        return _standard_dataset(path, classnames, image_key=image_key, label_key=label_key)
    if path.is_dir():
        folders = class_folders(path)
        names = list(classnames) if classnames is not None else [f.name.replace("_", " ") for f in folders]
        if len(names) != len(folders):
            raise ValueError(f"{path}: {len(folders)} class folders but {len(names)} class names (names follow the sorted folder order)")
        files, labels = [], []
        for folder, label in zip(folders, folder_labels(path, folders, names)):
            found = image_files(folder)
            if not found:
                raise ValueError(f"{folder}: a class folder without images")
            files += found
            labels += [label] * len(found)
        keys = [str(f.relative_to(path)) for f in files]
        return ImageFileSource(files, keys), torch.tensor(labels), names
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot data not found: {path} (a folder of class subfolders or a CSV/TSV)")
    if not is_table(path):
        raise ValueError(f"{path}: zero-shot data must be a folder or a .csv/.tsv table with columns {image_key},{label_key}")
    files, keys, raw_labels = _labelled_rows(path, image_key, label_key)
    if all(label.isdigit() for label in raw_labels):
        labels = [int(label) for label in raw_labels]
        names = list(classnames) if classnames is not None else [str(i) for i in range(max(labels) + 1)]
        bad = sorted({label for label in labels if label >= len(names)})
        if bad:
            raise ValueError(f"{path}: label indices {bad[:5]} exceed the {len(names)} class names")
    else:
        names = list(classnames) if classnames is not None else sorted(set(raw_labels))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({label for label in raw_labels if label not in index})
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} are not among the class names {names[:10]}")
        labels = [index[label] for label in raw_labels]
    return ImageFileSource(files, keys), torch.tensor(labels), names


def _labelled_rows(path: Path, image_key: str, label_key: str) -> tuple[list[Path], list[str], list[str]]:
    """A ``filepath,label`` table's image files (relative to the table), their keys (the paths as written) and labels."""
    header, rows = read_table(path, "\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    missing = [c for c in (image_key, label_key) if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {header}")
    column = {name: i for i, name in enumerate(header)}
    keys = [row[column[image_key]] for row in rows]
    return [path.parent / key for key in keys], keys, [row[column[label_key]].strip() for row in rows]


def _standard_dataset(path: Path, classes: BenchmarkClasses, *, image_key: str, label_key: str) -> tuple[ImageFileSource, torch.Tensor, list[str]]:
    """A local copy of a standard set: each class folder (or label) names its class by id, index or name; any subset of
    the classes may be there, and every class of the set stays a candidate."""
    if path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{path}: expected one subfolder of images per class, found none")
        found = [(folder, classes.index_of(folder.name)) for folder in folders]
        unknown = [folder.name for folder, index in found if index is None]
        if unknown:
            raise ValueError(f"{path}: class folder(s) {unknown[:5]} are not classes of {classes.name}: {classes.describe()}")
        seen: dict[int, str] = {}
        for folder, index in found:
            if index in seen:
                raise ValueError(f"{path}: folders {seen[index]!r} and {folder.name!r} both name class {index} ({classes[index]!r}) "
                                 f"of {classes.name}")  # fmt: skip
            seen[index] = folder.name
        files, labels = [], []
        for folder, index in found:
            images = image_files(folder)
            if not images:
                raise ValueError(f"{folder}: a class folder without images")
            files += images
            labels += [index] * len(images)
        return ImageFileSource(files, [str(f.relative_to(path)) for f in files]), torch.tensor(labels), list(classes)
    if not path.is_file() or not is_table(path):
        raise FileNotFoundError(f"zero-shot data not found: {path} (a folder of class subfolders or a CSV/TSV)")
    files, keys, raw_labels = _labelled_rows(path, image_key, label_key)
    labels = [classes.index_of(label) for label in raw_labels]
    unknown = sorted({raw for raw, label in zip(raw_labels, labels) if label is None})
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not classes of {classes.name}: {classes.describe()}")
    return ImageFileSource(files, keys), torch.tensor(labels), list(classes)


def retrieval_dataset(path: str | Path, *, image_key: str = "filepath", caption_key: str = "title",
                      caption_columns: Sequence[str] = ()) -> tuple[object, list[list[str]]]:  # fmt: skip
    """``(source, captions)`` with ``captions[i]`` every caption of image ``i`` (grouped by image path)."""
    path = Path(path)
    if is_table(path):
        if not path.is_file():
            raise FileNotFoundError(f"retrieval data not found: {path}")
        header, rows = read_table(path, "\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
        missing = [c for c in (image_key, caption_key, *caption_columns) if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the file has {header}")
        column = {name: i for i, name in enumerate(header)}
        grouped: dict[str, list[str]] = {}
        for row in rows:
            texts = [row[column[c]].strip() for c in (caption_key, *caption_columns)]
            grouped.setdefault(row[column[image_key]], []).extend(t for t in texts if t)
        keys = list(grouped)
        source = ImageFileSource([path.parent / k for k in keys], keys)
        captions = [grouped[k] for k in keys]
    else:
        from siclip.data import ShardSource

        source = ShardSource(path)
        captions = []
        for i in range(len(source)):
            sample = source.load(i)
            captions.append([c for c in sample.captions() if c])
    empty = [source.keys[i] if hasattr(source, "keys") else str(i) for i, c in enumerate(captions) if not c][:5]
    if empty:
        raise ValueError(f"{path}: images without any caption: {empty}")
    return source, captions


def benchmark_record(dataset: str, model: str, task: str, metrics: dict, pretrained: str = "") -> dict:
    """One result in CLIP_benchmark's layout."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics, "language": "en"}


def dataset_name(path: str | Path) -> str:
    """A benchmark's name: the folder or file name without its suffix."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


# What to do about prompts the tokenizer cannot read, in flags both `siclip evaluate` and `siclip train` have (the
# model's tokenizer is fixed when it is evaluated; the prompts are the templates filled with the class names).
PROMPT_HINT = ("Give --classnames and --templates whose words the tokenizer knows (one prompt per line with {}), or pass "
               "--max-unknown-rate P to accept more")  # fmt: skip
FOLDER_NAMES_HINT = ("The class names are the folder names (no --classnames was given): give --classnames FILE naming the classes "
                     "in words, or --templates whose words the tokenizer knows, or pass --max-unknown-rate P to accept more")  # fmt: skip
RETRIEVAL_HINT = ("Evaluate a model whose tokenizer knows these words (siclip train --tokenizer words builds one from your "
                  "captions), or pass --max-unknown-rate P to accept more")  # fmt: skip


def check_prompts(tokenizer, classnames: Sequence[str], templates: Sequence[str], max_unknown_rate: float | None, where: str,
                  *, folder_names: bool = False) -> None:  # fmt: skip
    """Refuse prompts (each template with each class name) whose tokens the tokenizer maps to ``<unk>`` above
    ``max_unknown_rate``: an unknown word silently drops out of every class embedding (None: no check).
    ``folder_names``: the class names are the set's folder names, which the hint then says."""
    if max_unknown_rate is not None:
        prompts = [t.format(name) for name in classnames for t in templates]
        hint = FOLDER_NAMES_HINT if folder_names else PROMPT_HINT
        check_unknown_rate(tokenizer, prompts, max_unknown_rate, where, what="prompt", hint=hint)


def check_captions(tokenizer, captions: Sequence[Sequence[str]], max_unknown_rate: float | None, where: str) -> None:
    """Refuse retrieval captions (every caption of every image) whose tokens the tokenizer maps to ``<unk>`` above
    ``max_unknown_rate`` (None: no check), with the hint that names what to do."""
    if max_unknown_rate is not None:
        check_unknown_rate(tokenizer, [c for caps in captions for c in caps], max_unknown_rate, where, hint=RETRIEVAL_HINT)


def zero_shot_classification(model, tokenizer, path: str | Path, *, classnames: Sequence[str] | None = None,
                             templates: Sequence[str] | None = None, batch_size: int = 256,
                             max_unknown_rate: float | None = 0.05) -> dict:  # fmt: skip
    """CLIP_benchmark's zero-shot metrics on the user's set: ``acc1``, ``acc5``, ``mean_per_class_recall``
    and ``per_class_accuracy`` (class name → accuracy). Prompts are checked first (:func:`check_prompts`)."""
    source, labels, names = zero_shot_dataset(path, classnames)
    templates = list(templates) if templates is not None else list(CLIP_TEMPLATES)
    check_prompts(tokenizer, names, templates, max_unknown_rate, f"{path} (zero-shot prompts)", folder_names=classnames is None)
    was_training = model.training
    model.eval()
    logits = zero_shot_logits(model, tokenizer, source, names, templates, batch_size=batch_size)
    model.train(was_training)
    labels = labels.to(logits.device)
    top = topk_accuracy(logits, labels, ks=(1, 5))
    per_class = per_class_accuracy(logits, labels, len(names)).cpu()
    present = ~per_class.isnan()
    return {
        "acc1": top["top1"],
        "acc5": top["top5"],
        "mean_per_class_recall": per_class[present].mean().item(),
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(names) if present[i]},
        "images": len(source),
        "classes": len(names),
    }


def retrieval(model, tokenizer, path: str | Path, *, caption_columns: Sequence[str] = (), batch_size: int = 256,
              max_unknown_rate: float | None = 0.05) -> dict:  # fmt: skip
    """CLIP_benchmark's retrieval metrics: ``image_retrieval_recall@k`` and ``text_retrieval_recall@k``, k = 1, 5, 10,
    and the queries whose result hangs on tied scores (``*_ties@k``). Captions are checked for unknown tokens first."""
    source, captions = retrieval_dataset(path, caption_columns=caption_columns)
    check_captions(tokenizer, captions, max_unknown_rate, f"{path} (retrieval captions)")
    was_training = model.training
    model.eval()
    recall = retrieval_eval(model, tokenizer, source, captions, batch_size=batch_size, ties=True)
    model.train(was_training)
    metrics, ties = {}, {}
    for k in (1, 5, 10):
        metrics[f"image_retrieval_recall@{k}"] = recall[f"text_to_image_R@{k}"]
        metrics[f"text_retrieval_recall@{k}"] = recall[f"image_to_text_R@{k}"]
        # Queries whose recall@k hangs on the order of exactly tied scores (e.g. images sharing one caption).
        ties[f"image_retrieval_ties@{k}"] = recall[f"text_to_image_ties@{k}"]
        ties[f"text_retrieval_ties@{k}"] = recall[f"image_to_text_ties@{k}"]
    return {**metrics, **ties, "images": len(captions), "captions": sum(len(c) for c in captions)}


def write_record(record: dict, out_dir: str | Path) -> Path:
    """``out_dir/{dataset}_{task}.json``, written whole (temporary file, then rename)."""
    return write_text_atomic(json.dumps(record, indent=2) + "\n", Path(out_dir) / f"{record['dataset']}_{record['task']}.json")


def run_benchmarks(model, tokenizer, *, model_name: str, zeroshot: str | Path | None = None, classnames: str | Path | None = None,
                   templates: str | Path | None = None, retrieval_data: str | Path | None = None, out_dir: str | Path | None = None,
                   batch_size: int = 256, max_unknown_rate: float | None = 0.05) -> list[dict]:  # fmt: skip
    """The evaluations asked for, as CLIP_benchmark records (also written to ``out_dir`` when given).

    The files are read before any image is embedded, so a wrong class names or templates file fails at once.
    """
    names = read_classnames(classnames) if classnames is not None else None
    prompts = read_templates(templates)
    records = []
    if zeroshot is not None:
        metrics = zero_shot_classification(model, tokenizer, zeroshot, classnames=names, templates=prompts, batch_size=batch_size,
                                           max_unknown_rate=max_unknown_rate)  # fmt: skip
        records.append(benchmark_record(dataset_name(zeroshot), model_name, "zeroshot_classification", metrics))
    if retrieval_data is not None:
        metrics = retrieval(model, tokenizer, retrieval_data, batch_size=batch_size, max_unknown_rate=max_unknown_rate)
        records.append(benchmark_record(dataset_name(retrieval_data), model_name, "zeroshot_retrieval", metrics))
    if out_dir is not None:
        for record in records:
            write_record(record, out_dir)
    return records


def headline(records: list[dict]) -> dict[str, float]:
    """``{"dataset/metric": value}`` for the scalar fractions of each record (for summaries and tables)."""
    skip = {"images", "classes", "captions"}
    return {f"{r['dataset']}/{k}": v for r in records for k, v in r["metrics"].items() if isinstance(v, float) and k not in skip}
