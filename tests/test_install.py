"""``pip install .`` into a fresh virtual environment puts ``siclip`` on its PATH, with the package data it reads.

The environment is new and gets a built (non-editable) siclip; the dependencies (torch and the rest) are lent by this
environment's site-packages through a ``.pth`` path, so the test needs neither the network nor a second torch. A
``.pth`` path adds a directory to ``sys.path`` without processing the ``.pth`` files inside it, so this checkout's
editable install is not visible there: the ``siclip`` the new environment imports is the one pip built.
"""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from siclip.commands import COMMANDS, STUDIES

ROOT = Path(__file__).resolve().parents[1]


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_pip_install_puts_the_siclip_command_on_a_fresh_environments_path(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    lent = Path(sysconfig.get_paths()["purelib"])  # this environment's torch, numpy, setuptools …
    (site_packages(venv) / "lent_dependencies.pth").write_text(f"{lent}\n")
    # the build uses the lent setuptools (the one that reads this pyproject's licence string), not ensurepip's older copy
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                             capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]

    command = venv / "bin" / "siclip"
    assert command.is_file()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    top = subprocess.run(["siclip", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert top.returncode == 0, top.stderr
    listed = {line.split()[0] for line in top.stdout.splitlines() if line.startswith("  ")}
    assert listed == {*COMMANDS, "study"}
    study = subprocess.run(["siclip", "study", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert {line.split()[0] for line in study.stdout.splitlines() if line.startswith("  ")} == set(STUDIES)

    # the built package, not this checkout, with its data files: model configs, the vocabulary, benchmark names
    probe = ("import siclip, siclip.models as m, siclip.data as d; from siclip.eval.benchmarks import read_classnames;"
             "print(siclip.__file__); print(len(m.list_models())); print(len(read_classnames('imagenet1k')));"
             "m.create_model('mobileclip_tiny'); print(len(d.create_tokenizer('clip')(['a photo'])[0]))")  # fmt: skip
    run = subprocess.run(["python", "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    where, models, imagenet, vocab = run.stdout.split()
    assert Path(where).is_relative_to(site_packages(venv)) and int(models) >= 5 and int(imagenet) == 1000 and int(vocab) > 0
    train = subprocess.run(["siclip", "train", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert train.returncode == 0 and "--weight-decay" in train.stdout, train.stderr[-2000:]
