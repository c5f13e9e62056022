"""NCES maths: per-latent scores, significance and per-SAE metrics from effect arrays.

Pure array code (numpy, scipy, pandas); the effects come from
:func:`csae_plugin.causal.engine.latent_effects`. The definition is ``docs/nces.md``; in short
(definition ``0.4.0``, the default; 0.3.0 scores alike, with the band null for every latent):

* Each of a latent's K + 1 directions (its own, a = 0, and its K null directions, shared by
  all its sequences) gets a score ``L_a``: the mean over the latent's sequences of
  ``log E_a(s)``. ``NCES_i = exp(L_0 - mean_k L_k)``: the latent's geometric-mean effect over
  that of its null directions. It is the same function of every direction, so for a latent
  that is just one more random direction its log has mean exactly 0 (the per-SAE geometric
  mean is unbiased at 1), where a ratio of sums over a mean of K skewed null effects is biased
  low (definition ``0.2.0``, kept for comparison).
* ``percentile``: the fraction of its null directions the latent beats (0.5 under the null).
* Significance: ``L_0`` against the spread of the K null ``L_k``, a one-sided prediction
  t-test whose variance is moderated across latents (empirical Bayes, Smyth 2004). Under the
  null hypothesis (the latent's direction behaves like one of its random null directions) the
  K + 1 scores are exchangeable, so its p-values are uniform, not only rarely small.
* Benjamini-Hochberg q-values over the tested latents; verified = q < fdr_level and NCES > 1.
* Per SAE, beside the fraction verified (a lower bound that shrinks with the number of latents
  tested), ``frac_beats_null``: Storey's estimate 1 - pi0 of the fraction of latents whose
  direction beats their nulls, from the p-values, with a bootstrap CI over latents.
* Several nulls at once (``LatentEffects.nulls``): each gets its own NCES, CI, q-value and
  verdict; ``verified_all_nulls`` (verified against every null run) is the conservative verdict.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import special, stats

from csae_plugin.causal.bootstrap import bootstrap_interval

DEFINITIONS = ("0.4.0", "0.3.0", "0.2.0")
"""NCES definitions: ``0.4.0`` (geometric-mean ratio, exchangeable direction test, the
``matched`` null neuron-permuted for latents on few coordinates; the default), ``0.3.0`` (the
same with the band null for every latent) and ``0.2.0`` (ratio of sums), the last two kept so
old results can be compared."""

DEFAULT_DEFINITION = "0.4.0"

LOG_RATIO_FLOOR = 1e-12
"""Nats added to every effect before its log, so zero effects give finite scores.

Below the engine's KL accuracy (~1e-12), so it only matters for exactly-zero perturbations.
"""

STOREY_LAMBDA = 0.5
"""p-value above which Storey's estimator counts latents as null (pi0 = #{p > l} / (m (1 - l)))."""

_SCORE_COLUMNS = ("nces", "ci_low", "ci_high", "percentile", "p_value", "q_value", "verified")

DETAIL_COLUMNS = ("latent", *_SCORE_COLUMNS, "dead", "effect_kl", "null_kl", "n_sequences")

NULL_COLUMNS = (*_SCORE_COLUMNS, "null_kl")
"""Columns that depend on the null: suffixed ``_<null>`` per null when several were run."""


class EffectsLike(Protocol):
    """What :func:`effects_details` reads (e.g. ``interventions.LatentEffects``)."""

    latents: np.ndarray
    effect: np.ndarray
    null_effects: np.ndarray  # [n_latents, n_seq, n_nulls, K]
    nulls: tuple[str, ...]


def check_definition(definition: str) -> str:
    if definition not in DEFINITIONS:
        raise ValueError(
            f"unknown NCES definition {definition!r}; choose one of {', '.join(DEFINITIONS)}"
        )
    return definition


