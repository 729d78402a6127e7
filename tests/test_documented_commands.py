"""Every command and Python example in README.md and docs/*.md runs, so the documents cannot drift from the code.

The test reads the fenced code blocks of the documents: each shell line (``siclip …``, ``make …``, ``python
experiments/…``, ``python benchmarks/…``; ``\\`` continuations joined, ``#`` comments dropped) and each ``python``
block. It runs them in document order (README first, then ``docs/`` by name; a command written twice runs once) in one
scratch folder holding the files the examples name: a digits CSV and held-out folder (scikit-learn's scans), captions
and photos for calibration, small random transformers CLIP and BLIP models saved as their users save them, embedded
world shards, and a demo teacher in ``runs/demo`` trained once for the whole module.

- Documented runs of minutes run smoke-sized: :data:`SMOKE_VALUES` replaces the values of some flags where a command
  has them and :data:`SMOKE_ADDED` adds flags where it lacks them, both keyed by the command (``siclip train``…). The
  test prints each command as it runs it, smoke arguments included.
- Commands that need a GPU, Apple's weights, a download, or that run for minutes by design are in :data:`SKIP` with
  the reason; nothing else is skipped.
- A documented line that is neither a command the test knows how to run nor in :data:`SKIP` fails the test, and so
  does a table entry no document uses any more: the tables cannot drift either.
- Every relative link in the documents resolves to a file, and a ``#anchor`` to one of its headings.

``siclip`` commands run in this process (``siclip.commands.main``, what the installed console script calls: a fresh
interpreter per command would spend most of the test importing torch); ``siclip --help`` runs the installed script
itself, and scripts (``python benchmarks/…``) run as processes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Why a documented command does not run here. Keyed by the command as documented, on one line as shlex.join writes it.
SKIP: dict[str, str] = {
    "make demo": "the whole main job (minutes on 2 cores); tests/test_demo.py runs its driver on tiny presets",
    "make test": "the whole test suite, this file included",
    "make bench": "times every micro-benchmark (minutes); the suite runs each once, untimed",
    "make blocks": "times the block micro-benchmarks (minutes); benchmarks/bench_blocks.py runs them once",
    "pip install torch==2.13.0": "installs packages (a download)",
    "pip install -e '.[interop,deploy,augment]'": "installs packages (a download)",
    "siclip evaluate --model mobileclip_s0.pt --zeroshot imagenet/val --classnames imagenet1k --templates imagenet1k":
        "Apple's weights and ImageNet (downloads)",
    "siclip train --preset paper-s0 --teacher mobileclip_s0.pt --data data/shards_syn --out runs/paper_s0":
        "Apple's weights and a GPU (batch 1536); tests/test_train_cli.py checks the preset's configuration",
    "siclip train --model siclip_s0 --teacher mobileclip_s0.pt --data data/shards --batch-size 1536 --workers 8 "
    "--lambda-feature 4000 --lambda-relation 1 --lambda-interactive 1 --lambda-pair-matching 0.1 --epochs 32 --lr 1e-3 "
    "--weight-decay 0.1 --betas 0.9 0.98 --eps 1e-6 --warmup-steps 10000 --grad-clip 1 --precision auto "
    "--fuse-frozen-towers --log-every 50 --checkpoint-every 500 --out runs/paper_s0":
        "Apple's weights and a GPU (batch 1536); tests/test_train_cli.py checks that this line resolves as the preset",
    "siclip train --config experiments/paper_s0.yaml": "Apple's weights and a GPU (batch 1536); tests/test_train_cli.py",
    "siclip caption --data data/shards --captioner open_clip:coca_ViT-L-14:coca_vit_l14.pt --out data/shards_syn":
        "open_clip's CoCa ViT-L/14 weights (a download); tests/test_captioners.py captions with a small random CoCa",
    "siclip caption --data data/shards --captioner open_clip:coca_ViT-L-14:coca_vit_l14.pt --out data/shards_coca":
        "open_clip's CoCa ViT-L/14 weights (a download); tests/test_captioners.py captions with a small random CoCa",
    "siclip train --model siclip_tiny --teacher open_clip:ViT-B-32:vit_b32.pt --no-inherit --wikd --data data/train.csv "
    "--tokenizer words --image-size 32 --out runs/from_open_clip":
        "open_clip's ViT-B/32 weights (a download); tests/test_interop_clip.py trains against a small random open_clip CLIP",
    "siclip divergence --preset demo --snapshots 8 --out runs/divergence --run-dir runs/demo":
        "trains the whole demo preset in segments (minutes; no smoke size); tests/test_snapshots.py runs the driver small",
    "siclip study ablation --preset cpu": "tens of training runs: minutes even at --preset smoke, which tests/test_ablation.py runs",
    "siclip study data-scale --preset cpu": "tens of training runs: minutes even at --preset smoke, which tests/test_data_scale.py runs",
    "siclip study scaling-down --preset cpu --claims 1,4 --seeds 3":
        "tens of training runs: minutes even at --preset smoke, which tests/test_scaling_down.py runs",
    "python benchmarks/gpu_train_step.py --out runs/step": "a CUDA device (batch 1536)",
    "python benchmarks/gpu_train_step.py --smoke --device cpu --out runs/step_smoke":
        "tests/test_train_step.py runs this very line (test_gpu_train_step_script_smoke)",
    "python benchmarks/cpu_inference.py --threads 2": "times MobileCLIP-S0 and SiCLIP-S0 (minutes); tests/test_deploy.py runs the script's --smoke",
    "siclip flops": "builds and counts every registered model, the S0 pair included (minutes on 2 busy cores); "
                    "tests/test_divergence.py runs this command (experiments/flops_report.py) and checks its table",
    "siclip study data-scale --preset cpu --report": "reads the finished runs of the study above, which is skipped",
    "siclip study scaling-down --preset cpu --report": "reads the finished runs of the study above, which is skipped",
}

# Smoke sizes. SMOKE_VALUES: flags whose documented value is replaced where the command has them; SMOKE_ADDED: flags
# added where the command lacks them. Keyed by the command; "siclip train on the embedded world" applies to a
# `siclip train` without --data (or with --data embedded), whose default is 2,000 samples and a 1,000-item evaluation.
SMOKE_VALUES: dict[str, dict[str, str]] = {
    "siclip train": {"--epochs": "1", "--batch-size": "16", "--budget-tflops": "0.01", "--num-train": "64"},
    "siclip filter": {"--num-train": "64"},
    "siclip caption": {"--num-captions": "2"},
}
SMOKE_ADDED: dict[str, list[tuple[str, str | None]]] = {
    "siclip train": [("--batch-size", "16")],
    # The embedded world's evaluation (100 classes × its templates, 1,000 images) is most of a smoke run's time: the
    # runs on your data (data/train.csv) evaluate on data/test, these do not.
    "siclip train on the embedded world": [("--num-train", "16"), ("--epochs", "1"), ("--no-eval", None)],
    "siclip caption": [("--max-new-tokens", "4")],
    "siclip cache-teacher": [("--num-train", "32")],
    "python benchmarks/cpu_inference.py": [("--smoke", None), ("--batch", "1")],
}
# Documented commands the module's fixture runs (smoke-sized) to prepare what later examples read.
PREPARED = ["siclip train --preset demo"]


# ---------------------------------------------------------------------------------------------------------------------
# Reading the documents


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block of a markdown text (indented fences included)."""
    return [(m.group(2).strip().lower(), m.group(3)) for m in re.finditer(r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", text, re.M | re.S)]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, one space between words."""
    commands = []
    for line in re.sub(r"\\\n", " ", body).splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def documented() -> tuple[list[str], list[tuple[str, str]]]:
    """Every shell command (first occurrence, document order) and every ``(document, python block)``."""
    commands, blocks = [], []
    for path in DOCUMENTS:
        for language, body in fenced_blocks(path.read_text()):
            if language in ("bash", "sh", "shell", "console"):
                commands += [c for c in shell_commands(body) if c not in commands]
            elif language == "python":
                blocks.append((path.name, body))
    return commands, blocks


def command_name(words: list[str]) -> str:
    """The key of the smoke tables: ``siclip train``, ``siclip study data-scale``, ``python benchmarks/x.py``."""
    if words[0] == "siclip":
        return " ".join(words[:3] if words[1:2] == ["study"] else words[:2])
    return " ".join(words[:2])


def smoke(words: list[str]) -> list[str]:
    """``words`` with the smoke table's values (see :data:`SMOKE_VALUES`, :data:`SMOKE_ADDED`)."""
    name = command_name(words)
    words = list(words)
    for i, word in enumerate(words[:-1]):
        if word in SMOKE_VALUES.get(name, {}) and not words[i + 1].startswith("--"):
            words[i + 1] = SMOKE_VALUES[name][word]
    tables = [name]
    if name == "siclip train" and ("--data" not in words or words[words.index("--data") + 1] == "embedded"):
        tables.append("siclip train on the embedded world")
    for table in tables:
        for flag, value in SMOKE_ADDED.get(table, []):
            if flag == "--epochs" and "--budget-tflops" in words:  # a budget sets the steps; epochs would be refused
                continue
            present = [words[i + 1].split("=")[0] for i, w in enumerate(words[:-1]) if w == "--set"] if flag == "--set" else words
            if (value.split("=")[0] if flag == "--set" else flag) not in present:
                words += [flag] if value is None else [flag, value]
    return words


# ---------------------------------------------------------------------------------------------------------------------
# The files the examples name


def write_examples(root: Path) -> None:
    """What the documents' examples read, small: ``data/train.csv`` over 64 digit scans (filepath,title,syn0,syn1),
    ``data/test/<digit>/`` (3 per class), class names and templates, ``captions.txt`` and ``photos/`` for
    calibration, ``models/clip`` (transformers CLIP), ``models/blip-base`` (transformers BLIP) and ``data/shards``
    (16 embedded-world samples)."""
    from sklearn.datasets import load_digits

    from foreign_models import save_hf_blip, save_hf_clip
    from siclip.data import EmbeddedConfig, EmbeddedSource, write_shards

    digits = load_digits()
    data = root / "data"
    rows, counts = ["filepath,title,syn0,syn1"], dict.fromkeys(range(10), 0)
    for i, (scan, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.rint(scan / 16 * 255).astype(np.uint8)
        name = NAMES[label]
        if counts[label] < 3:  # held out
            counts[label] += 1
            (data / "test" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(data / "test" / str(label) / f"{i:04d}.png")
        elif len(rows) <= 64:
            (data / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(data / "images" / f"{i:04d}.png")
            rows.append(f"images/{i:04d}.png,a handwritten digit {name},a scan of the number {name},the digit {name} written by hand")
        if len(rows) > 64 and min(counts.values()) == 3:
            break
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    (data / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (data / "templates.txt").write_text("a handwritten digit {}\na scan of the number {}\n")
    (root / "captions.txt").write_text("".join(f"a scan of the number {n}\n" for n in NAMES))
    (root / "photos").mkdir()
    for i in range(6):
        Image.fromarray(np.rint(digits.images[i] / 16 * 255).astype(np.uint8)).convert("RGB").resize((40, 40)).save(root / "photos" / f"{i}.png")
    save_hf_clip(root / "models" / "clip")
    save_hf_blip(root / "models" / "blip-base")
    write_shards(EmbeddedSource(EmbeddedConfig(num_train=16, image_size=64), "train"), data / "shards", samples_per_shard=16)


def run_siclip(words: list[str], cwd: Path) -> int:
    """``siclip ARGS`` in this process, in ``cwd``: the installed script's entry point, ``sys.argv`` restored."""
    from siclip.commands import main

    argv, here = sys.argv[:], Path.cwd()
    try:
        os.chdir(cwd)
        return main(words[1:])
    finally:
        os.chdir(here)
        sys.argv = argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The scratch folder of every example, with a demo teacher in ``runs/demo`` (the demo preset, smoke-sized)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("documented")
    write_examples(root)
    commands, _ = documented()
    for command in PREPARED:
        assert command in commands, f"PREPARED names {command!r}, which no document holds"
        assert run_siclip(smoke(shlex.split(command)), root) == 0, command
    return root


# ---------------------------------------------------------------------------------------------------------------------
# The tests


def test_the_tables_name_documented_commands_only():
    """An entry for a command no document holds any more is stale: the documents changed and the table did not."""
    commands, _ = documented()
    stale = sorted(set(SKIP) - set(commands))
    assert not stale, f"SKIP names commands no document holds: {stale}"
    names = {command_name(c.split()) for c in commands}
    unused = sorted((set(SMOKE_VALUES) | set(SMOKE_ADDED)) - names - {"siclip train on the embedded world"})
    assert not unused, f"smoke tables name commands no document holds: {unused}"


def test_readme_is_short_and_every_relative_link_resolves():
    """README under 200 lines and without issue numbers (its readers are users); no link in the documents broken."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert not re.search(r"issue[ -]?#?\d", readme, re.I), "the README speaks of issue numbers"
    broken = []
    for path in DOCUMENTS + [ROOT / "CHANGELOG.md"]:
        text = path.read_text()
        prose = re.sub(r"^([ \t]*)```.*?^\1```", "", text, flags=re.M | re.S)  # links inside code blocks are code
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in headings(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def headings(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"^([ \t]*)```.*?^\1```", "", path.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_the_installed_command_lists_the_subcommands():
    """``siclip --help`` through the console script ``pip install`` puts beside the interpreter."""
    script = Path(sys.executable).with_name("siclip")
    script = script if script.exists() else shutil.which("siclip")
    assert script, "no siclip console script beside the interpreter or on PATH (pip install -e . installs it)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("train", "evaluate", "convert", "divergence", "export", "study"):
        assert f"\n  {name} " in done.stdout


@pytest.mark.slow
def test_every_documented_command_runs(workspace, capsys):
    """Each documented shell command, in document order, exits 0 (smoke-sized where the tables say so)."""
    commands, _ = documented()
    failures = []
    for command in commands:
        if command in SKIP or command in PREPARED or command == "siclip --help":  # the fixture / the test above ran these
            continue
        words = shlex.split(command)
        started = time.perf_counter()
        if words[0] == "siclip":
            status = run_siclip(smoke(words), workspace)
        elif words[0] == "python" and words[1].split("/")[0] in ("experiments", "benchmarks"):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            done = subprocess.run([sys.executable, str(ROOT / words[1]), *smoke(words)[2:]], cwd=workspace, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            status = done.returncode
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
        else:
            failures.append(f"{command}: not a command this test runs (siclip, python experiments/ or benchmarks/); "
                            "make it one, or add it to SKIP with the reason")  # fmt: skip
            continue
        with capsys.disabled():
            print(f"\n[exit {status}, {time.perf_counter() - started:.0f} s] {shlex.join(smoke(words))}")
        if status != 0:
            failures.append(f"{command} (ran as: {shlex.join(smoke(words))}): exit status {status}\n{capsys.readouterr().err[-1500:]}")
    assert not failures, "documented commands that failed:\n" + "\n".join(failures)


@pytest.mark.slow
def test_every_documented_python_example_runs(workspace, monkeypatch):
    """Each ``python`` block of the documents runs as written, in the examples' folder, after the commands above
    (``runs/digits/model.pt`` is the documented digits run)."""
    _, blocks = documented()
    monkeypatch.chdir(workspace)
    if not (workspace / "runs" / "digits" / "model.pt").exists():  # this test alone: the run the examples load
        train = next(c for c in documented()[0] if c.startswith("siclip train") and "--out runs/digits" in c)
        assert run_siclip(smoke(shlex.split(train)), workspace) == 0
    for document, body in blocks:
        try:
            exec(compile(body, f"<{document} example>", "exec"), {"__name__": "__documented__"})
        except Exception as error:  # noqa: BLE001 - named with its document, then raised
            raise AssertionError(f"a python example of {document} failed:\n{body}") from error
