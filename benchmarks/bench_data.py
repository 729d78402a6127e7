"""pytest-benchmark suite for the data pipeline (CPU): world generation and decode + augment."""

import numpy as np
import pytest

from siclip.data import AugmentConfig, EmbeddedConfig, EmbeddedSource, augment, decode_image, encode_image


@pytest.mark.parametrize("size", [64, 256])
def test_generate_sample(benchmark, size):
    source = EmbeddedSource(EmbeddedConfig(image_size=size, num_train=10**6), "train")
    counter = iter(range(10**6))
    benchmark.group = f"data {size}px"
    sample = benchmark(lambda: source.load(next(counter)))
    assert sample.image.shape == (size, size, 3)


@pytest.mark.parametrize("size", [64, 256])
def test_decode_and_augment_jpeg(benchmark, size):
    image = EmbeddedSource(EmbeddedConfig(image_size=size), "train").load(0).image
    data = encode_image(image, "jpg")
    config = AugmentConfig(image_size=size)
    rng = np.random.default_rng(0)
    benchmark.group = f"data {size}px"
    out = benchmark(lambda: augment(decode_image(data, "k"), rng, config))
    assert out.shape == (3, size, size)
