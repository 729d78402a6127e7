import gzip

import pytest
import torch

from siclip.data import ClipBpeTokenizer, WordTokenizer, create_tokenizer
from siclip.data.tokenizer import open_clip_merges_file


def test_word_tokenizer_layout_and_round_trip():
    tok = WordTokenizer(["red", "circle", "a"], context_length=8)
    assert tok.pad_token_id == 0 and tok.eot_token_id == tok.vocab_size - 1  # argmax pooling finds eot
    ids = tok(["a red circle", "a blue circle"])
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [tok.sot_token_id, tok.ids["a"], tok.ids["red"], tok.ids["circle"], tok.eot_token_id, 0, 0, 0]
    assert ids[1, 2].item() == tok.unk_token_id
    assert tok.decode(ids[0].tolist()) == "a red circle"
    assert ids.argmax(-1).tolist() == [4, 4]


def test_truncation_keeps_eot_last():
    tok = create_tokenizer("embedded", context_length=5)
    ids = tok("a red circle next to a blue star")
    assert ids.shape == (1, 5) and ids[0, -1].item() == tok.eot_token_id
    with pytest.raises(ValueError, match="context_length"):
        tok("x", context_length=1)
    with pytest.raises(TypeError, match="strings"):
        tok(["ok", None])


@pytest.fixture
def tiny_merges(tmp_path):
    path = tmp_path / "merges.txt.gz"
    merges = ["#version: 0.2", "l o", "lo w</w>", "r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")
    return path


def test_clip_bpe_applies_merges_in_rank_order(tiny_merges):
    tok = ClipBpeTokenizer(tiny_merges, context_length=10)
    assert tok.vocab_size == 512 + 9 + 2
    ids = tok.encode("Low RED circle!")
    pieces = [tok.decoder[i] for i in ids]
    assert pieces == ["low</w>", "red</w>", "circle</w>", "!</w>"]
    assert tok.decode(ids) == "low red circle !"
    unmerged = [tok.decoder[i] for i in tok.encode("lx")]
    assert unmerged == ["l", "x</w>"]
    row = tok("low")[0].tolist()
    assert row[:3] == [tok.sot_token_id, tok.encoder["low</w>"], tok.eot_token_id] and row[3:] == [0] * 7


def test_create_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges file not found"):
        ClipBpeTokenizer(tmp_path / "nope.txt.gz")
    if open_clip_merges_file() is None:
        with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
            create_tokenizer("clip")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        create_tokenizer("sentencepiece")


@pytest.mark.skipif(open_clip_merges_file() is None, reason="open_clip is not installed")
def test_clip_bpe_matches_open_clip():
    import open_clip

    ours = create_tokenizer("clip")
    theirs = open_clip.get_tokenizer("ViT-B-32")
    texts = ["a photo of a red circle.", "IMG_0412.jpg free shipping!!", "naïve café — 3 dogs"]
    assert torch.equal(ours(texts), theirs(texts))
