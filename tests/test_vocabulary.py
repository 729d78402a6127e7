"""One vocabulary across the ``siclip`` commands: every option documented with its default, the same flag for the same
setting in every command, old spellings kept as hidden aliases that say they are old, and no text (help, description,
epilog, the commands' own messages) naming a flag the command it speaks of does not have.

The parsers are the commands' own (``build_parser()`` of each module in :data:`siclip.commands.COMMANDS` and
``STUDIES``), read without running anything, so the test follows the code as it changes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from siclip.commands import COMMANDS, STUDIES

ROOT = Path(__file__).resolve().parent.parent
EVERY = {**COMMANDS, **STUDIES}  # command name → (module, summary); study names do not clash with commands
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# The settings several commands share, each with its one flag; a command's option for one of them (recognised by its
# dest, the last dotted part, "eval_" dropped) must be spelled so.
SHARED = {
    "model spec": ("--model", {"model"}),
    "Apple-layout configuration": ("--apple-model", {"apple_model", "teacher_model"}),
    "calibration caption file": ("--calibration-captions", {"calibration_captions", "calibration_captions_file"}),
    "calibration image folder": ("--calibration-images", {"calibration_images"}),
    "calibration count": ("--calibration-count", {"calibration_count"}),
    "output folder or file": ("--out", {"out", "out_dir", "output"}),
    "device": ("--device", {"device"}),
    "threads": ("--threads", {"threads", "num_threads", "torch_threads"}),
    "seed": ("--seed", {"seed"}),
    "embedded world's seed": ("--world-seed", {"world_seed"}),
    "data source": ("--data", {"data", "source"}),
    "loader workers": ("--workers", {"workers"}),
    "batch size": ("--batch-size", {"batch_size"}),
    "embedded training split": ("--num-train", {"num_train"}),
    "image column": ("--image-key", {"image_key"}),
    "caption column": ("--caption-key", {"caption_key"}),
    "zero-shot set": ("--zeroshot", {"zeroshot"}),
    "retrieval set": ("--retrieval", {"retrieval"}),
    "tokenizer": ("--tokenizer", {"tokenizer"}),
    "vocabulary file": ("--vocab-path", {"vocab_path"}),
    "teacher": ("--teacher", {"teacher"}),
}
CONCEPT = {dest: concept for concept, (_, dests) in SHARED.items() for dest in dests}

# Flags of other programs that texts quote (torchrun's).
FOREIGN = {"--nproc-per-node", "--nproc"}


def parser_of(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"siclip.commands.{EVERY[name][0]}").build_parser()


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def concept_of(dest: str) -> str | None:
    key = dest.split(".")[-1]
    return CONCEPT.get(key.removeprefix("eval_"))


def shown(action: argparse.Action) -> bool:
    return action.help is not argparse.SUPPRESS


def main_flag(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-"))


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: parser_of(name) for name in EVERY}


def test_every_command_has_a_parser_builder():
    for name, (module, _) in EVERY.items():
        assert callable(getattr(importlib.import_module(f"siclip.commands.{module}"), "build_parser", None)), name


def default_said(action: argparse.Action) -> bool:
    """Whether an option's help shows its default (a switch's is off; a missing default is no value to show)."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or default == []:
        return True
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return True
    said = {str(default)}
    if isinstance(default, float):
        said.add(f"{default:g}")
    if isinstance(default, int) and not isinstance(default, bool):
        said.add(f"{default:,}")
    if isinstance(default, (tuple, list)):
        said |= {",".join(map(str, default)), " ".join(map(str, default))}
    return any(value in action.help for value in said)


def test_every_option_has_help_and_its_default(parsers):
    missing, no_default = [], []
    for name, parser in parsers.items():
        for action in options(parser):
            if not shown(action):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                missing.append(where)
            elif not default_said(action):
                no_default.append(f"{where} (default {action.default!r})")
    assert not missing, f"options without help text: {missing}"
    assert not no_default, f"options whose help does not show their default: {no_default}"


def test_the_default_check_can_fail():
    parser = argparse.ArgumentParser()
    quiet = parser.add_argument("--count", type=int, default=64, help="how many")
    said = parser.add_argument("--count-too", type=int, default=64, help="how many (64)")
    zero = parser.add_argument("--zero", type=int, default=0, help="from")
    assert not default_said(quiet) and default_said(said) and not default_said(zero)


def test_the_same_setting_has_the_same_flag_everywhere(parsers):
    spellings: dict[str, dict[str, list[str]]] = {}
    for name, parser in parsers.items():
        for action in options(parser):
            concept = concept_of(action.dest)
            if concept is None or not shown(action):
                continue
            if not action.option_strings:
                spellings.setdefault(concept, {}).setdefault(f"positional {action.dest}", []).append(name)
                continue
            spellings.setdefault(concept, {}).setdefault(main_flag(action), []).append(name)
    clashes = {concept: used for concept, used in spellings.items() if set(used) != {SHARED[concept][0]}}
    assert not clashes, f"settings spelled otherwise than their one flag: {clashes}"
    # and no command gives one flag two settings' meanings across commands (dest differing for one spelling)
    meaning: dict[str, set[str]] = {}
    for name, parser in parsers.items():
        for action in filter(shown, options(parser)):
            for flag in action.option_strings:
                if flag in {f for _, (f, _) in SHARED.items()}:
                    meaning.setdefault(flag, set()).add(concept_of(action.dest) or action.dest)
    assert all(len(m) == 1 for m in meaning.values()), {f: m for f, m in meaning.items() if len(m) > 1}


