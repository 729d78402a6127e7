"""Dataclass configurations from the command line: every field by a dotted key, from a config file or ``--set``.

    keys = settings_of(TrainConfig)                       # {"lr": Setting, "data.batch_size": Setting, "objective.feature": …}
    resolver = Resolver(TrainConfig, checks={"data.batch_size": cli.int_at_least(2)})
    config = resolver.from_file(config, "run.yaml")       # a JSON or YAML mapping, nested or dotted; a run's config.json
    config = resolver.from_sets(config, ["objective.feature=4000", "data.batch_size=256"])    # --set KEY=VALUE
    config = resolver.apply(config, {"lr": 1e-3}, "--lr")  # typed values (named flags)
    print(render(config))                                 # one readable block, itself a loadable YAML file

Keys and types come from the dataclasses themselves (``typing.get_type_hints``), so a field someone adds is settable at
once: ``int``, ``float``, ``bool``, ``str``, ``tuple[float, float]``, ``tuple[str, ...]``, ``list``, ``dict``, ``Literal``,
``X | None`` and nested dataclasses (``data.batch_size``). A ``dict`` field takes deeper keys into itself
(``model_overrides.image.image_size=32``). A value is text (``--set``, a YAML scalar PyYAML left as a string such as
``1e-3``) or already typed (JSON, YAML): text is parsed by the field's type (``none`` is None for an optional field;
``a,b`` or a JSON list for a tuple; JSON for a dict); typed values must fit it (an int for a float is widened, nothing
else is converted). ``checks`` add a command's range rules (its argparse types, ``text -> value``) per key, applied to
each scalar. Anything else is a :class:`SettingError`: one line naming where (the file, ``--set``), the key and the
problem; an unknown key suggests the nearest known one.

Help for each field is read from one place, the comments beside it in the dataclass's source: the comment lines just
above it (a block explaining it) and the comment on its line, the latter first.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

from siclip.errors import UserError

__all__ = ["Resolver", "Setting", "SettingError", "field_help", "load_mapping", "parse_value", "render", "settings_of", "type_name"]

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_PRAGMAS = ("fmt:", "noqa", "type:", "pragma")


class SettingError(UserError, ValueError):
    """A setting the user gave that does not exist or does not fit its type or range: ``where: key: problem``."""


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # dotted: "data.batch_size"
    kind: Any  # the field's resolved annotation
    default: Any
    help: str
    open: bool  # a dict field: deeper keys go into the dict


def _is_dataclass_type(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the comments beside each field in ``cls``'s source (see the module docstring); {} when
    the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    fields = [(node.target.id, node.lineno, node.end_lineno) for node in body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]  # fmt: skip
    comments: dict[int, tuple[str, bool]] = {}  # line → (text, alone on its line)
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and not text.startswith(_PRAGMAS):
                comments[token.start[0]] = (text, not lines[token.start[0] - 1][: token.start[1]].strip())
    helps: dict[str, str] = {}
    previous_end = 0
    for name, first, last in fields:
        above = " ".join(comments[n][0] for n in range(previous_end + 1, first) if n in comments and comments[n][1])
        own = " ".join(comments[n][0] for n in range(first, last + 1) if n in comments and not comments[n][1])
        # its own line first (the short answer), then the explanation above it
        helps[name] = f"{own}{'' if own.endswith(('.', ';', ':')) else ';'} {above}" if own and above else own or above
        previous_end = last
    return helps


def settings_of(cls: type, prefix: str = "", defaults: Any = None) -> dict[str, Setting]:
    """Every settable key of the dataclass ``cls`` (nested dataclasses' fields as ``outer.inner``), in field order, with
    its default in ``defaults`` (an instance; ``cls()`` when not given, so a nested config's defaults are its owner's)."""
    defaults = cls() if defaults is None else defaults
    hints, helps, out = typing.get_type_hints(cls), field_help(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, key, default = hints[f.name], f"{prefix}{f.name}", getattr(defaults, f.name)
        text = f.metadata.get("help") or helps.get(f.name, "")
        if _is_dataclass_type(kind):
            out.update(settings_of(kind, f"{key}.", default))
        else:
            out[key] = Setting(key, kind, default, text, open=_origin(kind) is dict)
    return out


def _origin(kind: Any) -> Any:
    return dict if kind is dict else typing.get_origin(kind)


def type_name(kind: Any) -> str:
    """How a type reads in help and messages: ``int``, ``float,float``, ``str,…``, ``int or none``, ``one of a|b``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is tuple:
        return f"{type_name(args[0])},…" if len(args) == 2 and args[1] is Ellipsis else ",".join(type_name(a) for a in args) if args else "list"
    if origin is list:
        return f"{type_name(args[0])},…" if args else "list"
    if kind is dict or origin is dict:
        return "JSON object"
    return getattr(kind, "__name__", str(kind))


def _json(text: str, kind: type, expected: str) -> Any:
    """``text`` read as JSON, which must give a ``kind``; ``ValueError`` saying what was ``expected``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"expected {expected}, got {text!r} ({err.msg})") from None
    if not isinstance(value, kind):
        raise ValueError(f"expected {expected}, got {text!r}")
    return value


def _split_list(text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        return _json(text, list, "a JSON list")
    return [part.strip() for part in text.split(",")] if text else []


def parse_value(kind: Any, value: Any) -> Any:
    """``value`` (text, or typed from JSON/YAML) as the type ``kind`` says; ``ValueError`` naming the problem."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    text = isinstance(value, str)
    if kind is Any or kind is object:
        if text:
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if origin in (Union, types.UnionType):
        optional, options = type(None) in args, [a for a in args if a is not type(None)]
        if value is None or (optional and text and value.strip().lower() in ("none", "null")):
            if optional:
                return None
            raise ValueError(f"expected {type_name(kind)}, got none")
        problems = []
        for option in options:
            try:
                return parse_value(option, value)
            except ValueError as err:
                problems.append(str(err))
        raise ValueError(problems[0] if len(problems) == 1 else f"expected {type_name(kind)}, got {value!r}")
    if value is None:
        raise ValueError(f"expected {type_name(kind)}, got none (this setting is not optional)")
    if origin is Literal:
        for choice in args:
            if value == choice or (text and str(choice) == value.strip()):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value) if text else value if isinstance(value, float) else None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind is float:
        number = _number(value) if text else float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        if text:
            return value
        raise ValueError(f"expected text, got {value!r}")
    if origin in (tuple, list):
        items = _split_list(value) if text else list(value) if isinstance(value, (list, tuple)) else None
        if items is None:
            raise ValueError(f"expected a list ({type_name(kind)}), got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} values ({type_name(kind)}), got {len(items)}: {value!r}")
            return tuple(parse_value(a, item) for a, item in zip(args, items))
        element = args[0] if args else Any
        parsed = [parse_value(element, item) for item in items]
        return tuple(parsed) if origin is tuple else parsed
    if kind is dict or origin is dict:
        if text:
            value = _json(value, dict, 'a JSON object such as {"image": 2.5}')
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping ({type_name(kind)}), got {value!r}")
        key_kind, value_kind = args if args else (Any, Any)
        return {parse_value(key_kind, str(k)) if key_kind is not Any else k: parse_value(value_kind, v) for k, v in value.items()}
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    if _is_dataclass_type(kind):  # a dataclass value in one piece (an optional section, say): its fields from a mapping
        mapping = _json(value, dict, f"a JSON object of {kind.__name__}'s fields") if text else value
        if not isinstance(mapping, dict):
            raise ValueError(f"expected a mapping of {kind.__name__}'s fields, got {value!r}")
        resolver = Resolver(kind)
        return resolver.apply(kind(), resolver.flatten(mapping, kind.__name__), kind.__name__)
    raise ValueError(f"cannot read a {type_name(kind)} from {value!r}")


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def load_mapping(path: str | Path) -> dict:
    """A config file's mapping: JSON, or YAML (``.yaml``/``.yml``, PyYAML); a run's ``summary.json`` gives its ``config``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{path}: not a text file (a config file is JSON or YAML)") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SettingError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SettingError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SettingError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); YAML files end in .yaml or .yml") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingError(f"{path}: expected a mapping of settings at the top, got a {type(data).__name__}")
    return data


class Resolver:
    """Applies settings to configurations of the dataclass ``root`` (see the module docstring)."""

    def __init__(self, root: type, checks: Mapping[str, Callable[[str], Any]] | None = None) -> None:
        self.root, self.settings, self.checks = root, settings_of(root), dict(checks or {})
        self.groups = {".".join(key.split(".")[:n]) for key in self.settings for n in range(1, key.count(".") + 1)}

    # Keys.

    def _setting(self, key: str, where: str) -> tuple[Setting, list[str]]:
        """The setting ``key`` names and the path inside it (keys under a dict field)."""
        if key in self.settings:
            return self.settings[key], []
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in self.settings:
                setting = self.settings[head]
                if setting.open:
                    return setting, parts[cut:]
                raise SettingError(f"{where}: {key}: {head} is a single value ({type_name(setting.kind)}), not a group of settings")
        if key in self.groups:
            raise SettingError(f"{where}: {key}: a group of settings; set its keys ({key}.…) or give it a mapping")
        near = difflib.get_close_matches(key, list(self.settings), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else "; settings are listed by --help"
        raise SettingError(f"{where}: unknown setting {key!r}{hint}")

    def _value(self, setting: Setting, raw: Any, where: str, check: bool = True) -> Any:
        check = self.checks.get(setting.key) if check else None
        try:
            if check is not None and isinstance(raw, str) and setting.open and not raw.lstrip().startswith("{"):
                return check(raw)  # a command's own text form of a mapping (image=2.5,text=1)
            value = parse_value(setting.kind, raw)
            if check is not None and not setting.open:
                value = _checked(value, check)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise SettingError(f"{where}: {setting.key}: {err}") from None
        return value

    def flatten(self, mapping: Mapping, where: str, prefix: str = "") -> dict[str, Any]:
        """Nested or dotted keys of a mapping as dotted keys; a dict field's mapping stays its whole value."""
        if not prefix and "config" in mapping and "config" not in self.settings and isinstance(mapping["config"], dict):
            mapping = mapping["config"]  # a run's summary.json (or a checkpoint's record) holds the config under "config"
        out: dict[str, Any] = {}
        for name, value in mapping.items():
            key = f"{prefix}{name}"
            if not isinstance(name, str):
                raise SettingError(f"{where}: setting names are text, got {name!r}")
            if isinstance(value, dict) and key in self.groups:
                out.update(self.flatten(value, where, f"{key}."))
            else:
                out[key] = value
        return out

    # Application.

    def apply(self, config: Any, values: Mapping[str, Any], where: str, *, check: bool = True) -> Any:
        """``config`` with the dotted ``values`` set (text or typed), each checked (``check``: the command's range rules
        too; named flags were checked by their argparse types); the input is not changed."""
        updates: dict[str, Any] = {}
        for key, raw in values.items():
            setting, inner = self._setting(key, where)
            if inner:
                current = updates.get(setting.key, _get(config, setting.key))
                updates[setting.key] = _set_inside(current, inner, _loose(raw))
            else:
                updates[setting.key] = self._value(setting, raw, where, check)
        try:
            return _replace(config, updates)
        except (ValueError, TypeError) as err:  # a dataclass's own __post_init__ check
            raise SettingError(f"{where}: {', '.join(updates)}: {err}") from None

    def normalized(self, config: Any, where: str = "the configuration") -> Any:
        """``config`` with every field read by its type (an int in a float field becomes a float, a list a tuple), so
        that configurations that mean the same render the same."""
        return self.apply(config, {key: _get(config, key) for key in self.settings}, where, check=False)

    def from_file(self, config: Any, path: str | Path) -> Any:
        return self.apply(config, self.flatten(load_mapping(path), str(path)), str(path))

    def from_sets(self, config: Any, items: list[str]) -> Any:
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise SettingError(f"--set {item}: expected KEY=VALUE, such as objective.feature=4000")
            key = key.strip()
            if key in self.groups:  # a whole group as a JSON object: data={"batch_size": 8}
                try:
                    mapping = json.loads(text)
                except json.JSONDecodeError:
                    mapping = None
                if not isinstance(mapping, dict):
                    raise SettingError(f"--set {key}: a group of settings takes a JSON object, or set its keys ({key}.…)")
                config = self.apply(config, self.flatten(mapping, "--set", f"{key}."), "--set")
            else:
                config = self.apply(config, {key: text}, "--set")
        return config

    def describe(self) -> str:
        """Every key with its type, default and help: the settings list of ``--help``."""
        rows = []
        for s in self.settings.values():
            rows.append(f"  {s.key} ({type_name(s.kind)}, default {_shown(s.default)}){': ' + s.help if s.help else ''}")
        return "\n".join(rows)


