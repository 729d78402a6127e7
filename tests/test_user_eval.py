"""Evaluation on the user's benchmark files: readers, metrics against plain references, CLIP_benchmark
records, and every tensor on the model's device (checked on the meta device: no GPU needed)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from siclip.data import CsvSource, Preprocess, create_tokenizer, decode_image, preprocess_image, write_shards
from siclip.data.transforms import CLIP_MEAN, CLIP_STD
from siclip.eval import (
    CLIP_TEMPLATES, embed_source, per_class_accuracy, read_classnames, read_templates, retrieval, retrieval_dataset, run_benchmarks,
    topk_accuracy, zero_shot_classification, zero_shot_dataset, zero_shot_logits,
)  # fmt: skip

LEVELS = {"apple": 20, "banana": 110, "cherry": 220}  # each class is a solid grey level


def _image(path, level):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), level, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """test/{apple,banana,cherry}/: banana holds one cherry-coloured image (a known mistake)."""
    root = tmp_path / "test"
    for name, level in LEVELS.items():
        for i in range(3):
            _image(root / name / f"{i}.PNG", level)
    _image(root / "banana" / "odd.png", LEVELS["cherry"])
    return root


class OracleCLIP(nn.Module):
    """Classifies by grey level and reads the class from its name: the right answer is known in advance."""

    def __init__(self, tokenizer, names) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(name="oracle", image=SimpleNamespace(image_size=8))
        self.preprocess = Preprocess(size=8)
        self.levels = torch.tensor([(LEVELS[n] / 255 - CLIP_MEAN[0]) / CLIP_STD[0] for n in names])
        self.word_vectors = {tokenizer.ids[n]: F.one_hot(torch.tensor(c), len(names)).float() for c, n in enumerate(names)}

    def encode_image(self, images):
        level = images[:, 0].mean(dim=(1, 2))
        return F.one_hot((level[:, None] - self.levels).abs().argmin(1), len(self.levels)).float()

    def encode_text(self, ids):
        return torch.stack([self.word_vectors[int(i)] for i in ids[:, 1]])  # the first word decides


def test_per_class_accuracy_matches_a_loop(seed):
    logits, labels = torch.randn(50, 7), torch.randint(0, 6, (50,))  # class 6 has no sample
    got = per_class_accuracy(logits, labels, 7)
    for c in range(6):
        rows = [i for i in range(50) if labels[i] == c]
        expected = sum(int(logits[i].argmax() == c) for i in rows) / len(rows) if rows else float("nan")
        assert got[c].item() == pytest.approx(expected, nan_ok=True)
    assert got[6].isnan()
    assert topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))["top5"] == 1.0  # k capped at the class count


def test_zero_shot_on_a_folder_gives_the_known_answer(folder, tmp_path):
    names = list(LEVELS)
    (tmp_path / "names.json").write_text(json.dumps(names))
    (tmp_path / "t.txt").write_text("{}\n")
    tokenizer = create_tokenizer("words", words=names)
    records = run_benchmarks(OracleCLIP(tokenizer, names), tokenizer, model_name="oracle", zeroshot=folder,
                             classnames=tmp_path / "names.json", templates=tmp_path / "t.txt", out_dir=tmp_path / "out")  # fmt: skip
    record = json.loads((tmp_path / "out" / "test_zeroshot_classification.json").read_text())
    assert record == records[0] and record["dataset"] == "test" and record["model"] == "oracle"
    metrics = record["metrics"]
    assert metrics["acc1"] == pytest.approx(9 / 10) and metrics["per_class_accuracy"] == pytest.approx({"apple": 1, "banana": 0.75, "cherry": 1})
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0.75 + 1) / 3) and metrics["acc5"] == 1.0


def test_zero_shot_from_a_csv_with_indices_or_names(folder, tmp_path):
    rows = [f"test/{n}/{i}.PNG,{label}" for label, n in enumerate(LEVELS) for i in range(3)]
    (tmp_path / "zs.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    source, labels, names = zero_shot_dataset(tmp_path / "zs.csv", list(LEVELS))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(source) == 9 and source.load(4).key == "test/banana/1.PNG"
    by_name = [f"test/{n}/0.PNG,{n}" for n in LEVELS]
    (tmp_path / "names.csv").write_text("filepath,label\n" + "\n".join(by_name) + "\n")
    assert zero_shot_dataset(tmp_path / "names.csv")[1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"names\.csv: labels \['cherry'\] are not among"):
        zero_shot_dataset(tmp_path / "names.csv", ["apple", "banana"])
    with pytest.raises(ValueError, match="3 class folders but 2 class names"):
        zero_shot_dataset(folder, ["a", "b"])
    assert zero_shot_dataset(folder)[2] == list(LEVELS)


def test_class_folders_named_after_their_classes_take_their_class_in_any_listed_order(folder, tmp_path):
    listed = ["Cherry", "apple", "banana"]  # not the sorted folder order; case differs too
    source, labels, names = zero_shot_dataset(folder, listed)
    assert names == listed
    by_folder = {source.keys[i].split("/")[0]: int(labels[i]) for i in range(len(source))}
    assert by_folder == {"apple": 1, "banana": 2, "cherry": 0}
    (tmp_path / "names.json").write_text(json.dumps(listed))
    tokenizer = create_tokenizer("words", words=[n.lower() for n in listed])
    oracle = OracleCLIP(tokenizer, [n.lower() for n in listed])
    metrics = zero_shot_classification(oracle, tokenizer, folder, classnames=[n.lower() for n in listed], templates=["{}"])
    assert metrics["acc1"] == pytest.approx(9 / 10)  # as in sorted order: the listing order changes nothing
    spaced = tmp_path / "spaced"
    for name in ("granny_smith", "Red_Delicious"):
        _image(spaced / name / "0.png", 50)
    source, labels, _ = zero_shot_dataset(spaced, ["red delicious", "Granny Smith"])
    assert {source.keys[i].split("/")[0]: int(labels[i]) for i in range(2)} == {"Red_Delicious": 0, "granny_smith": 1}


def test_a_folder_named_after_another_class_than_its_sorted_position_is_refused(folder):
    with pytest.raises(ValueError, match=r"folder 'apple' would be class 'banana', not 'apple'") as err:
        zero_shot_dataset(folder, ["banana", "apple", "durian"])
    assert str(folder) in str(err.value) and "['apple', 'banana', 'cherry']" in str(err.value)
    # Folders named otherwise keep the documented sorted-order rule, and so do names listed twice (a "crane"
    # bird and a "crane" machine) where each folder sits on its own name.
    assert zero_shot_dataset(folder, ["pome", "berry", "drupe"])[1].tolist() == [0] * 3 + [1] * 4 + [2] * 3
    assert zero_shot_dataset(folder, ["apple", "apple", "cherry"])[1].tolist() == [0] * 3 + [1] * 4 + [2] * 3


def test_classnames_and_templates_files(tmp_path):
    (tmp_path / "c.txt").write_text("red car\n\nblue bus\n")
    assert read_classnames(tmp_path / "c.txt") == ["red car", "blue bus"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(ValueError, match=r"t\.txt: every template needs exactly one \{\} placeholder.*no placeholder"):
        read_templates(tmp_path / "t.txt")
    assert read_templates(None) == list(CLIP_TEMPLATES) and len(CLIP_TEMPLATES) == 80
    assert all(t.count("{}") == 1 for t in CLIP_TEMPLATES)


def test_retrieval_groups_captions_by_image_from_csv_and_shards(folder, tmp_path):
    rows = ["filepath,title", "test/apple/0.PNG,dark square", "test/cherry/0.PNG,light square", "test/apple/0.PNG,black tile"]
    (tmp_path / "ret.csv").write_text("\n".join(rows) + "\n")
    source, captions = retrieval_dataset(tmp_path / "ret.csv")
    assert captions == [["dark square", "black tile"], ["light square"]] and len(source) == 2
    (tmp_path / "pairs.csv").write_text("filepath,title,syn0\ntest/apple/0.PNG,dark,very dark\ntest/cherry/0.PNG,light,\n")
    write_shards(CsvSource(tmp_path / "pairs.csv", synthetic_keys=["syn0"]), tmp_path / "shards", progress=False)
    assert retrieval_dataset(tmp_path / "shards")[1] == [["dark", "very dark"], ["light"]]
    tokenizer = create_tokenizer("words", words=["dark", "light", "black", "square", "tile", "apple", "cherry"])
    model = OracleCLIP(tokenizer, ["apple", "cherry"])
    # "black tile" (apple's) sits nearer the cherry image: found by its image at rank 2, never at rank 1
    model.word_vectors = {tokenizer.ids["dark"]: torch.tensor([1.0, 0]), tokenizer.ids["light"]: torch.tensor([0, 1.0]),
                          tokenizer.ids["black"]: torch.tensor([0, 0.5])}  # fmt: skip
    metrics = retrieval(model, tokenizer, tmp_path / "ret.csv")
    assert metrics["text_retrieval_recall@1"] == 1.0 and metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_retrieval_recall@5"] == 1.0 and metrics["images"] == 2 and metrics["captions"] == 3


class MetaSpy(nn.Module):
    """Parameters on the meta device; records the device of every input and answers on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, device="meta"))
        self.config = SimpleNamespace(name="spy", image=SimpleNamespace(image_size=8))
        self.preprocess = Preprocess(size=8)
        self.seen = []

    def encode_image(self, images):
        self.seen.append(("image", images.device.type))
        return F.normalize(torch.randn(images.shape[0], 4), dim=-1)

    def encode_text(self, ids):
        self.seen.append(("text", ids.device.type))
        return F.normalize(torch.randn(ids.shape[0], 4), dim=-1)


