"""Synthetic captions: the resumable writer (shards and tables), the built-in captioners on the libraries' real classes
(transformers' BLIP, open_clip's CoCa, small random configs), and the captioned data training a step."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from siclip import cli
from siclip.data import (
    CaptionSettings, CsvSource, EmbeddedConfig, EmbeddedSource, ShardSource, caption_table, decode_image, recaption_shards, write_shards,
)  # fmt: skip
from siclip.data.captioning import MANIFEST, batch_seed


def _shards(tmp_path, count=12, per_shard=4):
    source = EmbeddedSource(EmbeddedConfig(num_train=count, image_size=32), "train")
    return write_shards(source, tmp_path / "shards", samples_per_shard=per_shard, progress=False)


def _table(tmp_path, count=7):
    source = EmbeddedSource(EmbeddedConfig(num_train=count, image_size=32), "train")
    (tmp_path / "img").mkdir()
    rows = [["filepath", "title"]]
    for i in range(count):
        sample = source.load(i)
        Image.fromarray(sample.image).save(tmp_path / "img" / f"{i}.png")
        rows.append([f"img/{i}.png", sample.raw_caption])
    rows.append(["img/missing.png", "an image that is not there"])
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return tmp_path / "train.csv"


class SeedEcho:
    """Captions that show the batch seed and the image's mean grey: what was captioned, and with which seed."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls, self.stop_after = 0, stop_after

    def __call__(self, images, seed):
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt
        return [[f"seed {seed} grey {int(image.mean())}", ""] for image in images]  # the empty one is dropped


def test_shards_are_captioned_shard_by_shard_and_a_rerun_continues(tmp_path):
    shards = _shards(tmp_path)
    record = {"captioner": "echo", "seed": 3}
    straight = recaption_shards(shards, SeedEcho(), out_dir=tmp_path / "straight", batch_size=3, record=record, seed=3, progress=False)
    assert straight == {"captioned": 12, "skipped": 0, "empty": 12, "units_done_before": 0}
    with pytest.raises(KeyboardInterrupt):  # stopped inside the second shard: the first is whole and recorded
        recaption_shards(shards, SeedEcho(stop_after=3), out_dir=tmp_path / "resumed", batch_size=3, record=record, seed=3, progress=False)
    assert json.loads((tmp_path / "resumed" / MANIFEST).read_text())["units"] == {"shard-000000.tar": {"captioned": 4, "skipped": 0, "empty": 4}}
    echo = SeedEcho()
    resumed = recaption_shards(shards, echo, out_dir=tmp_path / "resumed", batch_size=3, record=record, seed=3, progress=False)
    assert resumed["units_done_before"] == 1 and resumed["captioned"] == 8 and echo.calls == 4
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    first = ShardSource(tmp_path / "resumed").load(4)  # the second shard's first sample
    grey = int(decode_image(first.image, first.key).mean())
    assert first.synthetic == [f"seed {batch_seed(3, 'shard-000001.tar', 0)} grey {grey}"]
    again = recaption_shards(shards, SeedEcho(stop_after=0), out_dir=tmp_path / "resumed", record=record, seed=3, progress=False)
    assert again["units_done_before"] == 3 and again["captioned"] == 0
    with pytest.raises(ValueError, match=r"captions\.json records captions by .*\"seed\": 3.*not .*\"seed\": 4.*--overwrite"):
        recaption_shards(shards, SeedEcho(), out_dir=tmp_path / "resumed", record={**record, "seed": 4}, progress=False)
    over = recaption_shards(shards, SeedEcho(), out_dir=tmp_path / "resumed", record={**record, "seed": 4}, overwrite=True, seed=4, progress=False)
    assert over["captioned"] == 12
    again = recaption_shards(shards, SeedEcho(), out_dir=tmp_path / "resumed", record={**record, "seed": 4}, overwrite=True, progress=False)
    assert again["captioned"] == 12  # --overwrite under the same record: every shard again


