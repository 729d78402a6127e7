"""Standard benchmarks by name: class names and CLIP's prompt sets for ImageNet-1k, CIFAR-10 and CIFAR-100.

    read_classnames("imagenet1k")   # CLIP's curated ImageNet names in ImageNet's class order (sorted WordNet ids)
    read_templates("cifar")         # CLIP's 18 CIFAR prompts; "imagenet1k": its 80, "imagenet1k-simple": 7

(both in :mod:`siclip.eval.benchmarks`, which read a file when one of that name exists and a set named here otherwise).
A standard set's classes know the folder names that identify them, so a user's local copy of the dataset works as it
is laid out: class folders named by WordNet id (``n01440764``), by class index (``0`` … ``999``) or by class name
(``tench``, ``aquarium_fish``); any subset of the classes may be present, and the classifier keeps all of them (top-1
among 1,000 for ImageNet). The data are lists of strings in ``siclip/eval/data/*.json``; where they come from and
their licences: ``siclip/eval/data/README.md``.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from importlib import resources
from pathlib import Path

CLASSNAME_SETS = ("imagenet1k", "cifar10", "cifar100")
# Prompt sets: CLIP's ImageNet ensemble (80) and its 7-prompt subset, CLIP's CIFAR prompts (18; cifar10/cifar100 name them too).
TEMPLATE_SETS = {"imagenet1k": "imagenet1k", "imagenet1k-simple": "imagenet1k-simple", "cifar": "cifar", "cifar10": "cifar",
                 "cifar100": "cifar"}  # fmt: skip


def _data(name: str) -> dict:
    return json.loads(resources.files("siclip.eval").joinpath("data", f"{name}.json").read_text(encoding="utf-8"))


class BenchmarkClasses(list):
    """A standard set's class names (a list, in class order) that also maps the names a dataset's folders or label
    column may carry to class indices: ``lookup["n01440764"] == lookup["0"] == lookup["tench"] == 0``."""

    def __init__(self, name: str, names: list[str], ids: list[str] | None = None) -> None:
        super().__init__(names)
        self.name = name
        keys: dict[str, int] = {}
        for index, class_name in enumerate(names):
            for key in (str(index), comparable(class_name), *([ids[index]] if ids else [])):
                keys.setdefault(key, index)  # an index or id wins over a (rarely) repeated name
        self.lookup = keys

    def index_of(self, label: str) -> int | None:
        """The class a folder name or label stands for: a WordNet id, an index or a name (``_`` read as a space)."""
        label = label.strip()
        return self.lookup.get(label, self.lookup.get(comparable(label)))

    def describe(self) -> str:
        ids = "WordNet ids (n01440764 …), " if self.name == "imagenet1k" else ""
        return f"{self.name}'s {len(self)} classes are named by {ids}class index (0 … {len(self) - 1}) or class name"


def comparable(name: str) -> str:
    """A class name as folders and labels are compared: ``_`` read as a space, spacing and case ignored."""
    return " ".join(name.replace("_", " ").split()).casefold()


@cache
def _classes(name: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    data = _data(name)
    return tuple(data["classnames"]), tuple(data["ids"]) if "ids" in data else None


def builtin_classnames(name: str) -> BenchmarkClasses:
    """The class names of a standard set (:data:`CLASSNAME_SETS`), in its class order."""
    if name not in CLASSNAME_SETS:
        raise ValueError(f"unknown class-name set {name!r}; built in: {', '.join(CLASSNAME_SETS)}")
    names, ids = _classes(name)
    return BenchmarkClasses(name, list(names), list(ids) if ids else None)


def builtin_templates(name: str) -> list[str]:
    """A prompt set of CLIP's (:data:`TEMPLATE_SETS`), each template with one ``{}``."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; built in: {', '.join(TEMPLATE_SETS)}")
    return list(_templates()[TEMPLATE_SETS[name]])


@cache
def _templates() -> dict[str, tuple[str, ...]]:
    return {name: tuple(items) for name, items in _data("templates").items()}


def _spec(text: str, names, what: str) -> str:
    if Path(text).is_file() or text in names:
        return text
    if Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} is not a file (expected a {what} file or one of {', '.join(names)})")
    raise argparse.ArgumentTypeError(f"{what} file not found: {text} (or a built-in set: {', '.join(names)})")


def classnames_spec(text: str) -> str:
    """An argparse type: a class names file, or a standard set's name (:data:`CLASSNAME_SETS`); a file of that name wins."""
    return _spec(text, CLASSNAME_SETS, "class names")


def templates_spec(text: str) -> str:
    """An argparse type: a templates file, or a prompt set's name (:data:`TEMPLATE_SETS`); a file of that name wins."""
    return _spec(text, tuple(TEMPLATE_SETS), "templates")
