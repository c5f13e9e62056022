"""NCES maths on synthetic effect arrays (claim 6): known ratios, the direction test's
calibration and power, an unbiased per-SAE score, Benjamini-Hochberg, bootstrap CIs,
degenerate cases and the metrics (definition 0.3.0, and 0.2.0 where it differs)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from csae_plugin.causal.nces import (
    DETAIL_COLUMNS,
    LOG_RATIO_FLOOR,
    direction_scores,
    moderated_variance,
    nces_details,
    nces_metrics,
    storey_beats_null,
)

N_SEQ = 16
K = 8


def synthetic(
    n_latents: int,
    shift: np.ndarray | float = 0.0,
    seed: int = 0,
    direction_sd: np.ndarray | float = 0.3,
):
    """Effects of random directions: a per-direction effect (log scale) shared by all
    sequences, a per-sequence scale, and per-(sequence, direction) noise. ``shift`` is added
    to the latent's own direction effect (0 = the latent is just another random direction)."""
    rng = np.random.default_rng(seed)
    sd = np.broadcast_to(np.asarray(direction_sd, dtype=float), (n_latents,))[:, None, None]
    direction = rng.normal(0, 1, (n_latents, 1, K + 1)) * sd
    direction[:, 0, 0] += shift
    scale = np.exp(rng.normal(-8, 1, (n_latents, N_SEQ, 1)))
    values = scale * np.exp(direction + rng.normal(0, 0.2, (n_latents, N_SEQ, K + 1)))
    return values[..., 0], values[..., 1:]


# 6a. a known ratio comes out exactly, with its means
def test_6a_known_ratio():
    null = np.full((1, 4, K), 2e-6)
    effect = np.array([[4e-6, 6e-6, 2e-6, 4e-6]])
    details = nces_details(effect, null)
    assert list(details.columns) == list(DETAIL_COLUMNS)
    geometric = np.prod([4e-6, 6e-6, 2e-6, 4e-6]) ** 0.25
    assert details["nces"][0] == pytest.approx(geometric / 2e-6)  # 0.3.0: geometric means
    assert details["percentile"][0] == 1.0
    assert nces_details(effect, null, definition="0.2.0")["nces"][0] == pytest.approx(16 / 8)
    assert details["effect_kl"][0] == pytest.approx(4e-6)
    assert details["null_kl"][0] == pytest.approx(2e-6)
    assert details["n_sequences"][0] == 4 and not details["dead"][0]
    with pytest.raises(ValueError, match="unknown NCES definition"):
        nces_details(effect, null, definition="0.1")


# 6a'. for latents that are just one more random direction the per-SAE score is unbiased
def test_6a_per_sae_score_is_unbiased_for_null_like_latents():
    """Skewed effects (log-normal direction and noise terms, as measured): the 0.3.0 geometric
    mean is 1 and the rank 0.5 within their CIs, Storey's fraction beating the null ~0, and
    the p-values uniform; 0.2.0's ratio of sums over the mean of K null effects is biased."""
    effect, null = synthetic(400, seed=11, direction_sd=0.6)
    details = nces_details(effect, null, n_resamples=200)
    metrics = nces_metrics(details, n_resamples=500)
    assert metrics["nces_geomean_ci_low"] <= 1 <= metrics["nces_geomean_ci_high"]
    assert metrics["nces_rank_ci_low"] <= 0.5 <= metrics["nces_rank_ci_high"]
    assert metrics["frac_beats_null"] < 0.1
    assert stats.kstest(details["p_value"], "uniform").pvalue > 0.01
    old = nces_metrics(nces_details(effect, null, definition="0.2.0", n_resamples=50))
    assert old["nces_geomean_ci_high"] < 1  # the bias 0.3.0 removes


# 6a''. Storey's estimate of the fraction of latents that beat their nulls
def test_6a_storey_fraction_beating_the_null():
    rng = np.random.default_rng(12)
    p = np.concatenate([rng.uniform(size=700), rng.uniform(0, 0.01, size=300)])
    assert storey_beats_null(p) == pytest.approx(0.3, abs=0.06)
    assert storey_beats_null(rng.uniform(size=1000)) < 0.08
    assert np.isnan(storey_beats_null(np.array([])))
    shift = np.zeros(300)
    shift[:60] = 2.0
    effect, null = synthetic(300, shift, seed=13)
    metrics = nces_metrics(nces_details(effect, null, n_resamples=50), n_resamples=300)
    low, high = metrics["frac_beats_null_ci_low"], metrics["frac_beats_null_ci_high"]
    assert low <= 0.2 <= high and high - low < 0.3


# 6b. the direction test is calibrated when the latent is one more random direction
def test_6b_direction_test_is_calibrated_under_the_null():
    """Direction spreads differ between latents (log-normal, sd 0.5); p < 0.05 must stay
    within the 99.9% binomial bounds of 5%. A per-sequence test (Wilcoxon on the paired
    log-ratios) rejects far more often: each direction's effect is consistent over sequences."""
    sd = 0.3 * np.exp(np.random.default_rng(2).normal(0, 0.5, 2000))
    effect, null = synthetic(2000, seed=1, direction_sd=sd)
    details = nces_details(effect, null, n_resamples=50)
    rejections = (details["p_value"] < 0.05).sum()
    assert rejections <= stats.binom.ppf(0.999, 2000, 0.05)
    assert rejections >= stats.binom.ppf(0.001, 2000, 0.05)
    per_sequence = [
        stats.wilcoxon(np.log(e / n.mean(-1)), alternative="greater").pvalue
        for e, n in zip(effect[:200], null[:200], strict=True)
    ]
    assert np.mean(np.array(per_sequence) < 0.05) > 0.2


