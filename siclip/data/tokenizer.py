"""Tokenizers with one interface: ``tokenizer(texts) -> LongTensor (n, context_length)``.

- :class:`WordTokenizer`: a word-level vocabulary (the embedded world's, or one built from the user's
  training captions with :func:`build_word_vocabulary`). The end-of-text token has the largest id, so
  end-of-text pooling by ``argmax`` over ids works as with CLIP's BPE.
- :class:`ClipBpeTokenizer`: CLIP's byte-level BPE (Radford et al. 2021) read from a merges file.
  The package ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, notice in ``vocab/``), so
  :func:`create_tokenizer` ``("clip")`` works offline with no extra install.

A tokenizer is saved with a model as plain data (:func:`tokenizer_spec`, :func:`tokenizer_from_spec`):
a name, and for word tokenizers the word list; never a pickled object. A foreign library's tokenizer (a
transformers tokenizer, open_clip's) describes itself (its ``spec()``: a transformers tokenizer's saved files,
held as text inside the spec, so the spec needs no folder) and is rebuilt by its library's module in
:mod:`siclip.interop` (:data:`FOREIGN_TOKENIZERS`).

:func:`unknown_token_rate` measures how much of a caption set a tokenizer cannot represent:
``rate = #<unk> ids / #content ids`` (sot, eot and padding excluded); byte-level BPE has none.

Both follow open_clip's convention: ``[sot] tokens [eot]`` then zero padding, truncated to the context
length with the last kept token replaced by ``eot``.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch
from torch import Tensor

CLIP_MERGES_FILE = Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
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

    def __init__(self, words: Sequence[str], context_length: int = 32, name: str = "words") -> None:
        self.name = name
        words = sorted(set(words) - {"<pad>", "<unk>", "<sot>", "<eot>"})
        self.words = ["<pad>", "<unk>", *words, "<sot>", "<eot>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.context_length = context_length
        self.pad_token_id, self.unk_token_id = 0, 1
        self.sot_token_id, self.eot_token_id = len(self.words) - 2, len(self.words) - 1
        self.vocab_size = len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_token_id) for w in basic_words(text)]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in basic_words(text) if w not in self.ids]

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
    name = "clip"
    unk_token_id = None  # byte-level: every text is representable

    def __init__(self, merges_path: str | Path = None, context_length: int = 77) -> None:
        import regex

        path = Path(merges_path) if merges_path is not None else CLIP_MERGES_FILE
        self.merges_path = None if merges_path is None else str(merges_path)
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


def build_word_vocabulary(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """The words (:func:`basic_words`) of ``captions`` seen at least ``min_count`` times, sorted."""
    counts = Counter(w for text in captions for w in basic_words(text))
    return sorted(w for w, n in counts.items() if n >= min_count)


def create_tokenizer(name: str = "embedded", *, vocab_path: str | Path | None = None, context_length: int | None = None, words=None):
    """A tokenizer by name.

    - ``"embedded"``: the world's word tokenizer.
    - ``"clip"``: CLIP BPE from the packaged merges file, or ``vocab_path``.
    - ``"words"``: a word tokenizer over ``words`` (e.g. :func:`build_word_vocabulary` of the training
      captions) or over the JSON word list at ``vocab_path``.
    """
    if name == "embedded":
        from .captions import vocabulary_texts

        return WordTokenizer(build_word_vocabulary(vocabulary_texts()), context_length or 32, name="embedded")
    if name == "clip":
        return ClipBpeTokenizer(vocab_path, context_length or 77)
    if name == "words":
        if words is None:
            if vocab_path is None:
                raise ValueError("the 'words' tokenizer needs its word list: build it from the training captions or pass vocab_path (a JSON list)")
            words = read_word_list(vocab_path)
        return WordTokenizer(words, context_length or 32)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'embedded', 'clip' or 'words'")


def read_string_list(path: str | Path, what: str) -> list[str]:
    """The strings of a file holding a JSON list, or one per line (blank lines skipped); ``what`` names them
    in errors ("words", "class names")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON list of {what} ({err})") from None
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{path}: expected a non-empty list of {what}")
    return items


def read_word_list(path: str | Path) -> list[str]:
    """A JSON list of words (as :func:`save_word_list` writes), or one word per line."""
    return read_string_list(path, "words")


