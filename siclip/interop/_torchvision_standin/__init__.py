"""timm and open_clip import where torchvision cannot: a stand-in for its import-time names that only they see.

timm and open_clip import torchvision at import time (data transforms, ``FrozenBatchNorm2d``); their model classes,
which siclip converts, reads and evaluates, do not need it. Beside a CPU torch, torchvision often cannot load: its
registry wheel is a CUDA build (``operator torchvision::nms does not exist``), or it is not installed (``make setup``
installs timm and open_clip without it, so the CPU torch stays). Putting a stand-in on the path for good would fool
transformers, which imports torchvision's video and transform modules as soon as ``find_spec("torchvision")`` finds
one.

So :func:`install` (run by :mod:`siclip.interop`) adds an import hook that does nothing until ``timm`` or
``open_clip`` is first imported. Then, if the real torchvision imports, it steps aside for good. If not, it warns once
(:class:`TorchvisionStandinWarning`, naming why), puts the stand-in (``torchvision/`` beside this file) on the path for
that import only, and takes its modules out of ``sys.modules`` afterwards (timm's and open_clip's references to them
stay). Anything a model would really need from torchvision raises, naming the stand-in.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path

STANDIN_PATH = str(Path(__file__).resolve().parent)  # holds torchvision/
NEEDS_TORCHVISION = ("timm", "open_clip")


class TorchvisionStandinWarning(UserWarning):
    """torchvision cannot be imported; timm and open_clip import with siclip's stand-in for its import-time names."""


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def torchvision_failure() -> str | None:
    """Why the real torchvision cannot be imported (None when it can)."""
    if importlib.util.find_spec("torchvision") is None:
        return "it is not installed"
    try:
        importlib.import_module("torchvision")
        return None
    except (ImportError, RuntimeError, OSError, AttributeError) as err:  # e.g. "operator torchvision::nms does not exist"
        _drop_torchvision()
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__


class _WithStandin(importlib.abc.Loader):
    """The library's own loader, run with the stand-in on the path (and its modules dropped afterwards); anything else
    (resource readers, ``get_source``) is the library loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        sys.path.insert(0, STANDIN_PATH)
        try:
            self.loader.exec_module(module)
        finally:
            sys.path.remove(STANDIN_PATH)
            _drop_torchvision()


class StandinImport(importlib.abc.MetaPathFinder):
    """The import hook (see the module docstring)."""

    def __init__(self) -> None:
        self.busy = False
        self.failure: str | None = None
        self.checked = False
        self.warned = False

    def find_spec(self, name, path=None, target=None):
        if name not in NEEDS_TORCHVISION or self.busy:
            return None
        if not self.checked:
            self.checked = True
            self.failure = torchvision_failure()
        if self.failure is None:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)  # the library's own spec, from the other finders
        finally:
            self.busy = False
        if spec is None or spec.loader is None:  # not installed: let the import fail as it would
            return None
        if importlib.util.find_spec("transformers") is not None:
            # open_clip imports transformers, whose "is torchvision available?" answer is computed once and cached:
            # compute it now, while no torchvision is in sight, so transformers never takes the stand-in for one.
            from transformers.utils import import_utils

            import_utils.is_torchvision_available()
        if not self.warned:
            self.warned = True
            warnings.warn(f"torchvision cannot be imported ({self.failure}); {name} imports with siclip's stand-in for torchvision's "
                          "import-time names (its models work, its torchvision transforms do not; siclip preprocesses images itself). "
                          "Install a torchvision built for this torch to use the real one.", TorchvisionStandinWarning, stacklevel=2)  # fmt: skip
        spec.loader = _WithStandin(spec.loader)
        return spec


def install() -> StandinImport:
    """Add the hook to ``sys.meta_path`` once (it decides at timm's or open_clip's first import); returns it."""
    for finder in sys.meta_path:
        if isinstance(finder, StandinImport):
            return finder
    finder = StandinImport()
    sys.meta_path.insert(0, finder)
    return finder