def test_a_table_is_captioned_in_chunks_into_a_new_table_whose_column_the_reader_takes(tmp_path):
    table = _table(tmp_path)
    out = tmp_path / "syn.csv"
    record = {"captioner": "echo"}
    with pytest.raises(KeyboardInterrupt):
        caption_table(table, SeedEcho(stop_after=1), out=out, chunk_rows=3, batch_size=3, record=record, progress=False)
    assert not out.exists() and (tmp_path / "syn.csv.parts" / "chunk-000000.json").is_file()
    stats = caption_table(table, SeedEcho(), out=out, chunk_rows=3, batch_size=3, record=record, progress=False)
    assert stats == {"captioned": 4, "skipped": 1, "empty": 4, "units_done_before": 1} and not (tmp_path / "syn.csv.parts").exists()
    source = CsvSource(out, synthetic_keys=["synthetic_captions"])
    assert source.load(0).raw_caption == CsvSource(table).load(0).raw_caption
    grey = int(np.asarray(Image.open(tmp_path / "img" / "5.png")).mean())
    assert source.load(5).synthetic == [f"seed {batch_seed(0, 'train.csv/chunk-000001.json', 0)} grey {grey}"]
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        caption_table(table, SeedEcho(), out=out, record=record, progress=False)
    caption_table(out, SeedEcho(), out=tmp_path / "twice.csv", mode="append", record=record, progress=False)
    assert len(CsvSource(tmp_path / "twice.csv", synthetic_keys=["synthetic_captions"]).load(5).synthetic) == 2
    with pytest.raises(ValueError, match="is the input table"):
        caption_table(table, SeedEcho(), out=table, progress=False)


def test_nucleus_keeps_the_most_probable_tokens_up_to_top_p(seed):
    from siclip.interop.captioners import next_token, nucleus

    logits = torch.randn(5, 9, dtype=torch.float64) * 2
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (2.0, 1.0), (1.0, 1e-9)):
        got = nucleus(logits, temperature, top_p)
        for row, probs in zip(logits.tolist(), got):
            p = np.exp(np.array(row) / temperature - max(row) / temperature)
            p /= p.sum()
            kept, total = np.zeros_like(p), 0.0
            for index in np.argsort(-p, kind="stable"):
                if total >= top_p:
                    break
                kept[index], total = p[index], total + p[index]
            np.testing.assert_allclose(probs.numpy(), kept / kept.sum(), rtol=1e-6, atol=1e-12)
    assert torch.equal(next_token(logits, 0.0, 0.9), logits.argmax(-1))
    assert torch.equal(next_token(logits, 1.0, 1e-9), logits.argmax(-1))  # the nucleus of one token


def test_caption_settings_refuse_what_cannot_be_sampled():
    for bad, problem in [({"num_captions": 3, "temperature": 0}, "need sampling"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "at least 1")]:
        with pytest.raises(ValueError, match=problem):
            CaptionSettings(**bad)


def _train_one_step(argv, tmp_path, capsys):
    from siclip.commands import train

    out = tmp_path / "run"
    assert cli.run(train.main, [*argv, "--model", "mobileclip_tiny", "--image-size", "32", "--tokenizer", "words", "--p-synthetic", "1",
                                "--batch-size", "4", "--epochs", "1", "--no-eval", "--out", str(out)]) == 0, capsys.readouterr().err  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and all(np.isfinite(v) for v in summary["final_loss"].values())