# Spec name → (the siclip.interop module that rebuilds it, the library it imports, that library's pip package).
FOREIGN_TOKENIZERS = {"hf": ("siclip.interop.transformers", "transformers", "transformers"),
                      "open_clip": ("siclip.interop.open_clip", "open_clip", "open_clip_torch")}  # fmt: skip


def tokenizer_spec(tokenizer) -> dict:
    """What rebuilds ``tokenizer``, as plain data for a checkpoint: name, context length, words or the merges file's
    absolute path (resolved when stored, so moving the working directory does not matter); a foreign tokenizer's own
    ``spec()``."""
    own = getattr(tokenizer, "spec", None)
    if callable(own):
        return own()
    spec = {"name": tokenizer.name, "context_length": tokenizer.context_length}
    if tokenizer.name == "words":
        spec["words"] = tokenizer.words[2:-2]
    if tokenizer.name == "clip" and tokenizer.merges_path is not None:
        spec["vocab_path"] = str(Path(tokenizer.merges_path).resolve())
    return spec


def tokenizer_from_spec(spec: dict, where: str = "checkpoint"):
    """The tokenizer :func:`tokenizer_spec` described."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{where}: the saved tokenizer must be a dict with a 'name', got {type(spec).__name__}")
    if spec["name"] in FOREIGN_TOKENIZERS:
        import importlib

        from siclip.errors import require

        module, library, package = FOREIGN_TOKENIZERS[spec["name"]]
        require(library, package, f"{where}'s {spec['name']} tokenizer")
        return importlib.import_module(module).tokenizer_from_spec(spec, where)
    return create_tokenizer(spec["name"], vocab_path=spec.get("vocab_path"), context_length=spec.get("context_length"), words=spec.get("words"))


def unknown_token_rate(tokenizer, texts: Iterable[str]) -> tuple[float, list[str]]:
    """``(#<unk> / #content tokens, the most frequent unknown words)`` of ``texts`` under ``tokenizer``."""
    unk = getattr(tokenizer, "unk_token_id", None)
    total, unknown, words = 0, 0, Counter()
    for text in texts:
        ids = tokenizer.encode(text)
        total += len(ids)
        if unk is not None:
            unknown += sum(1 for i in ids if i == unk)
            words.update(tokenizer.unknown_words(text))
    return (unknown / total if total else 0.0), [w for w, _ in words.most_common(8)]


CAPTION_HINT = "Use --tokenizer words (a vocabulary from your captions) or --tokenizer clip"


def check_unknown_rate(tokenizer, texts: Sequence[str], threshold: float, where: str, *, what: str = "caption",
                       hint: str = CAPTION_HINT) -> float:  # fmt: skip
    """Refuse (``ValueError``) when more than ``threshold`` of the content tokens of ``texts`` are ``<unk>``."""
    rate, examples = unknown_token_rate(tokenizer, texts)
    if rate > threshold:
        raise ValueError(
            f"{where}: the {tokenizer.name!r} tokenizer maps {100 * rate:.1f} % of the {what} tokens to <unk> "
            f"(threshold {100 * threshold:.0f} %), e.g. {examples}; the model would not see these words. {hint}"
        )
    return rate


def tokenizer_for(text_config, spec: dict | None = None, where: str = "checkpoint"):
    """The tokenizer a model was trained with: the saved ``spec`` if any, else the one its text config names."""
    if spec is not None:
        return tokenizer_from_spec(spec, where)
    return create_tokenizer(text_config.tokenizer, context_length=text_config.context_length)


def real_token_mask(ids: Tensor, tokenizer=None) -> Tensor:
    """``(n, L)`` True at the positions of ``ids`` that are tokens, False at padding: the tokenizer's own attention
    mask when it has one (a transformers tokenizer's), else every position up to the first end-of-text token
    (``tokenizer.eot_token_id``; without a tokenizer, the largest id, as siclip's and CLIP's text encoders pool).
    A row without an end-of-text token is all tokens."""
    mask = getattr(tokenizer, "attention_mask", None)
    if callable(mask):
        given = mask(ids)
        if given is not None:
            return given.bool()
    positions = torch.arange(ids.shape[-1], device=ids.device)
    eot_id = getattr(tokenizer, "eot_token_id", None)
    if eot_id is None:
        end = ids.argmax(-1)
    else:
        is_end = ids == eot_id
        end = torch.where(is_end.any(-1), is_end.int().argmax(-1), torch.full_like(ids[:, 0], ids.shape[-1] - 1))
    return positions[None, :] <= end[:, None]