def test_every_evaluation_input_goes_to_the_model_device(folder, tmp_path):
    spy = MetaSpy()
    rows = ["filepath,title", "test/apple/0.PNG,a dark square", "test/cherry/0.PNG,a light square"]
    (tmp_path / "ret.csv").write_text("\n".join(rows) + "\n")
    run_benchmarks(spy, create_tokenizer("clip"), model_name="spy", zeroshot=folder, retrieval_data=tmp_path / "ret.csv")
    embed_source(spy, zero_shot_dataset(folder)[0], batch_size=4)
    assert {kind for kind, _ in spy.seen} == {"image", "text"}
    assert all(device == "meta" for _, device in spy.seen), spy.seen


def test_cpu_evaluation_encodes_in_cache_sized_chunks_with_the_same_result(folder, seed):
    from siclip.eval.run import CPU_CHUNK
    from siclip.models import create_model

    model = create_model("mobileclip_tiny").double().eval()
    calls = []
    encode_image, encode_text = model.encode_image, model.encode_text
    model.encode_image = lambda x: calls.append(("image", len(x))) or encode_image(x)
    model.encode_text = lambda x: calls.append(("text", len(x))) or encode_text(x)
    source = zero_shot_dataset(folder)[0]  # 10 images, one batch of 256
    embedded = embed_source(model, source)
    assert [n for kind, n in calls if kind == "image"] == [4, 4, 2]
    whole = torch.stack([preprocess_image(decode_image(s.image, s.key), model.preprocess) for s in map(source.load, range(len(source)))])
    torch.testing.assert_close(embedded, encode_image(whole.double()), rtol=1e-12, atol=1e-12)
    tokenizer = create_tokenizer("embedded")
    calls.clear()
    zero_shot_logits(model, tokenizer, source, ["a"], ["a photo of {}"] * (CPU_CHUNK["text"] + 1))
    assert [n for kind, n in calls if kind == "text"] == [CPU_CHUNK["text"], 1]