def effects_details(effects: EffectsLike, **kwargs: float | int | str) -> pd.DataFrame:
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
    definition: str = DEFAULT_DEFINITION,
    fdr_level: float = 0.05,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-latent NCES, CI, percentile, p- and q-value and verdict (:data:`DETAIL_COLUMNS`).

    ``effect`` is [n_latents, n_seq] and ``null_per_draw`` [n_latents, n_seq, K] (or
    [n_latents, n_seq] for K = 1), NaN where a latent has fewer sequences. Latents with no
    sequence are ``dead``: NaN scores, never verified. A latent whose perturbation and null
    perturbations all had no effect gets NaN (0 / 0). p-values need K >= 2 null draws.
    """
    check_definition(definition)
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
        effect_kl = np.where(dead, np.nan, np.nansum(effect, axis=1) / np.maximum(n_seq, 1))
        null_kl = np.where(dead, np.nan, np.nansum(null_mean, axis=1) / np.maximum(n_seq, 1))
    scores = log_scores(effect, null)
    percentile = beaten_fraction(scores)
    if definition != "0.2.0":  # 0.3.0 and 0.4.0 differ in the null only
        with np.errstate(over="ignore"):
            nces = np.exp(scores[:, 0] - scores[:, 1:].mean(axis=1))
        nothing_moved = (np.nansum(effect, axis=1) == 0) & (np.nansum(null_mean, axis=1) == 0)
        nces[nothing_moved] = np.nan
        p_value = prediction_p_values(scores)
        ci = log_ratio_bootstrap_ci(effect, null, confidence_level, n_resamples, seed)
    else:
        nces = ratio_of_sums(effect, null_mean)
        p_value = prediction_p_values(direction_scores(effect, null))
        ci = bootstrap_ci(effect, null_mean, confidence_level, n_resamples, seed)
    nces[dead] = np.nan
    percentile[dead] = np.nan
    p_value[dead] = np.nan
    q_value, verified = bh_verdict(p_value, nces, dead, fdr_level)
    return pd.DataFrame(
        {
            "latent": latents,
            "nces": nces,
            "ci_low": ci[:, 0],
            "ci_high": ci[:, 1],
            "percentile": percentile,
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


def bh_verdict(
    p_value: np.ndarray, nces: np.ndarray, dead: np.ndarray, fdr_level: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """(q-values, verified): Benjamini-Hochberg over the non-dead latents (an untestable
    latent's NaN p counts as 1), verified = q < ``fdr_level`` and NCES > 1."""
    q_value = np.full(len(p_value), np.nan)
    if (~dead).any():
        q_value[~dead] = stats.false_discovery_control(np.nan_to_num(p_value[~dead], nan=1.0))
    verified = ~dead & (np.nan_to_num(q_value, nan=1.0) < fdr_level) & (np.nan_to_num(nces) > 1)
    return q_value, verified


def log_scores(effect: np.ndarray, null: np.ndarray) -> np.ndarray:
    """``L_a`` [n_latents, K + 1]: mean over sequences of log(E_a(s) + floor), the latent's
    direction first (a = 0), then its K null directions (NaN for dead latents)."""
    variants = np.concatenate([effect[..., None], null], axis=-1)  # [n, S, K+1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of dead latents
        return np.nanmean(np.log(variants + LOG_RATIO_FLOOR), axis=1)


def beaten_fraction(scores: np.ndarray) -> np.ndarray:
    """Fraction of its null directions each latent's ``L_0`` beats (ties count half)."""
    latent, nulls = scores[:, :1], scores[:, 1:]
    with np.errstate(invalid="ignore"):
        wins = (latent > nulls).mean(axis=1) + 0.5 * (latent == nulls).mean(axis=1)
    return np.where(np.isnan(scores[:, 0]), np.nan, wins)


def ratio_of_sums(effect: np.ndarray, null_mean: np.ndarray) -> np.ndarray:
    """NCES 0.2.0 per row: sum of effects / sum of null effects (NaN ignored; 0/0 -> NaN)."""
    num = np.nansum(effect, axis=-1)
    den = np.nansum(null_mean, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((num == 0) & (den == 0), np.nan, num / den)


def direction_scores(effect: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Definition 0.2.0's scores [n_latents, K + 1]: ``R_a``, the mean over sequences of
    log((E_a(s) + floor) / (mean_{b != a} E_b(s) + floor))."""
    variants = np.concatenate([effect[..., None], null], axis=-1)  # [n, S, K+1]
    k_plus_1 = variants.shape[-1]
    others = (variants.sum(axis=-1, keepdims=True) - variants) / max(k_plus_1 - 1, 1)
    log_ratio = np.log(variants + LOG_RATIO_FLOOR) - np.log(others + LOG_RATIO_FLOOR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of dead latents
        return np.nanmean(log_ratio, axis=1)


def prediction_p_values(scores: np.ndarray) -> np.ndarray:
    """One-sided p-value per latent that its direction's score beats its null directions'.

    ``scores`` [n_latents, K + 1], the latent's first. Prediction t-test: t = (S_0 - mean S_k)
    / (s sqrt(1 + 1/K)), where s^2 is the latent's variance of the S_k moderated towards the
    pooled variance of all latents (:func:`moderated_variance`). NaN where untestable: K < 2,
    or null draws that all score the same (e.g. nothing was perturbed).
    """
    latent_score, null_scores = scores[:, 0], scores[:, 1:]
    k = null_scores.shape[1]
    p = np.full(len(scores), np.nan)
    if k < 2:
        return p
    center = null_scores.mean(axis=1)
    var = null_scores.var(axis=1, ddof=1)
    moderated, df = moderated_variance(var, k - 1)
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


def log_ratio_bootstrap_ci(
    effect: np.ndarray,
    null: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Percentile CI of NCES 0.3.0 per latent [n_latents, 2], resampling the latent's
    sequences and its null draws together (both are samples). NaN below 2 sequences."""
    rng = np.random.default_rng(seed)
    out = np.full((effect.shape[0], 2), np.nan)
    tail = (1 - confidence_level) / 2
    for i in range(effect.shape[0]):
        keep = ~np.isnan(effect[i])
        n_seq, k = int(keep.sum()), null.shape[-1]
        if n_seq < 2:
            continue
        own = np.log(effect[i, keep] + LOG_RATIO_FLOOR)  # [S]
        nulls = np.log(null[i, keep] + LOG_RATIO_FLOOR)  # [S, K]
        seqs = rng.integers(n_seq, size=(n_resamples, n_seq))
        draws = rng.integers(k, size=(n_resamples, k))
        null_mean = nulls[seqs[:, :, None], draws[:, None, :]].mean(axis=(1, 2))
        log_ratio = own[seqs].mean(axis=1) - null_mean
        out[i] = np.exp(np.quantile(log_ratio, [tail, 1 - tail]))
    return out


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
        data = (effect[i, keep], null_mean[i, keep])
        out[i] = bootstrap_interval(data, _ratio_of_sums, confidence_level, n_resamples, rng)
    return out


def _ratio_of_sums(e: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
    return e.sum(axis=axis) / n.sum(axis=axis)


def nces_metrics(
    details: pd.DataFrame,
    activation_weights: np.ndarray | None = None,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Flat per-SAE metrics from :func:`nces_details` (or one null's :func:`null_view`).

    Over evaluated non-dead latents with a defined NCES: the geometric mean of NCES (0.3.0:
    unbiased at 1 for null-like latents) with a bootstrap CI over latents, the median, the
    mean ``percentile`` (``nces_rank``, 0.5 under the null) with its CI, and the
    activation-weighted geometric mean (``activation_weights`` [d_sae], firing frequency x mean
    activation when active, i.e. ``ReferenceStats.mean_act``, indexed by latent id).
    ``frac_verified`` counts BH-verified latents; ``frac_beats_null`` estimates the fraction
    whose direction beats their nulls (Storey's 1 - pi0 from the p-values, CI over latents).
    ``frac_verified_all_nulls`` counts latents verified under every null run.
    """
    alive = details[~details["dead"]]
    nces = alive["nces"].to_numpy(dtype=np.float64)
    defined = ~np.isnan(nces)
    finite_positive = np.isfinite(nces) & (nces > 0)
    log_nces = np.log(nces[finite_positive])
    weighted = np.nan
    if activation_weights is not None and finite_positive.any():
        w = np.asarray(activation_weights, dtype=np.float64)
        w = w[alive["latent"].to_numpy()][finite_positive]
        if w.sum() > 0:
            weighted = float(np.exp((w * log_nces).sum() / w.sum()))
    n_alive = len(alive)
    percentile = alive["percentile"].to_numpy(dtype=np.float64)
    percentile = percentile[~np.isnan(percentile)]
    p_values = alive["p_value"].to_numpy(dtype=np.float64)
    p_values = p_values[~np.isnan(p_values)]
    geomean_ci = bootstrap_mean_ci(log_nces, confidence_level, n_resamples, seed)
    rank_ci = bootstrap_mean_ci(percentile, confidence_level, n_resamples, seed)
    beats_ci = bootstrap_ci_of(_storey_along, p_values, confidence_level, n_resamples, seed)
    return verified_fractions(details) | {
        "nces_median": float(np.median(nces[defined])) if defined.any() else np.nan,
        "nces_geomean": float(np.exp(log_nces.mean())) if len(log_nces) else np.nan,
        "nces_geomean_ci_low": float(np.exp(geomean_ci[0])),
        "nces_geomean_ci_high": float(np.exp(geomean_ci[1])),
        "nces_rank": float(percentile.mean()) if len(percentile) else np.nan,
        "nces_rank_ci_low": rank_ci[0],
        "nces_rank_ci_high": rank_ci[1],
        "frac_beats_null": storey_beats_null(p_values),
        "frac_beats_null_ci_low": beats_ci[0],
        "frac_beats_null_ci_high": beats_ci[1],
        "frac_dead": float(details["dead"].mean()) if len(details) else np.nan,
        "activation_weighted_nces": weighted,
        "mean_effect_kl": float(alive["effect_kl"].mean()) if n_alive else np.nan,
        "mean_null_kl": float(alive["null_kl"].mean()) if n_alive else np.nan,
        "n_latents_evaluated": int(len(details)),
    }


def verified_fractions(details: pd.DataFrame) -> dict[str, float]:
    """``frac_verified`` and ``frac_verified_all_nulls`` over the evaluated non-dead latents."""
    alive = details[~details["dead"]]
    n_alive = len(alive)
    all_nulls = alive["verified_all_nulls"] if "verified_all_nulls" in alive else alive["verified"]
    return {
        "frac_verified": float(alive["verified"].sum() / n_alive) if n_alive else np.nan,
        "frac_verified_all_nulls": float(all_nulls.sum() / n_alive) if n_alive else np.nan,
    }


def storey_beats_null(p_values: np.ndarray, lam: float = STOREY_LAMBDA) -> float:
    """1 - pi0, Storey's estimate of the fraction of tests that are not null (NaN if none).

    pi0 = #{p > lam} / (m (1 - lam)), capped at 1: null p-values are uniform, so the ones
    above ``lam`` count (1 - lam) of the null tests.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if len(p) == 0:
        return np.nan
    pi0 = min(1.0, float((p > lam).sum()) / (len(p) * (1 - lam)))
    return 1.0 - pi0


def _storey_along(p_values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.apply_along_axis(storey_beats_null, axis, p_values)


def bootstrap_mean_ci(
    values: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of the mean of ``values`` over the values (NaN below 2 values)."""
    return bootstrap_ci_of(np.mean, values, confidence_level, n_resamples, seed)


def bootstrap_ci_of(
    statistic: Callable[..., np.ndarray],
    values: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI (BCa, percentile if degenerate) of ``statistic(values, axis=-1)`` over the
    values (``statistic`` reduces along ``axis``, as ``np.mean`` does).

    Resamples latents, so it says how much a per-SAE number depends on which latents were
    drawn. NaN below 2 values.
    """
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_interval(
        (values,), statistic, confidence_level, n_resamples, np.random.default_rng(seed)
    )
