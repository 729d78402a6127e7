import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.data import (
    AugmentConfig,
    CsvSource,
    EmbeddedConfig,
    EmbeddedSource,
    ImageTextDataset,
    ImageTextLoader,
    Preprocess,
    RawSample,
    ShardSource,
    TeacherCache,
    TeacherCacheWriter,
    augment,
    build_teacher_cache,
    choose_caption,
    create_tokenizer,
    decode_image,
    encode_image,
    expand_shards,
    recaption_shards,
    write_shards,
)
from siclip.data.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS
from siclip.data.transforms import random_resized_crop_box

ROOT = Path(__file__).resolve().parents[1]
CFG = EmbeddedConfig(num_train=60, num_val=20, num_test=20)


@pytest.fixture
def shards(tmp_path):
    return write_shards(EmbeddedSource(CFG, "train"), tmp_path / "shards", samples_per_shard=25, progress=False)


def test_embedded_to_shards_to_reader_round_trip(shards):
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    source, reader = EmbeddedSource(CFG, "train"), ShardSource(shards[0].parent)
    assert len(reader) == len(source) and not reader.problems
    for i in range(len(source)):
        a, b = source.load(i), reader.load(i)
        assert (a.key, a.raw_caption, a.synthetic) == (b.key, b.raw_caption, b.synthetic)
        assert np.array_equal(a.image, decode_image(b.image, b.key))  # PNG: lossless
        assert b.meta["objects"] == [list(o) for o in a.meta["objects"]]


def test_jpeg_shards_decode_close(tmp_path):
    paths = write_shards(EmbeddedSource(CFG, "val"), tmp_path, image_format="jpg", progress=False)
    with tarfile.open(paths[0]) as tar:
        assert any(m.name.endswith(".jpg") for m in tar)
    a, b = EmbeddedSource(CFG, "val").load(3), ShardSource(paths).load(3)
    assert np.abs(a.image.astype(int) - decode_image(b.image, b.key).astype(int)).mean() < 4