def test_a_flag_is_a_switch_everywhere_or_takes_a_value_everywhere(parsers):
    """``--report`` is a switch of the studies; a command whose --report took a folder would read the same words
    another way."""
    kinds: dict[str, dict[str, list[str]]] = {}
    for name, parser in parsers.items():
        for action in filter(shown, options(parser)):
            kind = "switch" if action.nargs == 0 else "value"
            for flag in action.option_strings:
                kinds.setdefault(flag, {}).setdefault(kind, []).append(name)
    mixed = {flag: used for flag, used in kinds.items() if len(used) > 1}
    assert not mixed, f"flags that are a switch in one command and take a value in another: {mixed}"


def test_examples_keep_their_line_breaks(parsers):
    """An example continued with a backslash keeps it: a lone ``\\`` at a docstring's line end joins the lines, and
    the example prints as one line with a run of spaces inside ("photos/         --sharing")."""
    joined = {name: [line for line in (p.description or "").splitlines() if re.search(r"[^\s#]\s{3,}--", line.split("#")[0])]
              for name, p in parsers.items()}  # fmt: skip
    assert not any(joined.values()), {name: lines for name, lines in joined.items() if lines}


def test_hidden_aliases_store_into_a_shown_option(parsers):
    for name, parser in parsers.items():
        dests = {a.dest for a in options(parser) if shown(a)}
        for action in options(parser):
            if not shown(action) and action.option_strings:
                assert action.dest in dests, f"{name} {action.option_strings}: an alias of no shown option"


def test_a_renamed_flag_works_and_says_so(capsys):
    from siclip.commands import divergence

    args = divergence.build_parser().parse_args(["--spec", "mobileclip_tiny", "--caption-file", __file__])
    assert args.model == "mobileclip_tiny" and args.calibration_captions == __file__
    err = capsys.readouterr().err
    assert "--spec is now --model" in err and "--caption-file is now --calibration-captions" in err


def command_of(mention: str) -> str | None:
    """The command a mention names: ``siclip train``, ``siclip study data-scale``, ``experiments/evaluate.py``."""
    if mention.startswith("experiments/"):
        script = ROOT / mention
        found = re.search(r"from siclip\.commands\.(\w+) import main", script.read_text()) if script.is_file() else None
        module = found.group(1) if found else None
        return next((n for n, (m, _) in EVERY.items() if m == module), None)
    name = mention.split()[-1]
    return name if name in EVERY else None


MENTION = r"siclip study [a-z-]+|siclip [a-z-]+|experiments/[a-z_]+\.py"
TOKEN = re.compile(rf"(?P<mention>{MENTION})|(?P<flag>{FLAG.pattern})|(?P<open>\()|(?P<close>\))|(?P<tick>`)|(?P<cont>\\\n)"
                   r"|(?P<newline>\n)|(?P<stop>[.;,] )")


def misnamed_flags(text: str, own: str, known: dict[str, set[str]]) -> list[str]:
    """Flags in ``text`` that the command they are said of does not have. After a mention of a command (``siclip
    train``, ``experiments/evaluate.py``) its flags follow, to the end of the clause: a ``.``, ``;`` or ``,``, the
    parenthesis or backquote around the mention closing, or the line's end (unless continued by ``\\`` or inside
    the parenthesis); elsewhere the flags are ``own``'s. A flag ending in ``-`` (``--lambda-*``) names a family."""
    bad, said_of, depth, closes = [], own, 0, None
    for token in TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "mention":
            command = command_of(token.group())
            if command is not None:
                ticked = token.start() > 0 and text[token.start() - 1] == "`"
                said_of, closes = command, ("tick" if ticked else depth)
        elif kind == "flag":
            flag = token.group()
            family = flag.endswith("-") and any(f.startswith(flag) for f in known[said_of])
            if flag not in known[said_of] and flag not in FOREIGN and not family:
                bad.append(f"{flag} (said of siclip {said_of})")
        elif kind == "open":
            depth += 1
        elif kind == "close":
            depth = max(0, depth - 1)
            if isinstance(closes, int) and depth < closes:
                said_of, closes = own, None
        elif kind == "tick" and closes == "tick":
            said_of, closes = own, None
        elif kind == "stop" or (kind == "newline" and closes in (None, 0, "tick")):
            said_of, closes = own, None
    return bad


