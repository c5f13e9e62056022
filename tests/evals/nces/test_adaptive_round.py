"""The eval's adaptive second round (``adaptive=True``) on the tiny model: per-latent
sequences and draws recorded, average copies reported, per-SAE estimates kept from round 1,
and verdicts within those of the full design (every latent given the second round)."""

from __future__ import annotations

import numpy as np
from conftest import make_tiny_model, make_tokens, standard_sae
from eval_setup import tiny_config

from csae_plugin.evals.nces import main as nces_main

ROUND2 = dict(adaptive_seqs_per_latent=6, adaptive_null_draws=5)


def scored(tmp_path, **overrides):
    config = tiny_config(latents=list(range(0, 48, 3)), **overrides)
    return nces_main.evaluate_sae(
        make_tiny_model(),
        standard_sae(),
        make_tokens(24, seed=1),
        make_tokens(12, seed=2),
        config,
        progress=False,
        work_dir=tmp_path / "chunks",
    )


def test_adaptive_records_its_work_and_keeps_round_one_estimates(tmp_path):
    fixed = scored(tmp_path / "fixed")
    adaptive = scored(tmp_path / "adaptive", adaptive=True, adaptive_futility=0.4, **ROUND2)
    everyone = scored(tmp_path / "full", adaptive=True, adaptive_futility=0.9999, **ROUND2)
    details = adaptive.details
    second = details["second_round"].to_numpy(dtype=bool)
    assert 0 < second.sum() < len(details)
    assert (details["n_null_draws"] == np.where(second, 5, 3)).all()
    assert (details["p_value"][~second] > 0.4).all()
    assert (fixed.details["n_null_draws"] == 3).all()
    copies = (details["n_sequences"] * (1 + details["n_null_draws"])).mean()
    assert adaptive.metrics["copies_per_latent"] == copies
    assert fixed.metrics["copies_per_latent"] == (fixed.details["n_sequences"] * 4).mean()
    for name in ("nces_geomean", "nces_rank", "frac_beats_null", "mean_effect_kl"):
        assert adaptive.metrics[name] == fixed.metrics[name]
    # the full design on the same draws: the latents that continue have its data (their
    # p-values differ only by the variance prior, fitted on the latents that continue)
    for column in ("nces", "percentile", "n_sequences"):
        np.testing.assert_allclose(
            details[column][second], everyone.details[column][second], rtol=1e-12
        )
    assert not (details["verified"] & ~everyone.details["verified"]).any()
