"""Captions of the embedded world: noisy raw web captions and accurate synthetic ones.

This mirrors the paper's CC12M (alt-text) against CC12M-SYN (several captioner outputs per image):

- :func:`raw_caption`: short alt-text, at configured rates *partial* ("a red thing"), *irrelevant*
  ("IMG_0412.jpg", "free shipping") or *mismatched* (the caption of another image); otherwise a short
  but correct description.
- :func:`synthetic_captions`: K accurate descriptions with varied wording, synonyms, word order and
  level of detail, as a captioning model would give. Every one names each object's colour and shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .world import COLOURS, SHAPES, Scene, WorldObject

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hoop"),
    "star": ("star", "six pointed star"),
    "heart": ("heart",),
    "hexagon": ("hexagon",),
    "crescent": ("crescent", "crescent moon"),
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium sized", "mid sized"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "against a flat background"),
    "gradient": ("on a gradient background", "against a smooth gradient"),
    "stripes": ("on a striped background", "against stripes"),
    "noise": ("on a noisy background", "against a grainy texture"),
}
OPENERS = ("", "a picture of ", "an image of ", "a photo showing ", "there is ", "this image shows ")
JOINERS = (" and ", " next to ", " along with ", ", and ")
IRRELEVANT = ("free shipping", "click to enlarge", "best price online", "stock photo", "untitled", "new arrival")
PARTIAL_TEMPLATES = ("a {colour} thing", "{shape}", "something {colour}", "shapes", "a picture with a {shape}")
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a drawing of a {}.",
    "a {} on a background.",
    "there is a {} in the image.",
)


@dataclass(frozen=True)
class RawCaptionConfig:
    """Rates of the raw caption's failure modes; the rest are short, correct alt-text."""

    p_partial: float = 0.25
    p_irrelevant: float = 0.10
    p_mismatch: float = 0.10

    def __post_init__(self) -> None:
        rates = (self.p_partial, self.p_irrelevant, self.p_mismatch)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"raw caption rates must be non-negative and sum to at most 1, got {rates}")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def short_caption(scene: Scene) -> str:
    """Terse correct alt-text: "red circle, blue star"."""
    return ", ".join(f"{o.colour} {o.shape}" for o in scene.objects)


def raw_caption(
    scene: Scene, rng: np.random.Generator, config: RawCaptionConfig, other: Callable[[], Scene]
) -> tuple[str, str]:
    """``(caption, kind)`` with kind one of ``partial``, ``irrelevant``, ``mismatch``, ``correct``.

    ``other()`` gives the scene a mismatched caption describes instead (drawn only when needed).
    """
    u = rng.random()
    first = scene.objects[int(rng.integers(len(scene.objects)))]
    if u < config.p_partial:
        return _pick(rng, PARTIAL_TEMPLATES).format(colour=first.colour, shape=first.shape), "partial"
    u -= config.p_partial
    if u < config.p_irrelevant:
        if rng.random() < 0.5:
            return f"{_pick(rng, ('IMG', 'DSC', 'photo'))}_{int(rng.integers(10000)):04d}.jpg", "irrelevant"
        return _pick(rng, IRRELEVANT), "irrelevant"
    u -= config.p_irrelevant
    if u < config.p_mismatch:
        return short_caption(other()), "mismatch"
    return short_caption(scene), "correct"


def _object_phrase(obj: WorldObject, rng: np.random.Generator, detail: int) -> str:
    words = []
    if detail >= 2 and rng.random() < 0.7:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    words += [_pick(rng, COLOUR_SYNONYMS[obj.colour]), _pick(rng, SHAPE_SYNONYMS[obj.shape])]
    phrase = " ".join(words)
    article = "an" if phrase[0] in "aeiou" else "a"
    phrase = f"{article} {phrase}"
    if detail >= 1 and rng.random() < 0.6:
        phrase += " " + _pick(rng, POSITION_PHRASES[obj.position])
    return phrase


def synthetic_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One accurate description; the level of detail (0–2) and the object order vary."""
    detail = int(rng.integers(3))
    order = rng.permutation(len(scene.objects))
    phrases = [_object_phrase(scene.objects[i], rng, detail) for i in order]
    body = phrases[0]
    for p in phrases[1:]:
        body += _pick(rng, JOINERS) + p
    if detail >= 1 and rng.random() < 0.5:
        body += " " + _pick(rng, BACKGROUND_PHRASES[scene.background])
    return (_pick(rng, OPENERS) + body).strip()


def synthetic_captions(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` accurate captions, distinct where the wording allows."""
    captions: list[str] = []
    for _ in range(count * 4):
        caption = synthetic_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    while len(captions) < count:  # a one-object scene has few wordings; repeats are then allowed
        captions.append(synthetic_caption(scene, rng))
    return captions


def zero_shot_classes() -> list[tuple[str, str]]:
    """Every (colour, shape) pair: 100 classes such as ("red", "circle")."""
    return [(c, s) for s in SHAPES for c in COLOURS]


def vocabulary_texts() -> list[str]:
    """Every phrase the world's captions and prompts are made of, placeholders blanked: the word-level tokenizer's
    vocabulary is their words (:func:`siclip.data.tokenizer.build_word_vocabulary`)."""
    texts = [
        *(w for ws in SHAPE_SYNONYMS.values() for w in ws),
        *(w for ws in COLOUR_SYNONYMS.values() for w in ws),
        *(w for ws in SIZE_WORDS.values() for w in ws),
        *(w for ws in POSITION_PHRASES.values() for w in ws),
        *(w for ws in BACKGROUND_PHRASES.values() for w in ws),
        *OPENERS, *JOINERS, *IRRELEVANT, *PARTIAL_TEMPLATES, *ZERO_SHOT_TEMPLATES,
        "img dsc photo jpg an a", *SHAPES, *COLOURS,
    ]  # fmt: skip
    return [t.replace("{}", " ").format(colour="", shape="") for t in texts]
