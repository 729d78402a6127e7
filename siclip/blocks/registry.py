"""Registries keyed by module type, filled by siclip and by the interoperability modules of foreign libraries.

A lookup walks the type's MRO, so a subclass finds its base's entry. When nothing is registered for a type
defined in a foreign package ``lib`` (``type.__module__`` starts with ``lib.``) and siclip has a module
``siclip.interop.lib``, that module is imported once and the lookup retried: it registers what siclip knows about
``lib`` (block converters, attention readers, CLIP adapters). A foreign library is therefore never imported by
siclip itself; its interop module loads the first time one of its objects meets a registry.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Generic, TypeVar

Entry = TypeVar("Entry")

_IMPORTED_PLUGINS: set[str] = set()


def import_interop_for(cls: type) -> list[str]:
    """Import ``siclip.interop.<lib>`` for every foreign package ``lib`` in ``cls``'s MRO that has one;
    returns the names of the modules imported by this call."""
    imported = []
    for base in cls.__mro__:
        library = base.__module__.split(".")[0]
        name = f"siclip.interop.{library}"
        if library in ("siclip", "builtins", "torch") or name in _IMPORTED_PLUGINS:
            continue
        _IMPORTED_PLUGINS.add(name)
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            imported.append(name)
    return imported


class TypeRegistry(Generic[Entry]):
    """``{type: entry}`` with MRO lookup and interop modules imported on a miss (see the module docstring)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.entries: dict[type, Entry] = {}

    def register(self, cls: type) -> Callable[[Entry], Entry]:
        """Decorator: ``@registry.register(BlockType)`` over the entry (a function) for that type."""

        def wrap(entry: Entry) -> Entry:
            self.entries[cls] = entry
            return entry

        return wrap

    def _find(self, cls: type) -> Entry | None:
        for base in cls.__mro__:
            if base in self.entries:
                return self.entries[base]
        return None

    def find(self, obj_or_type) -> Entry | None:
        """The entry of ``obj_or_type``'s type (or of its nearest registered base), or None."""
        cls = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
        entry = self._find(cls)
        if entry is None and import_interop_for(cls):
            entry = self._find(cls)
        return entry

    def known(self) -> list[str]:
        """Registered type names, sorted (for error messages)."""
        return sorted(t.__qualname__ for t in self.entries)

    def __contains__(self, obj_or_type) -> bool:
        return self.find(obj_or_type) is not None
