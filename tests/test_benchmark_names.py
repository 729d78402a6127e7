"""Standard benchmarks by name: ImageNet-1k / CIFAR class names and CLIP's prompt sets, on a local copy laid out by
WordNet id, index or name; templates written with {c} as with {}."""

import json
import sys
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from siclip import cli
from siclip.eval import CLIP_TEMPLATES, read_classnames, read_templates, zero_shot_dataset
from siclip.eval.named import BenchmarkClasses, builtin_classnames

FIRST_TEN = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668", "n01514859", "n01518878"]
FIRST_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray", "rooster", "hen",
               "ostrich"]  # fmt: skip


def _images(root, folders, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_the_data_files_hold_the_standard_lists():
    imagenet = builtin_classnames("imagenet1k")
    assert len(imagenet) == 1000 and len(set(imagenet.lookup) & set(FIRST_TEN)) == 10
    ids = json.loads(resources.files("siclip.eval").joinpath("data", "imagenet1k.json").read_text())["ids"]  # as the package ships it
    assert ids == sorted(ids) and len(set(ids)) == 1000 and ids[:10] == FIRST_TEN and list(imagenet[:10]) == FIRST_NAMES
    assert len(builtin_classnames("cifar10")) == 10 and len(set(builtin_classnames("cifar100"))) == 100
    assert read_templates("imagenet1k") == list(CLIP_TEMPLATES) and len(CLIP_TEMPLATES) == 80
    for name, count in (("cifar", 18), ("cifar10", 18), ("cifar100", 18), ("imagenet1k-simple", 7)):
        templates = read_templates(name)
        assert len(templates) == count and all(t.count("{}") == 1 for t in templates)


def test_folders_named_by_wordnet_id_index_or_name_take_their_imagenet_class(tmp_path):
    classes = read_classnames("imagenet1k")
    assert isinstance(classes, BenchmarkClasses)
    by_id = _images(tmp_path / "by_id", FIRST_TEN)
    source, labels, names = zero_shot_dataset(by_id, classes)
    assert len(names) == 1000 and labels.tolist() == [i for i in range(10) for _ in range(2)]
    assert [names[int(labels[i])] for i in range(0, 20, 2)] == FIRST_NAMES
    mixed = _images(tmp_path / "mixed", ["7", "n01443537", "great_white_shark", "Tiger Shark", "999"], per_class=1)
    _, labels, names = zero_shot_dataset(mixed, classes)  # folders sorted by name: "7", "999", "Tiger Shark", "great_white_shark", "n0…"
    assert sorted(labels.tolist()) == [1, 2, 3, 7, 999] and names[999] == "toilet paper"
    with pytest.raises(ValueError, match=r"class folder\(s\) \['not_a_class'\] are not classes of imagenet1k.*WordNet ids"):
        zero_shot_dataset(_images(tmp_path / "bad", ["n01440764", "not_a_class"], per_class=1), classes)
    with pytest.raises(ValueError, match="folders '0' and 'n01440764' both name class 0"):
        zero_shot_dataset(_images(tmp_path / "twice", ["0", "n01440764"], per_class=1), classes)
    cifar = _images(tmp_path / "cifar100", ["aquarium_fish", "maple_tree", "99"], per_class=1)
    _, labels, names = zero_shot_dataset(cifar, read_classnames("cifar100"))
    assert sorted(labels.tolist()) == [1, 47, 99] and names[47] == "maple tree"
    (tmp_path / "by_id" / "labels.csv").write_text("filepath,label\nn01440764/0.png,n01440764\nn01443537/1.png,1\nn01484850/0.png,stingray\n")
    assert zero_shot_dataset(tmp_path / "by_id" / "labels.csv", classes)[1].tolist() == [0, 1, 6]


def test_evaluate_resolves_imagenet_names_and_a_c_template_evaluates_like_its_twin(tmp_path, capsys, monkeypatch):
    from siclip.commands import evaluate
    from siclip.models import create_model, save_checkpoint

    torch.manual_seed(0)
    small_text = {"layers": 2, "width": 32, "heads": 2, "context_length": 16}  # 2,000 prompts: a small text tower keeps this quick
    model = save_checkpoint(create_model("mobileclip_tiny", image={"image_size": 32}, text=small_text), tmp_path / "model.pt")
    folder = _images(tmp_path / "val", FIRST_TEN)
    cifar = _images(tmp_path / "cifar", ["airplane", "1", "bird", "3"])
    (tmp_path / "braces.txt").write_text("a photo of a {}.\nitap of the {}.\n")
    (tmp_path / "c.txt").write_text("a photo of a {c}.\nitap of the {c}.\n")
    monkeypatch.setattr(sys, "argv", ["siclip evaluate"])

    def evaluate_on(data, classnames, templates):
        out = tmp_path / f"{data.name}_{templates}"
        argv = ["--model", str(model), "--zeroshot", str(data), "--classnames", classnames, "--templates", str(tmp_path / f"{templates}.txt"),
                "--max-unknown-rate", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
        assert cli.run(evaluate.main, argv) == 0, capsys.readouterr().err
        return json.loads((out / f"{data.name}_zeroshot_classification.json").read_text())

    metrics = evaluate_on(folder, "imagenet1k", "c")["metrics"]
    assert metrics["classes"] == 1000 and metrics["images"] == 20 and list(metrics["per_class_accuracy"]) == FIRST_NAMES
    assert evaluate_on(cifar, "cifar10", "c") == evaluate_on(cifar, "cifar10", "braces")  # every metric, per class too, exactly
    assert cli.run(evaluate.main, ["--model", str(model), "--zeroshot", str(folder), "--classnames", "imagenet2k"]) == 2
    assert "class names file not found: imagenet2k (or a built-in set: imagenet1k, cifar10, cifar100)" in capsys.readouterr().err


def test_c_and_brace_templates_give_the_same_prompts_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n{} and {c}\n")
    with pytest.raises(ValueError, match=r"exactly one \{\} placeholder \(or \{c\}\).*\{\} and \{c\}"):
        read_templates(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\nthe {}\n")
    assert read_templates(tmp_path / "t.txt") == ["a photo of a {}.", "the {}"]
    (tmp_path / "cifar").write_text("my {} prompt\n")  # a file of a set's name is the file
    assert read_templates(tmp_path / "cifar") == ["my {} prompt"]
