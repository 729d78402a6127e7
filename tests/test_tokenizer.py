import gzip

import pytest
import torch

from siclip.data import ClipBpeTokenizer, WordTokenizer, create_tokenizer
from siclip.data.tokenizer import (
    build_word_vocabulary, check_unknown_rate, tokenizer_from_spec, tokenizer_spec, unknown_token_rate,
)  # fmt: skip


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
    with pytest.raises(ValueError, match="needs its word list"):
        create_tokenizer("words")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        create_tokenizer("sentencepiece")


def test_packaged_clip_bpe_works_offline():
    """The merges file ships with the package: CLIP's ids for a sentence everyone has tokenized."""
    tok = create_tokenizer("clip")
    assert tok.vocab_size == 49408 and tok.context_length == 77
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_bpe_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")

    ours = create_tokenizer("clip")
    theirs = open_clip.get_tokenizer("ViT-B-32")
    texts = ["a photo of a red circle.", "IMG_0412.jpg free shipping!!", "naïve café — 3 dogs"]
    assert torch.equal(ours(texts), theirs(texts))


def test_word_tokenizer_from_captions_round_trips_as_data():
    captions = ["a handwritten digit seven", "A handwritten digit two.", "digit seven"]
    words = build_word_vocabulary(captions)
    assert words == [".", "a", "digit", "handwritten", "seven", "two"]
    assert build_word_vocabulary(captions, min_count=2) == ["a", "digit", "handwritten", "seven"]
    tok = create_tokenizer("words", words=words, context_length=12)
    spec = tokenizer_spec(tok)
    assert spec == {"name": "words", "context_length": 12, "words": words}  # plain data, no pickle
    again = tokenizer_from_spec(spec)
    assert torch.equal(again(captions), tok(captions)) and again.vocab_size == tok.vocab_size == len(words) + 4
    assert tokenizer_spec(create_tokenizer("clip")) == {"name": "clip", "context_length": 77}
    with pytest.raises(ValueError, match="name"):
        tokenizer_from_spec(["a"], "x.pt")


def test_word_list_file(tmp_path):
    (tmp_path / "w.json").write_text('["b", "a"]')
    (tmp_path / "w.txt").write_text("b\n\na\n")
    for name in ("w.json", "w.txt"):
        assert create_tokenizer("words", vocab_path=tmp_path / name).words[2:-2] == ["a", "b"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        create_tokenizer("words", vocab_path=tmp_path / "bad.json")


def test_unknown_rate_counts_content_tokens_and_refuses_above_threshold():
    tok = create_tokenizer("embedded")
    texts = ["a red circle", "a handwritten digit seven"]  # 3 + 4 content tokens, 3 unknown
    rate, examples = unknown_token_rate(tok, texts)
    assert rate == pytest.approx(3 / 7) and set(examples) == {"handwritten", "digit", "seven"}
    with pytest.raises(ValueError, match=r"42\.9 %.*handwritten"):
        check_unknown_rate(tok, texts, 0.05, "train.csv")
    assert check_unknown_rate(tok, texts[:1], 0.05, "x") == 0.0
    assert unknown_token_rate(create_tokenizer("clip"), texts)[0] == 0.0  # byte-level BPE has no unknowns


def test_retrieval_captions_are_checked_alike_wherever_they_are_read():
    """``check_captions``: the one check of retrieval captions (evaluate's and train's pre-check), every caption of
    every image, refused above the rate with the hint that names real flags; no check at rate None."""
    from siclip.eval import check_captions

    tok = WordTokenizer(["red", "circle", "a"], context_length=8)
    captions = [["a red circle", "a red circle"], ["a blue square"]]  # 2 of 9 content tokens unknown
    with pytest.raises(ValueError, match=r"retrieval\.csv.*22\.2 %.*--tokenizer words.*--max-unknown-rate"):
        check_captions(tok, captions, 0.2, "retrieval.csv")
    check_captions(tok, captions, 0.25, "retrieval.csv")
    check_captions(tok, captions, None, "retrieval.csv")
