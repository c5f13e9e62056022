"""NCES maths: per-latent scores, significance and per-SAE metrics from effect arrays.

Pure array code (numpy, scipy, pandas); the effects come from
:func:`csae_plugin.causal.engine.latent_effects`. Definitions follow ``shared/design/nces.md``:

* ``NCES_i = sum_s E_i(s) / sum_s E_i^null(s)`` over the sequences where latent i fires,
  with ``E_i^null(s)`` the mean over the K null draws.
* Significance compares the latent's direction with the null directions themselves. Per
  sequence, each of the K + 1 directions (the latent's and the K null ones, which the engine
  shares across a latent's sequences) gets the paired log-ratio of its effect to the mean of
  the other K; ``R_a`` is its mean over sequences. Under the null hypothesis (the latent's
  direction behaves like one of its random null directions) the K + 1 values are exchangeable,
  so ``R_latent`` is tested against the spread of the K null ``R_k`` with a one-sided
  prediction t-test whose variance is moderated across latents (empirical Bayes, Smyth 2004).
  A test over sequences alone would call every above-average random direction significant.
* Benjamini-Hochberg q-values over the tested latents; verified = q < fdr_level and NCES > 1.
* Several nulls at once (``LatentEffects.nulls``): each gets its own NCES, CI, q-value and
  verdict; ``verified_all_nulls`` (verified against every null run) is the conservative verdict.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import special, stats

LOG_RATIO_FLOOR = 1e-12
"""Nats added to both sides of each log-ratio, so zero effects give finite ratios (0/0 -> 0).

Below the engine's KL accuracy (~1e-12), so it only matters for exactly-zero perturbations.
"""

DETAIL_COLUMNS = (
    "latent",
    "nces",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "verified",
    "dead",
    "effect_kl",
    "null_kl",
    "n_sequences",
)


NULL_COLUMNS = ("nces", "ci_low", "ci_high", "p_value", "q_value", "verified", "null_kl")
"""Columns that depend on the null: suffixed ``_<null>`` per null when several were run."""


class EffectsLike(Protocol):
    """What :func:`effects_details` reads (e.g. ``interventions.LatentEffects``)."""

    latents: np.ndarray
    effect: np.ndarray
    null_effects: np.ndarray  # [n_latents, n_seq, n_nulls, K]
    nulls: tuple[str, ...]


def effects_details(effects: EffectsLike, **kwargs: float | int) -> pd.DataFrame:
    """:func:`nces_details` under each null of ``effects``, in one frame.

    The unsuffixed columns are the first null's; with several nulls every null's
    :data:`NULL_COLUMNS` follow as ``<column>_<null>``. ``verified_all_nulls``: verified
    under every null run.
    """
    per_null = {
        name: nces_details(effects.effect, effects.null_effects[:, :, n], effects.latents, **kwargs)
        for n, name in enumerate(effects.nulls)
    }
    details = per_null[effects.nulls[0]].copy()
    if len(per_null) > 1:
        for name, frame in per_null.items():
            for column in NULL_COLUMNS:
                details[f"{column}_{name}"] = frame[column]
    details["verified_all_nulls"] = np.logical_and.reduce(
        [frame["verified"].to_numpy() for frame in per_null.values()]
    )
    return details


def null_view(details: pd.DataFrame, null: str) -> pd.DataFrame:
    """``details`` with ``null``'s suffixed columns as the unsuffixed ones (no-op if absent)."""
    suffixed = {f"{column}_{null}": column for column in NULL_COLUMNS}
    if not set(suffixed) <= set(details.columns):
        return details
    return details.drop(columns=list(suffixed.values())).rename(columns=suffixed)


