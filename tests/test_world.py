import hashlib
import re

import numpy as np
import pytest

from siclip.data import EmbeddedConfig, EmbeddedSource, RawCaptionConfig, create_tokenizer, retrieval_set, zero_shot_prompts
from siclip.data.captions import COLOUR_SYNONYMS, SHAPE_SYNONYMS, zero_shot_classes
from siclip.data.world import BACKGROUNDS, COLOURS, SHAPES, render_scene, sample_scene

# SHA-256 of the first 16 training samples (pixels and captions) of the default world. The generator
# promises the same bytes on any machine; this pins it across machines and library versions.
GOLDEN_DIGEST = "1a88622cf9da91cc9b3fffb5da4f68517f19fa11b247df5c98653748d7adfa38"


def _digest(source, count=16):
    h = hashlib.sha256()
    for i in range(count):
        s = source.load(i)
        h.update(s.image.tobytes())
        h.update(repr((s.raw_caption, s.synthetic)).encode())
    return h.hexdigest()


def test_same_seed_same_bytes_on_any_machine():
    assert _digest(EmbeddedSource(EmbeddedConfig(), "train")) == GOLDEN_DIGEST
    assert _digest(EmbeddedSource(EmbeddedConfig(seed=1), "train")) != GOLDEN_DIGEST


def test_world_has_the_promised_variety():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(set(BACKGROUNDS)) == 4
    scenes = [sample_scene(0, i) for i in range(600)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.size for s in scenes for o in s.objects} == {"small", "medium", "large"}
    images = {render_scene(s).tobytes() for s in scenes}
    assert len(images) == len(scenes)  # jitter: no two images alike


@pytest.mark.parametrize("shape", SHAPES)
def test_every_object_is_drawn_whole_and_apart(shape):
    """Each object paints a visible area of its own colour; objects never overlap or leave the frame."""
    for i in range(20):
        scene = sample_scene(7, i, label=("red", shape))
        image = render_scene(scene, 64)
        painted = np.all(image == scene.objects[0].rgb, axis=-1).sum()
        assert painted >= 12, (shape, painted)
    for i in range(50):  # three large objects in the most crowded layout still stay apart
        scene = sample_scene(3, i, num_objects=3)
        image = render_scene(scene, 96)
        for obj in scene.objects:
            assert np.all(image == obj.rgb, axis=-1).sum() > 0


def test_splits_never_share_an_image():
    cfg = EmbeddedConfig(num_train=400, num_val=200, num_test=200)
    hashes = {split: {EmbeddedSource(cfg, split).load(i).image.tobytes() for i in range(200)} for split in ("train", "val", "test")}
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"] and not hashes["val"] & hashes["test"]


def _mentions(caption: str, colour: str, shape: str) -> bool:
    return any(c in caption for c in COLOUR_SYNONYMS[colour]) and any(s in caption for s in SHAPE_SYNONYMS[shape])


@pytest.mark.parametrize("raw", [RawCaptionConfig(), RawCaptionConfig(p_partial=0.5, p_irrelevant=0.2, p_mismatch=0.05)])
def test_caption_statistics_match_the_config(raw):
    n = 2000
    source = EmbeddedSource(EmbeddedConfig(num_train=n, raw=raw, num_synthetic=4), "train")
    kinds = {"partial": 0, "irrelevant": 0, "mismatch": 0, "correct": 0}
    for i in range(n):
        sample = source.load(i)
        kinds[sample.meta["raw_kind"]] += 1
        assert len(sample.synthetic) == 4
        for caption in sample.synthetic:  # every synthetic caption names every object
            for colour, shape in sample.meta["objects"]:
                assert _mentions(caption, colour, shape), (caption, sample.meta["objects"])
        if sample.meta["raw_kind"] == "correct":
            assert all(f"{c} {s}" in sample.raw_caption for c, s in sample.meta["objects"])
    for kind, rate in [("partial", raw.p_partial), ("irrelevant", raw.p_irrelevant), ("mismatch", raw.p_mismatch)]:
        sigma = np.sqrt(rate * (1 - rate) / n)
        assert abs(kinds[kind] / n - rate) < 4 * sigma + 1e-9, (kind, kinds[kind] / n, rate)
    irrelevant = [source.load(i).raw_caption for i in range(200) if source.load(i).meta["raw_kind"] == "irrelevant"]
    assert any(re.fullmatch(r"(IMG|DSC|photo)_\d{4}\.jpg", c) for c in irrelevant) or raw.p_irrelevant < 0.15


def test_synthetic_captions_vary_in_wording():
    source = EmbeddedSource(EmbeddedConfig(num_train=50), "train")
    multi = [source.load(i) for i in range(50) if len(source.load(i).meta["objects"]) > 1]
    assert all(len(set(s.synthetic)) == 5 for s in multi)
    words = {w for s in multi for c in s.synthetic for w in c.split()}
    assert {"disc", "rhombus", "next", "picture"} & words


def test_zero_shot_and_retrieval_sets():
    classes, templates = zero_shot_prompts()
    assert len(classes) >= 64 and len(set(classes)) == len(classes) and "red circle" in classes
    assert all("{}" in t for t in templates)
    source = EmbeddedSource(EmbeddedConfig(zero_shot_per_class=2), "zeroshot")
    assert len(source) == 2 * len(classes)
    for i in range(0, len(source), 37):
        colour, shape = zero_shot_classes()[source.label(i)]
        assert source.load(i).meta["objects"] == [(colour, shape)]
    images, captions = retrieval_set(EmbeddedConfig(num_test=30), "test")
    assert len(captions) == 30 and all(len(c) == 5 for c in captions)
    for i in range(30):
        for caption in captions[i]:
            assert all(_mentions(caption, c, s) for c, s in images.load(i).meta["objects"])


def test_generator_config_errors():
    with pytest.raises(ValueError, match="sum to at most 1"):
        RawCaptionConfig(p_partial=0.8, p_irrelevant=0.3)
    with pytest.raises(ValueError, match="unknown split"):
        EmbeddedSource(EmbeddedConfig(), "holdout")
    with pytest.raises(IndexError, match="out of range"):
        EmbeddedSource(EmbeddedConfig(num_val=3), "val").load(3)


def test_embedded_vocabulary_covers_every_caption_word():
    tok = create_tokenizer("embedded")
    source = EmbeddedSource(EmbeddedConfig(num_train=100), "train")
    classes, templates = zero_shot_prompts()
    texts = [c for i in range(100) for c in source.load(i).synthetic] + [t.format(c) for t in templates for c in classes]
    for text in texts:
        assert tok.unk_token_id not in tok.encode(text), text
