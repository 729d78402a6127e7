import warnings

import pytest
import torch

from siclip.data import AugmentConfig, EmbeddedConfig, EmbeddedSource, EpochSampler, ImageTextDataset, ImageTextLoader, create_tokenizer

CFG = EmbeddedConfig(num_train=90)


def _dataset(p_synthetic=0.5):
    return ImageTextDataset(EmbeddedSource(CFG, "train"), create_tokenizer(), augment_config=AugmentConfig(24), p_synthetic=p_synthetic, seed=11)


def _loader(workers):
    return ImageTextLoader(_dataset(), batch_size=8, num_workers=workers, seed=5, shuffle=True)


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [0, 4, 11])
def test_exact_mid_epoch_resume(workers, stop_after):
    reference = _loader(workers)
    epoch0 = list(reference)
    epoch1 = list(reference)
    assert len(epoch0) == 90 // 8 and [b["key"] for b in epoch0] != [b["key"] for b in epoch1]

    interrupted = _loader(workers)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(stop_after)]
    state = interrupted.state_dict()
    del iterator, interrupted  # the "crash"

    resumed = _loader(workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    _same_batches(seen + rest, epoch0)
    _same_batches(list(resumed), epoch1)  # and the next epoch is the one an uninterrupted run sees


def test_resume_across_worker_counts_gives_the_same_samples():
    """Samples depend on (seed, epoch, index) only, so a run may resume with another worker count."""
    a = _loader(2)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    rest_two = list(it)
    b = _loader(0)
    b.load_state_dict(state)
    _same_batches(list(b), rest_two)


def test_sampler_splits_ranks_evenly_and_disjointly():
    orders = [EpochSampler(10, seed=1, rank=r, world_size=3).order(0) for r in range(3)]
    assert all(len(o) == 3 for o in orders)
    flat = sorted(int(i) for o in orders for i in o)
    assert len(set(flat)) == 9
    assert not (EpochSampler(10, seed=1).order(0) == EpochSampler(10, seed=1).order(1)).all()
    assert list(EpochSampler(5, shuffle=False).order(3)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, rank=3, world_size=3)


def test_uint8_crops_normalised_on_the_device_equal_the_worker_path(seed):
    import numpy as np

    from siclip.data import Preprocess, augment, model_pixels, normalize_images
    from siclip.train.step import to_device

    image = np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    floats = augment(image, np.random.default_rng(seed + 1), AugmentConfig(24))
    crops = augment(image, np.random.default_rng(seed + 1), AugmentConfig(24, normalize=False))
    assert crops.dtype == torch.uint8 and floats.dtype == torch.float32
    assert torch.equal(normalize_images(crops), floats)
    batch = to_device({"image": crops[None], "size": 1}, torch.device("cpu"))
    assert batch["image"].dtype == torch.uint8  # each model normalises the crop its own way, on the device
    assert torch.equal(model_pixels(batch["image"], Preprocess(24))[0], floats)
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(floats)


def test_building_a_loader_prints_no_library_deprecation_notice():
    """torchdata's loader calls torch.set_vital, which torch deprecated: every run printed that notice, which
    says nothing to a user (and hid the warnings that do)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loader(0)
    assert not [w for w in caught if "set_vital" in str(w.message)], [str(w.message) for w in caught]