def _checked(value: Any, check: Callable[[str], Any]) -> Any:
    """A command's range rule, given each scalar of ``value`` as text (how its argparse type reads it)."""
    if isinstance(value, tuple):
        return tuple(_checked(v, check) for v in value)
    if isinstance(value, list):
        return [_checked(v, check) for v in value]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    return check(str(value))


def _loose(raw: Any) -> Any:
    """A value inside a dict field: JSON when the text reads as JSON (2.5, true, [1, 2]), else the text itself."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _set_inside(mapping: Any, path: list[str], value: Any) -> dict:
    out = dict(mapping) if isinstance(mapping, dict) else {}
    head, rest = path[0], path[1:]
    out[head] = _set_inside(out.get(head), rest, value) if rest else value
    return out


def _replace(config: Any, updates: Mapping[str, Any]) -> Any:
    """``dataclasses.replace`` down the dotted keys (nested dataclasses replaced, never changed in place)."""
    direct = {k: v for k, v in updates.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        if "." in key:
            head, rest = key.split(".", 1)
            nested.setdefault(head, {})[rest] = value
    for head, inner in nested.items():
        direct[head] = _replace(direct.get(head, getattr(config, head)), inner)
    return dataclasses.replace(config, **direct) if direct else config


def _shown(value: Any) -> str:
    """A value as it is written in a config file (JSON scalars and lists, which YAML reads too)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def render(config: Any, indent: str = "") -> str:
    """``config`` as one YAML block, nested dataclasses as nested mappings, one field a line in field order."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{indent}{f.name}:")
            lines.append(render(value, indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {_shown(value)}")
    return "\n".join(lines)
