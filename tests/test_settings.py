"""siclip.settings: dataclass fields from text, config files and dotted overrides, help from the source's comments."""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from siclip.cli import int_at_least
from siclip.settings import Resolver, SettingError, field_help, load_mapping, parse_value, render, settings_of


@dataclass(frozen=True)
class Inner:
    weight: float = 1.0  # how much it counts
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    count: int = 2  # how many
    # A block above a field explains it.
    rate: float = 0.5
    name: str | None = None  # optional text
    flag: bool = False
    pair: tuple[float, float] = (0.9, 0.98)  # two numbers
    keys: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # free-form
    inner: Inner = field(default_factory=lambda: Inner(weight=0.0))  # fmt: skip


def test_values_are_read_by_their_annotation_from_text_and_from_typed_values():
    cases = [(int, "3", 3), (int, 4, 4), (int, "1e4", 10_000), (float, "1e-3", 1e-3), (float, 2, 2.0), (bool, "yes", True),
             (bool, "off", False), (bool, True, True), (str | None, "none", None), (str | None, "x", "x"), (int | None, None, None),
             (tuple[float, float], "0.9,0.95", (0.9, 0.95)), (tuple[float, float], [1, 2], (1.0, 2.0)),
             (tuple[str, ...], "a, b", ("a", "b")), (tuple[str, ...], '["a,b"]', ("a,b",)), (tuple[str, ...], "", ()),
             (dict, '{"image": 2.5}', {"image": 2.5}), (Literal["a", "b"], "b", "b"), (list[int], "1,2", [1, 2])]  # fmt: skip
    for kind, raw, expected in cases:
        got = parse_value(kind, raw)
        assert got == expected and type(got) is type(expected), (kind, raw, got)
    for kind, raw, problem in [(int, "1.5", "whole number"), (int, True, "whole number"), (float, "nan", "finite"), (float, "x", "finite"),
                               (bool, "maybe", "true or false"), (str, 3, "text"), (int, None, "not optional"),
                               (tuple[float, float], "1", "2 values"), (Literal["a", "b"], "c", "one of a, b"), (dict, "[1]", "JSON object"), (dict, 3, "mapping")]:  # fmt: skip
        with pytest.raises(ValueError, match=problem):
            parse_value(kind, raw)


@dataclass
class WithOptionalSection:
    section: Inner | None = None  # off unless given


def test_an_optional_section_takes_a_mapping_and_renders_back(tmp_path):
    resolver = Resolver(WithOptionalSection)
    config = resolver.from_sets(WithOptionalSection(), ['section={"mode": "b"}'])
    assert config.section == Inner(mode="b")
    (tmp_path / "again.yaml").write_text(render(config))
    assert resolver.from_file(WithOptionalSection(), tmp_path / "again.yaml") == config
    assert resolver.from_sets(config, ["section=none"]).section is None
    with pytest.raises(SettingError, match=r"section: .*mode: expected one of a, b"):
        resolver.from_sets(config, ['section={"mode": "z"}'])


def test_help_comes_from_the_comments_beside_each_field():
    helps = field_help(Outer)
    assert helps["count"] == "how many" and helps["rate"] == "A block above a field explains it."
    assert helps["extra"] == "free-form" and helps["keys"] == "" and "fmt" not in helps["inner"]
    keys = settings_of(Outer)
    assert list(keys) == ["count", "rate", "name", "flag", "pair", "keys", "extra", "inner.weight", "inner.mode"]
    assert keys["inner.weight"].default == 0.0 and keys["inner.weight"].help == "how much it counts"  # the owner's default
    assert keys["extra"].open and not keys["count"].open


def test_every_training_setting_has_help_and_a_type_the_command_line_reads():
    from siclip.train import TrainConfig

    keys = settings_of(TrainConfig)
    assert {"lr", "data.batch_size", "objective.feature", "weight_decay", "warmup_steps", "accumulation", "precision"} <= set(keys)
    missing = [k for k, s in keys.items() if not s.help]
    assert not missing, f"fields without a comment (their --help text): {missing}"
    resolver = Resolver(TrainConfig)
    assert resolver.normalized(TrainConfig()) == resolver.normalized(resolver.normalized(TrainConfig()))


def test_files_sets_and_their_errors(tmp_path):
    resolver = Resolver(Outer, checks={"count": int_at_least(2)})
    (tmp_path / "run.yaml").write_text("count: 5\nrate: 1e-3\ninner:\n  mode: b\npair: [0.1, 0.2]\nextra: {a: 1}\n")
    config = resolver.from_file(Outer(), tmp_path / "run.yaml")
    assert config == Outer(count=5, rate=1e-3, pair=(0.1, 0.2), extra={"a": 1}, inner=Inner(weight=0.0, mode="b"))
    config = resolver.from_sets(config, ["inner.weight=3", "extra.b.c=2", "keys=x,y", "name=none", 'inner={"mode": "a"}'])
    assert config.inner == Inner(3.0, "a") and config.extra == {"a": 1, "b": {"c": 2}} and config.keys == ("x", "y") and config.name is None
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3, "config": {"count": 7}}))
    assert resolver.from_file(Outer(), tmp_path / "summary.json").count == 7  # a run's summary gives its config
    (tmp_path / "dotted.json").write_text(json.dumps({"inner.weight": 2}))
    assert resolver.from_file(Outer(), tmp_path / "dotted.json").inner.weight == 2.0
    bad = tmp_path / "bad.json"
    for content, problem in [({"cuont": 3}, r"bad\.json: unknown setting 'cuont' \(did you mean count\?\)"),
                             ({"count": 1}, r"bad\.json: count: must be at least 2, got 1"),
                             ({"inner": {"mode": "z"}}, r"bad\.json: inner\.mode: expected one of a, b, got 'z'"),
                             ({"rate": {"x": 1}}, r"rate: expected a finite number"), ({"inner": 3}, r"inner: a group of settings")]:  # fmt: skip
        bad.write_text(json.dumps(content))
        with pytest.raises(SettingError, match=problem):
            resolver.from_file(Outer(), bad)
    for item, problem in [("count", "expected KEY=VALUE"), ("rate.x=1", "rate is a single value"), ("pair=1,2,3", "pair: expected 2 values"),
                          ("inner=[1]", "JSON object")]:  # fmt: skip
        with pytest.raises(SettingError, match=problem):
            resolver.from_sets(Outer(), [item])
    bad.write_text("[1, 2]")
    with pytest.raises(SettingError, match="expected a mapping of settings"):
        load_mapping(bad)
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(SettingError, match=r"broken\.yaml: not valid YAML"):
        load_mapping(tmp_path / "broken.yaml")


def test_a_rendered_config_is_a_yaml_file_that_gives_it_back(tmp_path):
    resolver = Resolver(Outer)
    config = resolver.from_sets(Outer(), ["rate=1e-6", "name=a: b", "keys=x", "extra.deep.list=[1, 2]", "flag=true"])
    (tmp_path / "again.yaml").write_text(render(config))
    assert resolver.from_file(Outer(), tmp_path / "again.yaml") == config
    (tmp_path / "again.json").write_text(json.dumps(dataclasses.asdict(config)))  # as a run saves it
    assert resolver.from_file(Outer(), tmp_path / "again.json") == config