@pytest.mark.slow  # imports transformers and builds a real BLIP (tiny), then trains a step: ~10 s on the 2-core CPU
def test_a_transformers_blip_captions_shards_end_to_end_and_they_train(tmp_path, capsys, monkeypatch):
    from foreign_models import save_hf_blip

    from siclip.commands import caption
    from siclip.interop.captioners import TransformersCaptioner

    blip = save_hf_blip(tmp_path / "blip")
    shards = _shards(tmp_path, count=8)
    monkeypatch.setattr(sys, "argv", ["siclip caption"])
    argv = ["--data", str(shards[0].parent), "--captioner", f"hf:{blip}", "--num-captions", "3", "--max-new-tokens", "6", "--batch-size", "3",
            "--seed", "5", "--device", "cpu", "--out", str(tmp_path / "syn")]  # fmt: skip
    assert cli.run(caption.main, argv) == 0, capsys.readouterr().err
    assert "captioned 8 images" in capsys.readouterr().out
    direct = TransformersCaptioner(str(blip), CaptionSettings(num_captions=3, max_new_tokens=6, seed=5), "cpu")
    images = [decode_image(sample.image, sample.key) for sample in map(ShardSource(shards[1]).load, range(3))]
    expected = direct(images, seed=batch_seed(5, shards[1].name, 0))  # what the second shard's first batch must hold
    written = ShardSource(tmp_path / "syn")
    for i in range(3):
        kept = [t for t in expected[i] if t]
        assert written.load(4 + i).synthetic == kept and len(expected[i]) == 3
    assert cli.run(caption.main, argv) == 0 and "2 shard(s) were done before" in capsys.readouterr().out
    assert cli.run(caption.main, [*argv[:-2], "--temperature", "0.5", "--out", str(tmp_path / "syn")]) == 2
    assert "captions.json records captions by" in capsys.readouterr().err
    _train_one_step(["--data", str(tmp_path / "syn")], tmp_path, capsys)


@pytest.mark.slow  # imports open_clip and builds a real CoCa (tiny), then trains a step: ~10 s on the 2-core CPU
def test_an_open_clip_coca_captions_a_table_end_to_end_and_it_trains(tmp_path, capsys, monkeypatch):
    from foreign_models import save_open_clip_coca

    from siclip.commands import caption
    from siclip.interop.captioners import CocaCaptioner

    config, weights = save_open_clip_coca(tmp_path / "coca")
    spec = f"open_clip:{config}:{weights}"
    greedy = CocaCaptioner(f"{config}:{weights}", CaptionSettings(num_captions=1, temperature=0, max_new_tokens=8), "cpu")
    pixels = torch.randn(3, 3, 32, 32)
    tokens = greedy.decode(pixels)  # greedy decoding is the argmax of CoCa's own logits at every step (teacher forcing)
    logits = greedy.model(pixels, tokens[:, :-1], output_labels=False)["logits"]
    running = torch.ones(3, dtype=torch.bool)
    for step in range(tokens.shape[1] - 1):
        assert torch.equal(tokens[running, step + 1], logits[running, step].argmax(-1))
        running &= tokens[:, step + 1] != greedy.eot
    table = _table(tmp_path)
    monkeypatch.setattr(sys, "argv", ["siclip caption"])
    argv = ["--data", str(table), "--captioner", spec, "--num-captions", "2", "--max-new-tokens", "5", "--chunk-rows", "4", "--device", "cpu",
            "--out", str(tmp_path / "syn.csv")]  # fmt: skip
    assert cli.run(caption.main, argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "captioned 7 images, skipped 1 undecodable" in out and "--synthetic-keys synthetic_captions" in out
    rows = CsvSource(tmp_path / "syn.csv", synthetic_keys=["synthetic_captions"])
    assert all(1 <= len(rows.load(i).synthetic) <= 2 for i in range(7))
    assert cli.run(caption.main, ["--data", str(table), "--captioner", "open_clip:ViT-B-32:nope.pt", "--out", str(tmp_path / "x.csv")]) == 2
    assert "weights file nope.pt not found" in capsys.readouterr().err
    _train_one_step(["--data", str(tmp_path / "syn.csv"), "--synthetic-keys", "synthetic_captions", "--max-skip-fraction", "0.5"], tmp_path, capsys)
