"""Data quality: CLIP-score filtering (siclip.data.quality, siclip filter) and training on what it kept."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.data import EmbeddedConfig, EmbeddedSource, ShardSource, create_tokenizer
from siclip.data.quality import PairScores, noise_report, read_indices, score_pairs, select_pairs
from siclip.data.transforms import preprocess_image
from siclip.models import create_model, save_checkpoint

TINY = {"image": {"image_size": 32}, "text": {"layers": 1}}


def _csv(tmp_path, count: int = 12):
    """A CSV of the embedded world's images (PNG files) and raw captions, with an extra column the filter must keep."""
    source = EmbeddedSource(EmbeddedConfig(num_train=count, image_size=32))
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(count):
        sample = source.load(i)
        Image.fromarray(sample.image).save(tmp_path / "images" / f"{i}.png")
        rows.append({"filepath": f"images/{i}.png", "title": sample.raw_caption, "licence": f"cc-{i}"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title", "licence"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "pairs.csv", rows


def test_the_filter_keeps_exactly_the_top_fraction_by_image_text_cosine(tmp_path, seed, capsys):
    from siclip.commands.filter import main

    model = create_model("mobileclip_tiny", **TINY).eval()
    spec = save_checkpoint(model, tmp_path / "model.pt")
    table, rows = _csv(tmp_path)
    out = tmp_path / "kept"
    assert main(["--model", str(spec), "--data", str(table), "--keep-fraction", "0.5", "--out", str(out), "--batch-size", "5",
                 "--chunk-size", "4"]) == 0  # fmt: skip
    tokenizer = create_tokenizer("embedded", context_length=32)
    with torch.no_grad():  # each pair on its own, in float64 after the encoders: the score from its definition
        expected = []
        for row in rows:
            pixels = preprocess_image(np.array(Image.open(tmp_path / row["filepath"]).convert("RGB")), model.preprocess)[None]
            image, text = model.encode_image(pixels, normalize=False).double()[0], model.encode_text(tokenizer([row["title"]]), normalize=False).double()[0]
            expected.append(float(image @ text / (image.norm() * text.norm())))
    best = sorted(np.argsort(-np.array(expected), kind="stable")[:6].tolist())
    with open(out / "kept.csv", newline="") as f:
        kept = list(csv.DictReader(f))
    assert [r["licence"] for r in kept] == [rows[i]["licence"] for i in best]  # the rows, in order, with every column
    np.testing.assert_allclose([float(r["clip_score"]) for r in kept], [expected[i] for i in best], atol=1e-5)
    assert all((out / r["filepath"]).resolve() == (tmp_path / rows[i]["filepath"]).resolve() for r, i in zip(kept, best))
    assert json.loads((out / "kept_indices.json").read_text()) == best
    summary = json.loads((out / "filter.json").read_text())
    assert summary["kept"] == 6 and summary["scored"] == 12 and summary["noise"] is None
    assert "kept 6" in capsys.readouterr().out
    # an existing run is refused without --resume; --resume reselects from the cache without scoring again
    with pytest.raises(SystemExit):
        main(["--model", str(spec), "--data", str(table), "--keep-fraction", "0.5", "--out", str(out)])
    assert "already holds a filter run" in capsys.readouterr().err
    ranked = sorted(expected, reverse=True)
    threshold = (ranked[3] + ranked[4]) / 2  # between the 4th and 5th best scores
    assert main(["--model", str(spec), "--data", str(table), "--threshold", str(threshold), "--out", str(out), "--resume", "--chunk-size", "4"]) == 0
    assert json.loads((out / "kept_indices.json").read_text()) == [i for i in range(12) if expected[i] >= threshold]


def test_scores_resume_from_their_chunks_and_refuse_another_run(tmp_path):
    source = EmbeddedSource(EmbeddedConfig(num_train=10, image_size=16))
    calls = []
    features = {}

    def encode_images(images):
        calls.append(len(images))
        return np.stack([im.reshape(-1, 3).mean(0) for im in images])

    def encode_texts(texts):
        return np.stack([features.setdefault(t, np.random.default_rng(len(features)).normal(size=3)) for t in texts])

    first = score_pairs(source, encode_images, encode_texts, tmp_path, identity={"model": "m"}, chunk_size=4, progress=False)
    assert sum(calls) == 10 and len(list(tmp_path.glob("scores-*.json"))) == 3
    (tmp_path / "scores-0000000004.json").unlink()  # as if the run stopped while scoring the second chunk
    calls.clear()
    again = score_pairs(source, encode_images, encode_texts, tmp_path, identity={"model": "m"}, chunk_size=4, progress=False)
    assert calls == [4] and np.array_equal(first.scores, again.scores) and first.keys == again.keys
    with pytest.raises(ValueError, match="another filter run.*model: 'm'"):
        score_pairs(source, encode_images, encode_texts, tmp_path, identity={"model": "other"}, chunk_size=4, progress=False)


def test_selection_and_the_noise_report_follow_their_definitions(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=50)
    scores[[3, 7]] = np.nan  # not scored
    kept = select_pairs(scores, keep_fraction=0.3)
    valid = [i for i in range(50) if not np.isnan(scores[i])]
    assert len(kept) == round(0.3 * 48) and min(scores[kept]) >= max(scores[i] for i in valid if i not in kept)
    assert select_pairs(scores, threshold=0.5).tolist() == [i for i in valid if scores[i] >= 0.5]
    noisy = rng.random(50) < 0.4
    pairs = PairScores([str(i) for i in range(50)], scores, [bool(f) for f in noisy], [None] * 50)
    report = noise_report(pairs, kept)
    dropped = [i for i in valid if i not in kept]
    assert report["precision"] == pytest.approx(np.mean(noisy[dropped]))
    assert report["recall"] == pytest.approx(noisy[dropped].sum() / noisy[valid].sum())
    assert report["noise_after"] == pytest.approx(np.mean(noisy[kept]))
    assert noise_report(PairScores(pairs.keys, scores, [None] * 50, [None] * 50), kept) is None


def test_filtering_the_noisy_world_measures_precision_and_trains_on_the_kept_subset(tmp_path, capsys):
    from siclip.commands.filter import main
    from siclip.train import DataConfig, TrainConfig
    from siclip.train.inputs import open_training_source

    spec = save_checkpoint(create_model("mobileclip_tiny", **TINY), tmp_path / "model.pt")
    out = tmp_path / "kept"
    assert main(["--model", str(spec), "--data", "embedded", "--num-train", "16", "--caption-noise", "0.5", "--image-size", "32",
                 "--keep-fraction", "0.5", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "filter.json").read_text())
    noisy = EmbeddedSource(EmbeddedConfig(num_train=16, caption_noise=0.5)).noisy_indices()
    kept = json.loads((out / "kept_indices.json").read_text())
    dropped = sorted(set(range(16)) - set(kept))
    assert summary["noise"]["noisy_scored"] == len(noisy) == 8 and len(kept) == 8
    assert summary["noise"]["precision"] == pytest.approx(np.isin(dropped, noisy).mean())
    assert "(precision)" in capsys.readouterr().out
    shards = ShardSource(out / "shards")  # the kept samples as shards, each with its score and noise flag
    assert len(shards) == 8 and all("clip_score" in shards.load(i).meta for i in range(8))
    assert [shards.load(i).meta["noisy"] for i in range(8)] == [bool(i in noisy) for i in kept]
    again = tmp_path / "again"  # shards in, shards out: the noise flags travel in the shards' json members
    assert main(["--model", str(spec), "--data", str(out / "shards"), "--keep-fraction", "0.5", "--out", str(again)]) == 0
    twice = json.loads((again / "filter.json").read_text())
    assert twice["kept"] == 4 and twice["noise"]["noisy_scored"] == sum(bool(i in noisy) for i in kept) and len(ShardSource(again / "shards")) == 4
    config = TrainConfig(data=DataConfig(num_train=16, caption_noise=0.5, subset=str(out / "kept_indices.json")))
    source = open_training_source(config, 32)
    assert len(source) == 8 and [source.load(j).key for j in range(8)] == [f"train-{i:08d}" for i in kept]
    with pytest.raises(ValueError, match="outside the source's 4 samples"):
        read_indices(out / "kept_indices.json", 4)


def test_the_command_refuses_bad_input_in_one_line_before_any_model_loads(tmp_path):
    import subprocess
    import sys

    spec = save_checkpoint(create_model("mobileclip_tiny", **TINY), tmp_path / "model.pt")
    run = subprocess.run([sys.executable, "-m", "siclip", "filter", "--model", str(spec), "--data", "embedded", "--keep-fraction", "1.5",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "--keep-fraction" in run.stderr.strip().splitlines()[-1] and not (tmp_path / "out").exists()
    from siclip.commands.filter import main

    with pytest.raises(SystemExit) as stopped:
        main(["--model", str(spec), "--data", str(tmp_path / "pairs.csv"), "--threshold", "0.2", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and not (tmp_path / "out").exists()
