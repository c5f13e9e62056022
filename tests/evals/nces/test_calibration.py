"""NCES must be able to fail and to succeed, on the real Gemma 3 270M (docs/nces.md, "Calibration").

(a) Random dictionaries whose decoder directions are distributed like their own null draws
(random within the spectral bands, or on a few random coordinates, which the matched null
answers with permuted coordinates; firing independently of the direction: the encoder reads
another random direction) carry no causal structure the null lacks: the per-SAE geometric mean
must cover 1, the rank score 0.5, and at most the FDR level of latents may be verified.
(b) The planted dictionary, the top eigen-directions of the hook's Fisher metric, does move the
output more than its nulls: at the eval's default settings (16 sequences, 8 null draws per
latent) at least 80% of its latents must be verified.
The same run under the covariance null shows (a) has the power to fail: that null rewards the
random isotropic dictionary. So does NCES 0.3.0 (band draws for every latent) on the sparse
dictionary: measured, 3 of its 12 latents verified there.
Slow: loads the embedded model (cached after the first load).
"""

from __future__ import annotations

import functools

import pytest
import torch

from csae_plugin.data import corpus_splits
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.reference_saes import hook_activations, reference_fisher, reference_sae
from csae_plugin.models import load_model

HOOK = "blocks.6.hook_resid_post"
LATENTS = 12
MAX_FALSE_VERIFIED = 1 / LATENTS
"""At FDR 0.05 over 12 null latents, 0 is expected; 1 allows for test noise, 2+ is a failure."""
PLANTED = 10
MIN_PLANTED_VERIFIED = 0.8


@functools.cache
def gemma_setup():
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 48, seed=0)
    # the random directions are drawn from the covariance of the same reference rows the
    # null's covariance is estimated on: drawn from another estimate (other rows), their
    # coordinates in the null's eigenbasis are correlated and sign flips are no longer
    # exchangeable with them (measured: covariance-shaped ones then score ~0.7)
    reference = splits.train[:32]
    acts = hook_activations(model, HOOK, reference)
    fisher = reference_fisher(model, HOOK, splits.train[64:80])
    return model, splits.eval[:32], reference, acts, fisher


@functools.cache
def scored(kind: str, null: str = "matched") -> dict[str, dict[str, float]]:
    model, eval_tokens, reference_tokens, acts, fisher = gemma_setup()
    planted = kind == "planted_fisher"
    sae = reference_sae(
        kind,
        acts,
        HOOK,
        d_sae=PLANTED if planted else 256,
        seed=1,
        firing_rate=0.05,
        fisher=fisher,
        encoder="tied" if planted else "independent",
    )
    defaults = NCESEvalConfig()
    config = NCESEvalConfig(
        latents=PLANTED if planted else LATENTS,
        seqs_per_latent=defaults.seqs_per_latent if planted else 4,
        null_draws=defaults.null_draws,
        null=null,
        n_bootstrap=500,
        random_seed=0,
    )
    result = nces_main.evaluate_sae(
        model, sae, eval_tokens, reference_tokens, config, progress=False
    )
    return result.metrics_by_null


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["random_isotropic", "random_covariance", "random_mixture", "random_sparse"]
)
def test_null_like_random_dictionaries_score_at_the_null_value_and_are_not_verified(kind):
    metrics = scored(kind, "matched,covariance" if kind == "random_isotropic" else "matched")
    metrics = metrics["matched"]
    assert metrics["n_latents_evaluated"] == LATENTS
    assert metrics["frac_dead"] < 0.5, "the reference SAE's latents must fire to be tested"
    low, high = metrics["nces_geomean_ci_low"], metrics["nces_geomean_ci_high"]
    assert low <= 1.0 <= high, f"{kind}: geometric-mean NCES CI [{low:.3f}, {high:.3f}]"
    low, high = metrics["nces_rank_ci_low"], metrics["nces_rank_ci_high"]
    assert low <= 0.5 <= high, f"{kind}: rank CI [{low:.3f}, {high:.3f}]"
    assert metrics["frac_verified"] <= MAX_FALSE_VERIFIED, metrics["frac_verified"]


@pytest.mark.slow
def test_the_planted_fisher_directions_are_verified_at_the_default_settings():
    metrics = scored("planted_fisher")["matched"]
    assert metrics["frac_dead"] == 0
    assert metrics["frac_verified"] >= MIN_PLANTED_VERIFIED, metrics
    assert metrics["nces_geomean_ci_low"] > 1.5
    assert metrics["frac_beats_null_ci_low"] > 0.5


@pytest.mark.slow
def test_the_covariance_null_rewards_random_isotropic_directions():
    """The failure the matched null fixes, reproduced: the calibration test above can fail."""
    metrics = scored("random_isotropic", "matched,covariance")["covariance"]
    assert metrics["nces_geomean_ci_low"] > 1.5
    assert metrics["frac_verified"] > 0.5


def test_an_independent_encoder_is_for_random_dictionaries_only():
    acts = torch.randn(200, 8)
    with pytest.raises(ValueError, match="independent encoder is for random"):
        reference_sae("pca", acts, HOOK, encoder="independent")
    sae = reference_sae("random_isotropic", acts, HOOK, d_sae=4, encoder="independent")
    assert not torch.allclose(sae.W_enc.T, sae.W_dec)
