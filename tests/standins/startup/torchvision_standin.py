"""Test environment only: timm and open_clip import with a stand-in for torchvision, which nothing else sees.

timm and open_clip import torchvision at import time (data transforms, ``FrozenBatchNorm2d``); their model classes,
which siclip's interoperability tests use, do not need it. Here torchvision cannot load (its registry wheel is a CUDA
build beside the CPU torch, or it is not installed). Putting a stand-in on the path for good would fool transformers,
which imports torchvision's video and transform modules as soon as ``find_spec("torchvision")`` finds one.

So :func:`install` adds an import hook: when ``timm`` or ``open_clip`` is first imported and the real torchvision
does not import, the stand-in (``tests/standins/torchvision``) is on the path for that import only, and its modules
leave ``sys.modules`` afterwards (timm's and open_clip's references to them stay). ``sitecustomize.py`` beside this
file installs the hook in every Python process started with this directory on PYTHONPATH (the tests' subprocesses).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

STANDINS = str(Path(__file__).resolve().parents[1])
NEEDS_TORCHVISION = ("timm", "open_clip")


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def real_torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except (ImportError, RuntimeError, OSError):  # e.g. "operator torchvision::nms does not exist"
        _drop_torchvision()
        return False


class _Imported(importlib.abc.Loader):
    """Hands the import system a module this hook has already imported."""

    def __init__(self, module) -> None:
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


class StandinImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.busy = False
        self.real: bool | None = None

    def find_spec(self, name, path=None, target=None):
        if name not in NEEDS_TORCHVISION or self.busy:
            return None
        if self.real is None:
            self.real = real_torchvision_imports()
        if self.real:
            return None
        if importlib.util.find_spec("transformers") is not None:
            # open_clip imports transformers, whose "is torchvision available?" answer is computed once and cached:
            # compute it now, while no torchvision is in sight, so transformers never takes the stand-in for one.
            from transformers.utils import import_utils

            import_utils.is_torchvision_available()
        self.busy = True
        sys.path.insert(0, STANDINS)
        try:
            module = importlib.import_module(name)
        finally:
            sys.path.remove(STANDINS)
            self.busy = False
            _drop_torchvision()
        return importlib.util.spec_from_loader(name, _Imported(module), origin=getattr(module, "__file__", None))


def install() -> None:
    if not any(isinstance(finder, StandinImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, StandinImport())
