"""The noisy embedded world: an exact fraction of pairs carries another scene's captions, and says so."""

import numpy as np
import pytest

from siclip.data import EmbeddedConfig, EmbeddedSource
from siclip.data.captions import short_caption


@pytest.mark.parametrize("fraction,size", [(0.5, 40), (0.3, 37), (1 / 37, 37), (1.0, 12)])
def test_noise_fraction_is_exact_recorded_and_the_captions_belong_to_other_scenes(fraction, size):
    clean = EmbeddedSource(EmbeddedConfig(num_train=size, image_size=16), "train")
    noisy = EmbeddedSource(EmbeddedConfig(num_train=size, image_size=16, caption_noise=fraction), "train")
    flagged = [i for i in range(size) if noisy.load(i).meta["noisy"]]
    assert len(flagged) == round(fraction * size) and flagged == noisy.noisy_indices().tolist()
    donors = noisy.caption_donors()
    for i in range(size):
        sample, own = noisy.load(i), clean.load(i)
        assert np.array_equal(sample.image, own.image)  # images never move
        assert sample.meta["objects"] == own.meta["objects"]
        if i in donors:
            donor = clean.load(donors[i])
            assert donors[i] != i and sample.meta["caption_of"] == donors[i]
            assert (sample.raw_caption, sample.synthetic) == (donor.raw_caption, donor.synthetic)
            assert short_caption(clean.scene(donors[i])) != short_caption(clean.scene(i))  # the words describe another scene
        else:
            assert (sample.raw_caption, sample.synthetic, sample.meta["noisy"]) == (own.raw_caption, own.synthetic, False)
    if len(donors) > 1:  # the noisy pairs pass their own captions round: the caption multiset is the clean world's
        assert sorted(donors.values()) == sorted(donors)


def test_noise_is_a_function_of_the_seed_and_only_of_the_training_split():
    a = EmbeddedSource(EmbeddedConfig(num_train=50, caption_noise=0.4), "train").noisy_indices()
    assert np.array_equal(a, EmbeddedSource(EmbeddedConfig(num_train=50, caption_noise=0.4), "train").noisy_indices())
    assert not np.array_equal(a, EmbeddedSource(EmbeddedConfig(num_train=50, caption_noise=0.4, seed=1), "train").noisy_indices())
    assert len(EmbeddedSource(EmbeddedConfig(num_val=50, caption_noise=0.4), "val").noisy_indices()) == 0
    assert len(EmbeddedSource(EmbeddedConfig(num_train=50), "train").noisy_indices()) == 0
    with pytest.raises(ValueError, match="caption_noise must be a fraction"):
        EmbeddedConfig(caption_noise=1.5)