def test_calibration_captions_go_to_the_model_device(monkeypatch, tmp_path):
    from siclip.analysis import divergence
    from siclip.train import TrainConfig
    from siclip.train.inputs import RunInputs
    from siclip.train.loop import calibration_divergence

    seen = {}

    def fake(model, ids):
        seen["device"], seen["ids"] = ids.device.type, ids
        return {"attention": torch.zeros(2, 2)}

    monkeypatch.setattr(divergence, "text_divergences", fake)
    (tmp_path / "cal.txt").write_text("a handwritten digit one\n\na handwritten digit two\n")
    clip = create_tokenizer("clip")
    texts = []

    def tokenizer(batch):
        texts.extend(batch)
        return clip(batch)

    config = TrainConfig(calibration_captions_file=str(tmp_path / "cal.txt"))
    calibration_divergence(MetaSpy(), config, RunInputs(None, tokenizer, None, 0.0))
    assert seen["device"] == "meta" and seen["ids"].shape == (2, 77)
    assert texts == ["a handwritten digit one", "a handwritten digit two"]
    _image(tmp_path / "x.png", 9)  # without a file: the training data's captions, not the embedded world's
    (tmp_path / "train.csv").write_text("filepath,title\nx.png,my own caption\nx.png,another caption\n")
    texts.clear()
    calibration_divergence(MetaSpy(), TrainConfig(), RunInputs(CsvSource(tmp_path / "train.csv"), tokenizer, None, 0.0))
    assert sorted(texts) == ["another caption", "my own caption"]