def nces_details(
    effect: np.ndarray,
    null_per_draw: np.ndarray,
    latents: np.ndarray | None = None,
    *,
    fdr_level: float = 0.05,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-latent NCES, bootstrap CI, p- and q-value and verdict (columns :data:`DETAIL_COLUMNS`).

    ``effect`` is [n_latents, n_seq] and ``null_per_draw`` [n_latents, n_seq, K] (or
    [n_latents, n_seq] for K = 1), NaN where a latent has fewer sequences. Latents with no
    sequence are ``dead``: NaN scores, never verified. p-values need K >= 2 null draws.
    """
    effect = np.asarray(effect, dtype=np.float64)
    null = np.asarray(null_per_draw, dtype=np.float64)
    if null.ndim == 2:
        null = null[..., None]
    if effect.ndim != 2 or null.shape[:2] != effect.shape:
        raise ValueError(
            f"effect must be [n_latents, n_seq] and null [n_latents, n_seq, K]; "
            f"got {effect.shape} and {null.shape}"
        )
    n_lat = effect.shape[0]
    latents = np.arange(n_lat) if latents is None else np.asarray(latents)
    present = ~np.isnan(effect)
    n_seq = present.sum(axis=1)
    dead = n_seq == 0
    null_mean = null.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        nces = ratio_of_sums(effect, null_mean)
        effect_kl = np.where(dead, np.nan, np.nansum(effect, axis=1) / np.maximum(n_seq, 1))
        null_kl = np.where(dead, np.nan, np.nansum(null_mean, axis=1) / np.maximum(n_seq, 1))
    nces[dead] = np.nan
    p_value = direction_p_values(effect, null)
    p_value[dead] = np.nan
    q_value = np.full(n_lat, np.nan)
    if (~dead).any():
        q_value[~dead] = stats.false_discovery_control(np.nan_to_num(p_value[~dead], nan=1.0))
    ci = bootstrap_ci(effect, null_mean, confidence_level, n_resamples, seed)
    verified = ~dead & (np.nan_to_num(q_value, nan=1.0) < fdr_level) & (np.nan_to_num(nces) > 1)
    return pd.DataFrame(
        {
            "latent": latents,
            "nces": nces,
            "ci_low": ci[:, 0],
            "ci_high": ci[:, 1],
            "p_value": p_value,
            "q_value": q_value,
            "verified": verified,
            "dead": dead,
            "effect_kl": effect_kl,
            "null_kl": null_kl,
            "n_sequences": n_seq,
        },
        columns=list(DETAIL_COLUMNS),
    )


def ratio_of_sums(effect: np.ndarray, null_mean: np.ndarray) -> np.ndarray:
    """NCES per row: sum of effects / sum of null effects (NaN ignored; 0/0 -> NaN, x/0 -> inf)."""
    num = np.nansum(effect, axis=-1)
    den = np.nansum(null_mean, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((num == 0) & (den == 0), np.nan, num / den)


def direction_scores(effect: np.ndarray, null: np.ndarray) -> np.ndarray:
    """R_a for the latent (a = 0) and each null draw (a = 1..K): [n_latents, K + 1].

    ``R_a`` is the mean over sequences of log((E_a(s) + floor) / (mean_{b != a} E_b(s) +
    floor)); ``R_0`` is the paired log-ratio of the latent's effect to the null mean.
    """
    variants = np.concatenate([effect[..., None], null], axis=-1)  # [n, S, K+1]
    k_plus_1 = variants.shape[-1]
    others = (variants.sum(axis=-1, keepdims=True) - variants) / max(k_plus_1 - 1, 1)
    log_ratio = np.log(variants + LOG_RATIO_FLOOR) - np.log(others + LOG_RATIO_FLOOR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of dead latents
        return np.nanmean(log_ratio, axis=1)


def direction_p_values(effect: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p-value per latent that its direction beats random ones (NaN if untestable).

    Prediction t-test of ``R_0`` against the K null ``R_k``: t = (R_0 - mean R_k) /
    (s * sqrt(1 + 1/K)), where s^2 is the latent's variance of R_k moderated towards the
    pooled variance of all latents (:func:`moderated_variance`). Untestable: K < 2, or null
    draws that all score the same.
    """
    scores = direction_scores(effect, null)
    latent_score, null_scores = scores[:, 0], scores[:, 1:]
    k = null_scores.shape[1]
    p = np.full(len(scores), np.nan)
    if k < 2:
        return p
    center = null_scores.mean(axis=1)
    var = null_scores.var(axis=1, ddof=1)
    moderated, df = moderated_variance(var, k - 1)
    # null draws that all score the same carry no information (e.g. nothing was perturbed)
    ok = np.isfinite(latent_score) & (var > 0) & np.isfinite(moderated)
    t = (latent_score[ok] - center[ok]) / np.sqrt(moderated[ok] * (1 + 1 / k))
    p[ok] = stats.t.sf(t, df) if np.isfinite(df) else stats.norm.sf(t)
    return p


def moderated_variance(var: np.ndarray, df: int) -> tuple[np.ndarray, float]:
    """Empirical-Bayes shrinkage of per-latent variances (limma's ``squeezeVar``).

    Fits a scaled inverse-chi-square prior (s0^2, d0) to the finite positive variances and
    returns ((d0 s0^2 + df var) / (d0 + df), d0 + df). With homogeneous variances d0 -> inf
    (pooled variance, normal test); with very uneven ones d0 -> 0 (each latent's own t-test).
    Fewer than 3 usable latents: no shrinkage.
    """
    usable = np.isfinite(var) & (var > 0)
    if usable.sum() < 3:
        return var.copy(), float(df)
    half = df / 2
    z = np.log(var[usable]) - special.digamma(half) + np.log(half)
    z_mean = z.mean()
    excess = z.var(ddof=1) - special.polygamma(1, half)
    if excess <= 0:
        prior_var, prior_df = float(np.exp(z_mean)), np.inf
    else:
        prior_df = 2 * _trigamma_inverse(excess)
        prior_var = float(np.exp(z_mean + special.digamma(prior_df / 2) - np.log(prior_df / 2)))
    if not np.isfinite(prior_df):
        return np.where(np.isfinite(var), prior_var, np.nan), np.inf
    moderated = (prior_df * prior_var + df * var) / (prior_df + df)
    return moderated, float(prior_df + df)


def _trigamma_inverse(x: float) -> float:
    """y with trigamma(y) = x, by Newton's method (as in limma)."""
    if x > 1e7:
        return 1 / np.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        step = tri * (1 - tri / x) / special.polygamma(2, y)
        y += step
        if -step / y < 1e-8:
            break
    return float(y)


def bootstrap_ci(
    effect: np.ndarray,
    null_mean: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Paired bootstrap CI of NCES over sequences, per latent [n_latents, 2].

    BCa (scipy.stats.bootstrap), percentile where BCa is degenerate; NaN below 2 sequences.
    """
    rng = np.random.default_rng(seed)
    out = np.full((effect.shape[0], 2), np.nan)
    for i in range(effect.shape[0]):
        keep = ~np.isnan(effect[i])
        if keep.sum() < 2:
            continue
        data = (effect[i, keep], null_mean[i, keep])
        for method in ("BCa", "percentile"):
            low, high = _bootstrap(data, method, confidence_level, n_resamples, rng)
            if np.isfinite(low) and np.isfinite(high):
                out[i] = low, high
                break
    return out


def _bootstrap(
    data: tuple[np.ndarray, np.ndarray],
    method: str,
    confidence_level: float,
    n_resamples: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    def statistic(e: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return e.sum(axis=axis) / n.sum(axis=axis)

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
            method=method,
            random_state=rng,
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def nces_metrics(
    details: pd.DataFrame,
    activation_weights: np.ndarray | None = None,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Flat per-SAE metrics from :func:`nces_details` (or one null's :func:`null_view`).

    ``activation_weights`` [d_sae] (firing frequency x mean activation when active, i.e.
    ``ReferenceStats.mean_act``) is indexed by latent id. Medians, means and weighted means run
    over evaluated non-dead latents with a defined NCES; the geometric mean over finite
    positive NCES (an NCES of 0 would make it 0 whatever the other latents do), with a
    bootstrap CI over those latents. ``frac_verified_all_nulls`` counts latents verified under
    every null run (equal to ``frac_verified`` with one null).
    """
    alive = details[~details["dead"]]
    nces = alive["nces"].to_numpy(dtype=np.float64)
    defined = ~np.isnan(nces)
    finite_positive = np.isfinite(nces) & (nces > 0)
    weighted = np.nan
    if activation_weights is not None:
        finite = np.isfinite(nces)
        w = np.asarray(activation_weights, dtype=np.float64)[alive["latent"].to_numpy()][finite]
        if w.sum() > 0:
            weighted = float((w * nces[finite]).sum() / w.sum())
    n_alive = len(alive)
    log_nces = np.log(nces[finite_positive])
    geomean_ci = geomean_bootstrap_ci(log_nces, confidence_level, n_resamples, seed)
    all_nulls = alive["verified_all_nulls"] if "verified_all_nulls" in alive else alive["verified"]
    return {
        "nces_median": float(np.median(nces[defined])) if defined.any() else np.nan,
        "nces_geomean": float(np.exp(log_nces.mean())) if len(log_nces) else np.nan,
        "nces_geomean_ci_low": geomean_ci[0],
        "nces_geomean_ci_high": geomean_ci[1],
        "frac_verified": float(alive["verified"].sum() / n_alive) if n_alive else np.nan,
        "frac_verified_all_nulls": float(all_nulls.sum() / n_alive) if n_alive else np.nan,
        "frac_dead": float(details["dead"].mean()) if len(details) else np.nan,
        "activation_weighted_nces": weighted,
        "mean_effect_kl": float(alive["effect_kl"].mean()) if n_alive else np.nan,
        "mean_null_kl": float(alive["null_kl"].mean()) if n_alive else np.nan,
        "n_latents_evaluated": int(len(details)),
    }


def geomean_bootstrap_ci(
    log_values: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI (BCa, percentile if degenerate) of exp(mean(log_values)), over the values.

    Resamples latents, so it says how much the per-SAE geometric mean depends on which latents
    were drawn. NaN below 2 values.
    """
    if len(log_values) < 2:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    data = (np.asarray(log_values, dtype=np.float64),)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                data,
                np.mean,
                n_resamples=n_resamples,
                confidence_level=confidence_level,
                method=method,
                random_state=rng,
            )
        low, high = result.confidence_interval.low, result.confidence_interval.high
        if np.isfinite(low) and np.isfinite(high):
            return float(np.exp(low)), float(np.exp(high))
    return np.nan, np.nan
