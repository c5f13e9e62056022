"""NCES must be able to fail: random dictionaries on the real Gemma 3 270M score ~1, unverified.

A dictionary of random directions carries no more causal structure than the null's random
directions, so under a calibrated null its per-SAE geometric-mean NCES has a CI covering 1
and about the FDR level of its latents is verified. The same run under the old covariance
null shows the test has the power to fail: it rewards the random isotropic dictionary.
Slow: loads the embedded model (cached after the first load).
"""

from __future__ import annotations

import functools

import pytest

from csae_plugin.data import corpus_splits
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.reference_saes import hook_activations, reference_sae
from csae_plugin.models import load_model

HOOK = "blocks.6.hook_resid_post"
LATENTS = 12
MAX_FALSE_VERIFIED = 2 / LATENTS
"""At FDR 0.05 over 12 null latents, 0 is expected; 2 allows for test noise, 3+ is a failure."""


@functools.cache
def gemma_setup():
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 48, seed=0)
    acts = hook_activations(model, HOOK, splits.train[:64])
    return model, splits.eval[:16], splits.train[:16], acts


@functools.cache
def scored(kind: str):
    model, eval_tokens, reference_tokens, acts = gemma_setup()
    sae = reference_sae(kind, acts, HOOK, d_sae=256, seed=1, firing_rate=0.05)
    config = NCESEvalConfig(
        latents=LATENTS,
        seqs_per_latent=2,
        null_draws=4,
        null="matched,covariance",
        n_bootstrap=500,
        random_seed=0,
    )
    _, details = nces_main.evaluate_sae(
        model, sae, eval_tokens, reference_tokens, config, progress=False
    )
    return details.attrs["metrics_by_null"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random_isotropic", "random_covariance", "random_mixture"])
def test_random_dictionaries_score_one_and_fail_verification_under_the_default_null(kind):
    metrics = scored(kind)["matched"]
    assert metrics["n_latents_evaluated"] == LATENTS
    assert metrics["frac_dead"] < 0.5, "the reference SAE's latents must fire to be tested"
    low, high = metrics["nces_geomean_ci_low"], metrics["nces_geomean_ci_high"]
    assert low <= 1.0 <= high, f"{kind}: geometric-mean NCES CI [{low:.3f}, {high:.3f}]"
    assert metrics["frac_verified"] <= MAX_FALSE_VERIFIED, metrics["frac_verified"]


@pytest.mark.slow
def test_the_covariance_null_rewards_random_isotropic_directions():
    """The failure the matched null fixes, reproduced: the test above can fail."""
    metrics = scored("random_isotropic")["covariance"]
    assert metrics["nces_geomean_ci_low"] > 1.5
    assert metrics["frac_verified"] > 0.5
