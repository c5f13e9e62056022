"""The package's one bootstrap confidence interval (NCES per latent and per SAE, probing's
differences): scipy's BCa, the percentile interval where BCa is degenerate."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats


def bootstrap_interval(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    random_state: np.random.Generator | int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of ``statistic`` over the rows of ``samples`` (resampled together when
    several, i.e. paired): BCa (``scipy.stats.bootstrap``), the percentile interval where BCa
    is not finite; NaN below 2 rows or where neither is finite.

    ``statistic(*samples, axis=-1)`` reduces along ``axis`` (as ``np.mean`` does). A
    ``Generator`` ``random_state`` is drawn on by both tries; a seed starts each afresh.
    """
    if len(samples[0]) < 2:
        return np.nan, np.nan
    for method in ("BCa", "percentile"):
        rng = (
            random_state
            if isinstance(random_state, np.random.Generator)
            else np.random.default_rng(random_state)
        )
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                samples,
                statistic,
                paired=len(samples) > 1,
                vectorized=True,
                n_resamples=n_resamples,
                confidence_level=confidence_level,
                method=method,
                random_state=rng,
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            return low, high
    return np.nan, np.nan
