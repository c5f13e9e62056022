"""NCES must be able to fail: random dictionaries on the real Gemma 3 270M are not verified.

A dictionary of random directions carries no more causal structure than the null's random
directions, so under the default (matched) null about the FDR level of its latents is
verified and its per-SAE geometric-mean NCES is not above 1. It is somewhat *below* 1 for
covariance-shaped and mixed dictionaries (measured here: 0.72 [0.63, 0.84] and 0.73 [0.66,
0.87]; random isotropic 0.98 [0.80, 1.15]; the 24-latent study: 0.74-0.91): a latent's one
effect over the arithmetic mean of K skewed null effects has a log-ratio that averages below
0. So the CI must reach down to 1 or below, and the geometric mean stay above
:data:`MIN_GEOMEAN`, which bounds that known bias (a broken null, e.g. one whose effects
dwarf the latents', fails it). The same run under the old covariance null shows the test has
the power to fail: it rewards the random isotropic dictionary.
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
MIN_GEOMEAN = 0.6
"""The known downward bias of null-like dictionaries' geometric mean, with room (lowest
measured: 0.72 here, 0.74 in the study)."""


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
def test_random_dictionaries_are_not_verified_and_not_above_one_under_the_default_null(kind):
    metrics = scored(kind)["matched"]
    assert metrics["n_latents_evaluated"] == LATENTS
    assert metrics["frac_dead"] < 0.5, "the reference SAE's latents must fire to be tested"
    low, high = metrics["nces_geomean_ci_low"], metrics["nces_geomean_ci_high"]
    assert low <= 1.0, f"{kind}: geometric-mean NCES CI [{low:.3f}, {high:.3f}] lies above 1"
    geomean = metrics["nces_geomean"]
    assert geomean >= MIN_GEOMEAN, f"{kind}: geometric-mean NCES {geomean:.3f}, far below 1"
    assert metrics["frac_verified"] <= MAX_FALSE_VERIFIED, metrics["frac_verified"]


@pytest.mark.slow
def test_the_covariance_null_rewards_random_isotropic_directions():
    """The failure the matched null fixes, reproduced: the test above can fail."""
    metrics = scored("random_isotropic")["covariance"]
    assert metrics["nces_geomean_ci_low"] > 1.5
    assert metrics["frac_verified"] > 0.5