def test_help_texts_name_only_real_flags(parsers):
    known = {name: flags_of(p) for name, p in parsers.items()}
    bad = {}
    for name, parser in parsers.items():
        texts = [parser.description or "", parser.epilog or "", *(a.help or "" for a in options(parser) if shown(a))]
        found = [flag for text in texts for flag in misnamed_flags(text, name, known)]
        if found:
            bad[name] = sorted(set(found))
    assert not bad, f"help texts naming flags their command does not have: {bad}"


def string_literals(path: Path) -> list[str]:
    """Every string in a module's source, an f-string whole (its fields as ``{}``), so a flag keeps its context."""
    tree = ast.parse(path.read_text())
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    strings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            strings.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            strings.append(node.value)
    return strings


def test_messages_in_the_commands_name_only_real_flags(parsers):
    """Every string in a command's module (its refusals and hints) names flags that command (or the one it mentions) has."""
    known = {name: flags_of(p) for name, p in parsers.items()}
    bad = {}
    for name, (module, _) in EVERY.items():
        strings = string_literals(ROOT / "siclip" / "commands" / f"{module}.py")
        found = [flag for text in strings for flag in misnamed_flags(text, name, known)]
        if found:
            bad[name] = sorted(set(found))
    assert not bad, f"messages naming flags their command does not have: {bad}"


# Modules below the commands whose messages reach the user through these commands: a flag they name must be one every
# such command has (a hint of siclip.eval is read by evaluate and train alike).
SPOKEN_THROUGH = {
    "siclip/eval/benchmarks.py": ("evaluate", "train"),
    "siclip/data/tokenizer.py": ("train",),
    "siclip/data/loader.py": ("train",),
    "siclip/data/captioning.py": ("caption",),
    "siclip/data/quality.py": ("filter",),
    "siclip/data/calibration.py": ("divergence", "convert"),
    "siclip/settings.py": ("train",),
    "siclip/train/inputs.py": ("train",),
    "siclip/train/task.py": ("train",),
    "siclip/train/loop.py": ("train",),
    "siclip/train/resume.py": ("train",),
    "siclip/train/state.py": ("train",),
    "siclip/train/guard.py": ("train",),
    "siclip/train/evaluation.py": ("train",),
    "siclip/analysis/study.py": ("data-scale", "scaling-down"),
    "siclip/deploy/export.py": ("export",),
}


@pytest.mark.parametrize("module", sorted(SPOKEN_THROUGH))
def test_messages_below_the_commands_name_only_real_flags(parsers, module):
    known = {name: flags_of(p) for name, p in parsers.items()}
    speakers = SPOKEN_THROUGH[module]
    shared = set.intersection(*(known[name] for name in speakers))
    own = " and ".join(speakers)
    found = [flag for text in string_literals(ROOT / module) for flag in misnamed_flags(text, own, {**known, own: shared})]
    assert not found, f"{module}: messages naming flags its commands do not have: {sorted(set(found))}"


def test_the_checker_catches_a_flag_that_is_not_there():
    known = {"train": {"--teacher", "--wikd"}, "evaluate": {"--model"}}
    assert misnamed_flags("pass --teacher SPEC", "train", known) == []
    assert misnamed_flags("(--tokenizer clip)", "evaluate", known) == ["--tokenizer (said of siclip evaluate)"]
    assert misnamed_flags("then siclip train --teacher X --model Y", "evaluate", known) == ["--model (said of siclip train)"]


def _listed(output: str) -> set[str]:
    rows = output.split("commands:", 1)[1]
    return {line.split()[0] for line in rows.splitlines() if line.startswith("  ") and line.split()}


def test_siclip_help_lists_every_command():
    siclip = Path(sys.executable).with_name("siclip")
    command = [str(siclip)] if siclip.exists() else [sys.executable, "-m", "siclip"]
    top = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    assert _listed(top) == {*COMMANDS, "study"}
    studies = subprocess.run([*command, "study", "--help"], capture_output=True, text=True, check=True).stdout
    assert _listed(studies) == set(STUDIES)


def test_old_positional_forms_still_parse_and_say_so(tmp_path, capsys):
    from siclip.commands import caption, import_mobileclip

    weights = tmp_path / "mobileclip_s0.pt"
    weights.write_bytes(b"")
    args = import_mobileclip.parse([str(weights), str(tmp_path / "out.pt"), "--model", "mobileclip_tiny"])
    assert (args.model, args.out, args.apple_model) == (str(weights), str(tmp_path / "out.pt"), "mobileclip_tiny")
    err = capsys.readouterr().err
    assert "--model NAME is now --apple-model NAME" in err and "SOURCE OUT are now --model SOURCE --out OUT" in err
    new = import_mobileclip.parse(["--model", str(weights), "--out", str(tmp_path / "out.pt")])
    assert (new.model, new.apple_model) == (str(weights), "mobileclip_s0") and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        import_mobileclip.parse(["--out", str(tmp_path / "out.pt")])
    assert "the following arguments are required: --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        caption.main([])
    assert "the following arguments are required: --data" in capsys.readouterr().err