def test_shard_specs_and_missing_shard(shards):
    directory = shards[0].parent
    assert expand_shards(directory) == shards
    assert expand_shards(str(directory / "shard-{000000..000002}.tar")) == shards
    assert expand_shards(str(directory / "shard-*.tar")) == shards
    with pytest.raises(FileNotFoundError, match=r"5 of 8 shards not found: .*shard-000003.tar"):
        ShardSource(str(directory / "shard-{000000..000007}.tar"))
    (directory / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards in directory .*empty"):
        ShardSource(directory / "empty")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(seed=0):
    return encode_image(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, caplog):
    good = [(f"ok{i}.png", _png(i)) for i in range(4)] + [(f"ok{i}.txt", b"a red circle") for i in range(4)]
    bad = [
        ("corrupt.png", b"not an image at all"), ("corrupt.txt", b"a caption"),
        ("truncated.png", _png(9)[:60]), ("truncated.txt", b"a caption"),
        ("empty.png", _png(10)), ("empty.txt", b"   "), ("empty.json", json.dumps({"synthetic_captions": ["", " "]}).encode()),
        ("nocaption.png", _png(11)),
        ("noimage.txt", b"a caption"),
        ("badjson.png", _png(12)), ("badjson.json", b"{oops"),
    ]  # fmt: skip
    path = _tar(tmp_path / "bad.tar", good + bad)
    dataset = ImageTextDataset(ShardSource(path), create_tokenizer(), augment_config=AugmentConfig(16))
    loader = ImageTextLoader(dataset, batch_size=3, drop_last=False, shuffle=False)
    with caplog.at_level("WARNING"):
        keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == ["ok0", "ok1", "ok2", "ok3"]
    report = loader.last_report
    reasons = {s.key: s.reason for s in report.skipped}
    assert set(reasons) == {"corrupt", "truncated", "empty", "nocaption", "noimage", "badjson"}
    assert reasons["corrupt"].startswith("corrupt image") and reasons["truncated"].startswith("corrupt image")
    assert reasons["empty"] == reasons["nocaption"] == "empty or missing caption"
    assert "no image member" in reasons["noimage"] and "broken json" in reasons["badjson"]
    assert "skipped 6 samples" in caplog.text and "truncated" in caplog.text


def test_truncated_archive_keeps_what_came_before(shards, tmp_path):
    data = shards[0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    source = ShardSource(cut)
    assert 0 < len(source) < 25 and source.problems
    assert all(source.load(i).synthetic for i in range(len(source)))
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="junk.tar"):
        ShardSource(tmp_path / "junk.tar")


def _write_csv(tmp_path, sep=","):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(images / f"{i}.png")
        rows.append([f"images/{i}.png", f"caption {i}", f"syn a{i}", f"syn b{i}", json.dumps([f"j{i}", f"k{i}"])])
    rows.append(["images/missing.png", "caption 5", "x", "y", "[]"])
    path = tmp_path / ("data.tsv" if sep == "\t" else "data.csv")
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(["filepath", "title", "syn0", "syn1", "synthetic"])
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("sep", [",", "\t"])
def test_csv_reader(tmp_path, sep):
    path = _write_csv(tmp_path, sep)
    source = CsvSource(path, synthetic_keys=["syn0", "syn1"])
    assert len(source) == 6
    sample = source.load(2)
    assert sample.raw_caption == "caption 2" and sample.synthetic == ["syn a2", "syn b2"]
    assert decode_image(sample.image, sample.key)[0, 0, 0] == 80
    assert CsvSource(path, synthetic_keys=["synthetic"]).load(1).synthetic == ["j1", "k1"]
    dataset = ImageTextDataset(source, create_tokenizer(), augment_config=AugmentConfig(8))
    assert dataset[(0, 5)].reason.startswith("missing image file")


def test_csv_errors_name_the_file(tmp_path):
    path = _write_csv(tmp_path)
    with pytest.raises(ValueError, match=r"data.csv: missing column\(s\) \['caption'\]"):
        CsvSource(path, caption_key="caption")
    broken = tmp_path / "broken.csv"
    broken.write_text('filepath,title\na.png,"fine"\nb.png,too,many,fields\n')
    with pytest.raises(ValueError, match="broken.csv: unreadable CSV"):
        CsvSource(broken)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        CsvSource(tmp_path / "nothing.csv")


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_caption_mixing_probability(seed, p):
    sample = RawSample("k", b"", "raw", ["s1", "s2", "s3"])
    rng = np.random.default_rng(seed)
    slots = np.array([choose_caption(sample, rng, p) for _ in range(4000)])
    synthetic = (slots > 0).mean()
    assert synthetic == pytest.approx(p, abs=4 * np.sqrt(max(p * (1 - p), 1e-12) / 4000) + 1e-12)
    if p > 0:
        assert set(slots[slots > 0]) == {1, 2, 3}
    only_raw, only_synthetic = RawSample("k", b"", "raw", []), RawSample("k", b"", None, ["s"])
    assert choose_caption(only_raw, rng, 1.0) == 0 and choose_caption(only_synthetic, rng, 0.0) == 1


def test_mixing_is_seeded_per_sample():
    source = EmbeddedSource(CFG, "train")
    a = ImageTextDataset(source, create_tokenizer(), p_synthetic=0.5, seed=4)
    b = ImageTextDataset(source, create_tokenizer(), p_synthetic=0.5, seed=4)
    picks = [a[(1, i)]["caption_index"] for i in range(40)]
    assert picks == [b[(1, i)]["caption_index"] for i in range(40)]
    assert picks != [a[(2, i)]["caption_index"] for i in range(40)]  # a new epoch draws anew


def test_augmentation_is_seeded_and_well_formed(seed):
    image = EmbeddedSource(CFG, "train").load(0).image
    cfg = AugmentConfig(image_size=32, flip_p=0.5)
    x1 = augment(image, np.random.default_rng(seed), cfg)
    x2 = augment(image, np.random.default_rng(seed), cfg)
    assert x1.shape == (3, 32, 32) and x1.dtype == torch.float32 and torch.equal(x1, x2)
    flip = augment(image, np.random.default_rng(seed), AugmentConfig(image_size=32, flip_p=1.0))
    keep = augment(image, np.random.default_rng(seed), AugmentConfig(image_size=32, flip_p=0.0))
    torch.testing.assert_close(flip, keep.flip(-1))
    centre = augment(image, None, AugmentConfig(image_size=64, train=False))
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(centre * std + mean, torch.from_numpy(image).permute(2, 0, 1).float() / 255, atol=1e-6, rtol=0)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(64, 48, rng, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48


def test_recaption_script_writes_ground_truth_captions(shards):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "caption_shards.py"), "--data", str(shards[0].parent), "--num-captions", "3"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "captioned 60 images" in result.stdout
    reader = ShardSource(shards)
    for i in range(len(reader)):
        sample = reader.load(i)
        assert len(sample.synthetic) == 3
        for caption in sample.synthetic:
            for colour, shape in sample.meta["objects"]:
                assert any(c in caption for c in COLOUR_SYNONYMS[colour]) and any(s in caption for s in SHAPE_SYNONYMS[shape])


def test_any_callable_captioner_appends(shards, tmp_path):
    before = ShardSource(shards).load(0).synthetic
    stats = recaption_shards(shards, lambda images: [["a thing"] for _ in images], out_dir=tmp_path / "new", mode="append", progress=False)
    assert stats == {"captioned": 60, "skipped": 0, "empty": 0, "units_done_before": 0}
    assert ShardSource(tmp_path / "new").load(0).synthetic == [*before, "a thing"]
    with pytest.raises(ValueError, match="one list of strings per image"):
        recaption_shards(shards, lambda images: ["oops"], progress=False)


def test_teacher_cache_round_trip_and_dataset_hook(tmp_path, seed):
    source = EmbeddedSource(CFG, "val")
    proj = torch.randn(3 * 16 * 16, 8)
    encode_images = lambda x: x.flatten(1) @ proj  # noqa: E731
    table = torch.randn(200, 8)
    encode_texts = lambda ids: table[ids].sum(1)  # noqa: E731
    tokenizer = create_tokenizer()
    path = build_teacher_cache(source, encode_images, encode_texts, tokenizer, tmp_path / "cache",
                               preprocess=Preprocess(size=16), batch_size=7, progress=False)  # fmt: skip
    cache = TeacherCache(path)
    assert len(cache) == len(source) and cache.dim == 8 and cache.meta["num_captions"] == 1 + CFG.num_synthetic
    sample = source.load(5)
    expected_text = torch.nn.functional.normalize(encode_texts(tokenizer(sample.synthetic[1])), dim=-1)[0]
    image, text = cache.lookup(sample.key, 2)
    torch.testing.assert_close(text, expected_text, atol=2e-3, rtol=0)  # stored as float16
    assert image.norm().item() == pytest.approx(1.0, abs=2e-3)
    dataset = ImageTextDataset(source, tokenizer, augment_config=AugmentConfig(16), teacher_cache=cache, seed=seed)
    item = dataset[(0, 5)]
    torch.testing.assert_close(item["teacher_text"], cache.lookup(sample.key, item["caption_index"])[1])
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup("train-00000000", 0)
    with pytest.raises(ValueError, match="expected image"):
        TeacherCacheWriter(tmp_path / "c2", dim=4, num_captions=2).add("k", np.zeros(3), np.zeros((2, 4)))
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache(tmp_path / "none")


def test_skip_report_survives_a_resume(tmp_path):
    members = []
    for i in range(8):
        members += [(f"s{i}.png", _png(i) if i % 3 else b"broken"), (f"s{i}.txt", b"a caption")]
    dataset = ImageTextDataset(ShardSource(_tar(tmp_path / "mixed.tar", members)), create_tokenizer(), augment_config=AugmentConfig(8))
    first = ImageTextLoader(dataset, batch_size=2, shuffle=False, drop_last=False)
    iterator = iter(first)
    next(iterator), next(iterator)
    state = first.state_dict()
    resumed = ImageTextLoader(dataset, batch_size=2, shuffle=False, drop_last=False)
    resumed.load_state_dict(state)
    list(resumed)
    assert sorted(s.key for s in resumed.last_report.skipped) == ["s0", "s3", "s6"]
    with pytest.raises(ValueError, match="batch size 2, not 3"):
        ImageTextLoader(dataset, batch_size=3).load_state_dict(state)