# 6c. Benjamini-Hochberg: q-values from scipy over the non-dead latents, and the verdict rule
def test_6c_benjamini_hochberg_and_verdict():
    shift = np.zeros(300)
    shift[:30] = 2.0
    effect, null = synthetic(300, shift, seed=3)
    effect[-5:] = np.nan  # dead latents are not tested and do not count in BH
    null[-5:] = np.nan
    details = nces_details(effect, null, n_resamples=50)
    alive = ~details["dead"]
    expected = stats.false_discovery_control(details["p_value"][alive])
    np.testing.assert_allclose(details["q_value"][alive], expected)
    assert (details["q_value"][alive] >= details["p_value"][alive]).all()
    rule = (details["q_value"] < 0.05) & (details["nces"] > 1) & alive
    assert (details["verified"] == rule).all()
    assert details["verified"][:30].mean() > 0.9
    assert details["verified"][30:].sum() <= 0.05 * details["verified"].sum() + 3


# 6d. the bootstrap CI contains the point estimate
def test_6d_bootstrap_ci_contains_the_estimate():
    effect, null = synthetic(50, np.linspace(-1, 2, 50), seed=4)
    details = nces_details(effect, null, n_resamples=500, seed=5)
    assert (details["ci_low"] <= details["nces"]).all()
    assert (details["nces"] <= details["ci_high"]).all()
    assert (details["ci_low"] < details["ci_high"]).all()
    again = nces_details(effect, null, n_resamples=500, seed=5)
    np.testing.assert_array_equal(again["ci_low"], details["ci_low"])  # seeded


# 6e. degenerate cases are explicit
def test_6e_degenerate_cases():
    null = np.full((5, 3, K), np.nan)
    effect = np.full((5, 3), np.nan)
    rng = np.random.default_rng(6)
    null[0, 0] = rng.uniform(1, 2, K)  # one sequence: no CI, but the direction test works
    effect[0, 0] = 3.0
    null[1] = rng.uniform(1, 2, (3, K))  # zero effect
    effect[1] = 0.0
    null[2] = 0.0  # nothing moved at all: 0 / 0
    effect[2] = 0.0
    null[3] = 0.0  # an effect with a zero null (numerically impossible in practice)
    effect[3] = 1e-9
    details = nces_details(effect, null)  # row 4: dead
    floor = LOG_RATIO_FLOOR
    assert details["nces"][0] == pytest.approx(3.0 / np.exp(np.log(null[0, 0] + floor).mean()))
    assert np.isnan(details["ci_low"][0]) and np.isfinite(details["p_value"][0])
    assert details["nces"][1] < 1e-9 and details["p_value"][1] > 0.5
    assert np.isnan(details["nces"][2]) and not details["dead"][2]
    assert details["nces"][3] == pytest.approx((1e-9 + floor) / floor)
    assert details["dead"].tolist() == [False, False, False, False, True]
    assert not details["verified"][1:].any()
    assert np.isnan(details["p_value"][2:]).all()  # null draws all alike: nothing to test
    assert np.isnan(details["q_value"][4]) and np.isnan(details["nces"][4])
    old = nces_details(effect, null, definition="0.2.0")
    assert old["nces"][1] == 0.0 and np.isinf(old["nces"][3]) and np.isnan(old["nces"][2])


def test_6e_direction_scores_and_variance_shrinkage():
    effect, null = synthetic(3, seed=7)
    scores = direction_scores(effect, null)
    expected = np.log(effect[0] / null[0].mean(-1)).mean()
    assert scores[0, 0] == pytest.approx(expected, rel=1e-6)
    same = 0.3 * np.random.default_rng(8).chisquare(K - 1, 5000) / (K - 1)  # one true variance
    shrunk, df = moderated_variance(same, K - 1)
    assert df > 100 and np.allclose(shrunk, 0.3, rtol=0.05)
    uneven = (
        np.random.default_rng(8).chisquare(K - 1, 1000)
        / (K - 1)
        * np.exp(np.random.default_rng(9).normal(0, 1.5, 1000))
    )
    _, df = moderated_variance(uneven, K - 1)
    assert K - 1 < df < K - 1 + 5  # very uneven variances: little pooling


# 6f. the flat per-SAE metrics
def test_6f_metrics():
    null = np.ones((4, 2, K))
    effect = np.array([[2.0, 2.0], [0.0, 0.0], [4.0, 4.0], [np.nan, np.nan]])
    details = nces_details(effect, null)
    weights = np.array([1.0, 0.0, 3.0, 5.0])
    metrics = nces_metrics(details, weights)
    nces = details["nces"].to_numpy()
    assert nces[0] == pytest.approx(2.0) and nces[2] == pytest.approx(4.0)
    assert metrics["nces_median"] == pytest.approx(2.0)
    assert metrics["nces_geomean"] == pytest.approx(np.exp(np.log(nces[:3]).mean()))
    assert metrics["nces_rank"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["frac_dead"] == pytest.approx(0.25)
    assert metrics["frac_verified"] == pytest.approx(details["verified"][:3].sum() / 3)
    # weighted geometric mean; latent 1 has weight 0
    assert metrics["activation_weighted_nces"] == pytest.approx(
        np.exp((np.log(2) + 3 * np.log(4)) / 4)
    )
    assert metrics["mean_effect_kl"] == pytest.approx(2.0)
    assert metrics["mean_null_kl"] == pytest.approx(1.0)
    assert metrics["n_latents_evaluated"] == 4
