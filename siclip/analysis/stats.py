"""Seeds and evaluation items as a two-level sample: means, spreads, bootstrap intervals, paired differences.

A metric of run ``s`` (a training seed) is the mean of per-item outcomes ``x[s, i]`` over the
evaluation items ``i`` (1 when the image is classified / retrieved correctly, else 0). Its uncertainty
has two sources: the seed (training noise) and the finite evaluation set. The two-level bootstrap
resamples both, as the data were drawn:

    for b = 1..B:  seeds s*_1..s*_S ~ U{seeds} with replacement,   items i*_1..i*_N ~ U{items} with replacement,
                   θ*_b = (1/S) Σ_k (1/N) Σ_j x[s*_k, i*_j]
    95 % interval = [q_0.025(θ*), q_0.975(θ*)]                               (percentile bootstrap)

Two rows evaluated on the same items with the same seeds are **paired**: their difference
``d[s, i] = x_a[s, i] − x_b[s, i]`` is bootstrapped with the same resampled seeds and items for
both rows, so the shared noise (hard items, a lucky seed's data order) cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """``mean`` over seeds, ``std`` across seeds (ddof 1; 0 for one seed) and the bootstrap interval ``[low, high]``."""

    mean: float
    std: float
    low: float
    high: float
    seeds: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"41.2 ± 0.8 [39.9, 42.6]"`` (values times ``scale``, e.g. percent)."""
        f = f"{{:.{digits}f}}"
        return f"{f.format(scale * self.mean)} ± {f.format(scale * self.std)} [{f.format(scale * self.low)}, {f.format(scale * self.high)}]"


def _as_outcomes(outcomes) -> np.ndarray:
    x = np.asarray(outcomes, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"outcomes must be a (seeds, items) array with at least one of each, got shape {x.shape}")
    return x


def bootstrap_means(outcomes, *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``resamples`` two-level bootstrap replicates of the grand mean of ``outcomes`` (seeds × items)."""
    x = _as_outcomes(outcomes)
    n_seeds, n_items = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    # Chunks keep the (chunk, seeds, items) index tensor small.
    chunk = max(1, 2**22 // (n_seeds * n_items))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        seeds = rng.integers(n_seeds, size=(b, n_seeds))
        items = rng.integers(n_items, size=(b, n_items))
        # Mean over resampled items of each resampled seed: x[s*, :] averaged at columns i*.
        out[start : start + b] = x[seeds[:, :, None], items[:, None, :]].mean(axis=(1, 2))
    return out


def estimate(outcomes, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean, across-seed std of the per-seed metrics, and the two-level percentile bootstrap interval."""
    x = _as_outcomes(outcomes)
    per_seed = x.mean(axis=1)
    replicates = bootstrap_means(x, resamples=resamples, seed=seed)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return Estimate(float(per_seed.mean()), std, float(low), float(high), len(per_seed))


def paired_difference(a, b, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """``a − b`` for two rows evaluated on the same items with the same seeds (row k of each is seed k)."""
    x, y = _as_outcomes(a), _as_outcomes(b)
    if x.shape != y.shape:
        raise ValueError(f"paired rows need the same seeds and items, got shapes {x.shape} and {y.shape}")
    return estimate(x - y, level=level, resamples=resamples, seed=seed)
