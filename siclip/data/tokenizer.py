"""Tokenizers with one interface: ``tokenizer(texts) -> LongTensor (n, context_length)``.

- :class:`WordTokenizer`: a word-level vocabulary (the embedded world's by default). The end-of-text
  token has the largest id, so end-of-text pooling by ``argmax`` over ids works as with CLIP's BPE.
- :class:`ClipBpeTokenizer`: CLIP's byte-level BPE (Radford et al. 2021) read from a merges file
  (``bpe_simple_vocab_16e6.txt.gz``, the one open_clip ships); nothing is downloaded.
  :func:`create_tokenizer` ``("clip")`` finds that file in an installed ``open_clip``.

Both follow open_clip's convention: ``[sot] tokens [eot]`` then zero padding, truncated to the context
length with the last kept token replaced by ``eot``.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor

_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def basic_words(text: str) -> list[str]:
    """Lower-case words, digit runs and single punctuation marks."""
    return _WORD.findall(text.lower())


class Tokenizer(Protocol):
    context_length: int
    vocab_size: int
    sot_token_id: int
    eot_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor: ...


class _Tokenize:
    """The shared ``__call__``: sot + ids + eot, truncation and padding."""

    context_length: int
    sot_token_id: int
    eot_token_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must leave room for sot and eot tokens, got {length}")
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at position {row}")
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class WordTokenizer(_Tokenize):
    """Word-level tokenizer: ``<pad>`` = 0, ``<unk>`` = 1, the words, then ``<sot>``, ``<eot>`` (largest id)."""

    def __init__(self, words: Sequence[str], context_length: int = 32) -> None:
        words = sorted(set(words))
        self.words = ["<pad>", "<unk>", *words, "<sot>", "<eot>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.context_length = context_length
        self.pad_token_id, self.unk_token_id = 0, 1
        self.sot_token_id, self.eot_token_id = len(self.words) - 2, len(self.words) - 1
        self.vocab_size = len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_token_id) for w in basic_words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids if i not in (self.pad_token_id, self.sot_token_id, self.eot_token_id))


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class ClipBpeTokenizer(_Tokenize):
    """CLIP's byte-level BPE from a merges file; vocabulary 49,408 with the standard file."""

    NUM_MERGES = 49152 - 256 - 2  # as in CLIP: the file has more lines than the model uses

    def __init__(self, merges_path: str | Path, context_length: int = 77) -> None:
        import regex

        path = Path(merges_path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : self.NUM_MERGES + 1] if line.strip()]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder["<|startoftext|>"]
        self.eot_token_id = self.encoder["<|endoftext|>"]
        self._pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._cache: dict[str, str] = {}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[token] = " ".join(word)
        return self._cache[token]

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(text)).split()).lower()
        byte_encoder = _bytes_to_unicode()
        ids = []
        for token in self._pattern.findall(text):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot_token_id, self.eot_token_id) and i in self.decoder)
        return bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()


def open_clip_merges_file() -> Path | None:
    """The merges file an installed ``open_clip`` ships, if any."""
    try:
        import open_clip
    except ImportError:
        return None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def create_tokenizer(name: str = "embedded", *, vocab_path: str | Path | None = None, context_length: int | None = None):
    """``"embedded"``: the world's word tokenizer; ``"clip"``: CLIP BPE from ``vocab_path`` or open_clip."""
    if name == "embedded":
        from .captions import vocabulary

        return WordTokenizer(vocabulary(), context_length or 32)
    if name == "clip":
        path = vocab_path or open_clip_merges_file()
        if path is None:
            raise FileNotFoundError(
                "the CLIP BPE tokenizer needs its merges file (bpe_simple_vocab_16e6.txt.gz): pass vocab_path= "
                "or install open_clip_torch, which ships it; nothing is downloaded"
            )
        return ClipBpeTokenizer(path, context_length or 77)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'embedded' or 'clip'")
