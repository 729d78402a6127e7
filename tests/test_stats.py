"""The two-level bootstrap against a plain loop, and the properties its intervals promise."""

import numpy as np
import pytest
import torch

from siclip.analysis.stats import bootstrap_means, estimate, paired_difference


def _plain_bootstrap(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """One replicate at a time, with Python loops, drawing the same indices as one vectorised chunk."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(x.shape[0], size=(resamples, x.shape[0]))
    items = rng.integers(x.shape[1], size=(resamples, x.shape[1]))
    out = []
    for b in range(resamples):
        total = 0.0
        for s in seeds[b]:
            total += sum(x[s, i] for i in items[b]) / x.shape[1]
        out.append(total / x.shape[0])
    return np.array(out)


def test_bootstrap_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    x = rng.random((3, 40)) < rng.uniform(0.2, 0.8)
    np.testing.assert_allclose(bootstrap_means(x, resamples=300, seed=seed), _plain_bootstrap(x.astype(float), 300, seed), rtol=1e-12)


def test_estimate_mean_std_and_interval(seed):
    rng = np.random.default_rng(seed)
    x = (rng.random((4, 500)) < 0.3).astype(float)
    e = estimate(x, seed=seed)
    per_seed = x.mean(1)
    assert e.mean == pytest.approx(per_seed.mean()) and e.std == pytest.approx(per_seed.std(ddof=1)) and e.seeds == 4
    assert e.low < e.mean < e.high
    one = estimate(x[:1], seed=seed)
    assert one.std == 0.0 and one.low < one.mean < one.high  # one seed: the items still vary
    assert "±" in e.format() and e.format().startswith(f"{100 * e.mean:.1f}")


def test_interval_covers_the_true_rate_about_95_percent_of_the_time(seed):
    """Bernoulli items with a per-seed rate around p: the 95 % interval should cover p in most repetitions."""
    rng = np.random.default_rng(seed)
    p, covered, trials = rng.uniform(0.2, 0.6), 0, 200
    for t in range(trials):
        rates = np.clip(p + rng.normal(0, 0.02, size=3), 0, 1)  # seed-to-seed variation around p
        x = rng.random((3, 300)) < rates[:, None]
        e = estimate(x, resamples=400, seed=t)
        covered += e.low <= p <= e.high
    # Percentile bootstrap with 3 seeds under-covers a little; 200 trials: binomial sd about 1.5 points.
    assert 0.80 <= covered / trials <= 0.995


def test_more_items_narrow_the_interval(seed):
    rng = np.random.default_rng(seed)
    small = estimate(rng.random((3, 100)) < 0.5, seed=seed)
    large = estimate(rng.random((3, 10_000)) < 0.5, seed=seed)
    assert (large.high - large.low) < 0.3 * (small.high - small.low)


def test_paired_difference_cancels_shared_noise(seed):
    rng = np.random.default_rng(seed)
    difficulty = rng.random(800)  # items hard for every row
    a = rng.random((3, 800)) * 0.2 + 0.8 * difficulty > 0.5
    b = a.copy()
    flip = rng.random((3, 800)) < 0.05  # b differs from a on 5 % of items, half up half down
    b[flip] = ~b[flip]
    d = paired_difference(a, b, seed=seed)
    assert d.mean == pytest.approx((a.astype(float) - b).mean(1).mean())
    unpaired = np.hypot(estimate(a, seed=seed).high - estimate(a, seed=seed).low, estimate(b, seed=seed).high - estimate(b, seed=seed).low)
    assert d.high - d.low < 0.5 * unpaired
    same = paired_difference(a, a, seed=seed)
    assert same.mean == same.low == same.high == 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="seeds, items"):
        estimate(np.zeros(5))
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_difference(np.zeros((3, 5)), np.zeros((2, 5)))


def test_paired_speedup_is_the_geometric_mean_of_round_ratios_and_cancels_slow_spells(seed):
    from siclip.analysis.benchmark import paired_speedup

    rng = np.random.default_rng(seed)
    rounds = 40
    spells = np.exp(rng.normal(0, 0.3, rounds))  # the machine's speed drifts by ±30 % between rounds
    jitter = np.exp(rng.normal(0, 0.01, rounds))
    base = 100.0 * spells
    other = base / 1.05 * jitter  # 5 % faster, measured moments apart
    s = paired_speedup(list(base), list(other))
    ratios = base / other
    assert s.mean == pytest.approx(float(np.exp(np.log(ratios).mean())), rel=1e-12)
    assert s.low <= s.mean <= s.high
    assert s.low > 1.04 and s.high < 1.06  # the drift cancels: the interval is about ±0.3 %, not ±10 %
    assert s.seeds == rounds
    exact = paired_speedup([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert (exact.mean, exact.low, exact.high) == pytest.approx((2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([1.0, 2.0], [1.0])


def test_time_interleaved_alternates_the_order_and_keeps_each_variants_rounds():
    from siclip.analysis.benchmark import time_interleaved

    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = time_interleaved(steps, torch.device("cpu"), rounds=4, warmup=1)
    assert calls[:3] == list("abc")  # warm-up
    assert "".join(calls[3:]) == "abc" "cba" "abc" "cba"
    assert all(len(r["times_ms"]) == 4 and r["ms"] >= 0 for r in result.values())
