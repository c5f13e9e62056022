"""The second-order screen (``nces_screen``): its estimate is the exact effect's quadratic term,
and its null expectation the random-direction null's mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_interventions import BOS, POST, make_sae, reference_tokens, tiny_model, tokens

from csae_plugin import causal as iv
from csae_plugin.causal.screen import nces_screen

EPS = 1e-3  # decoder scale: small perturbations, where the quadratic term is the whole KL


def scaled_sae(kind: str = "standard"):
    sae = make_sae(kind, POST)
    with torch.no_grad():
        sae.W_dec.mul_(EPS)  # the same latents fire; each moves x by EPS times as much
    return sae


def test_screen_matches_the_exact_small_perturbation_effect_and_null():
    model, sae = tiny_model(), scaled_sae()
    rows = tokens()[64:70]  # every latent's sequences: all 6 rows
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    screen = nces_screen(
        model, sae, rows, stats, null="isotropic", samples=3000, bos_token_id=BOS, progress=False
    )
    latents = [i for i in range(12) if screen.n_sequences[i] >= 3]
    assert len(latents) >= 6
    exact = iv.latent_effects(
        model,
        sae,
        rows,
        latents,
        stats,
        null="isotropic",
        null_draws=300,
        seqs_per_latent=6,
        batch_size=64,
        bos_token_id=BOS,
        progress=False,
    )
    assert (exact.n_sequences == screen.n_sequences[latents]).all()
    effect = np.nanmean(exact.effect, 1)
    null = np.nanmean(exact.null, 1)
    np.testing.assert_allclose(screen.effect[latents], effect, rtol=0.1)
    np.testing.assert_allclose(screen.null[latents], null, rtol=0.15)
    assert screen.effect[latents].min() > 0


def test_screen_ranks_latents_like_the_exact_engine_at_full_size():
    """At the SAE's real scale the quadratic term is an approximation: its ranking holds."""
    from scipy.stats import spearmanr

    model, sae = tiny_model(), make_sae("standard", POST)
    rows = tokens()[64:96]
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    screen = nces_screen(model, sae, rows, stats, samples=64, bos_token_id=BOS, progress=False)
    latents = np.nonzero(screen.n_sequences >= 4)[0][:24]
    exact = iv.latent_effects(
        model,
        sae,
        rows,
        latents,
        stats,
        null_draws=4,
        seqs_per_latent=32,
        batch_size=64,
        bos_token_id=BOS,
        progress=False,
    )
    rho = spearmanr(screen.effect[latents], np.nanmean(exact.effect, 1)).statistic
    assert rho > 0.8


def test_screen_refuses_what_it_cannot_estimate():
    model, sae = tiny_model(), make_sae("standard", POST)
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    with pytest.raises(ValueError, match="screen with 'zero'"):
        nces_screen(model, sae, tokens()[64:66], stats, intervention="resample")
    with pytest.raises(ValueError, match="samples=0"):
        nces_screen(model, sae, tokens()[64:66], stats, samples=0)


def test_stratified_sample_spans_the_screen_and_gives_every_latent_the_same_chance():
    from csae_plugin.evals.nces.selection import resolve_latents, stratified_by_screen

    scores = np.r_[np.linspace(0.1, 5, 90), [np.nan] * 10]  # 10 never fired on the screen
    rng = np.random.default_rng(0)
    scores = scores[rng.permutation(100)]
    picked = stratified_by_screen(scores, 10, seed=3)
    assert len(set(picked)) == 10 and list(picked) == sorted(picked)
    ranks = np.argsort(np.argsort(np.where(np.isnan(scores), np.inf, scores)))
    assert sorted(ranks[picked] // 10) == list(range(10))  # one per decile of the ranking
    counts = np.zeros(100)
    for seed in range(400):
        counts[stratified_by_screen(scores, 10, seed)] += 1
    assert counts.min() > 15 and counts.max() < 70  # each latent ~40 times in 400 draws
    assert resolve_latents("auto", 512) == "all"
    assert resolve_latents("auto", 513) == "screen:256"
    assert resolve_latents([3, 4], 4096) == [3, 4]


def test_screen_latents_run_the_exact_test_on_a_sample_and_report_the_screen(tmp_path):
    from test_nces_eval import run, tiny_config, tiny_sae

    results = run(tmp_path, tiny_sae(), tiny_config(latents="screen:8", screen_sequences=6))
    result = results["tiny/release_custom_sae"]
    assert len(result["eval_result_details"]) == 8
    screen = result["eval_result_unstructured"]["screen"]
    assert len(screen["effect"]) == len(screen["nces"]) == 64
    assert "not NCES" in screen["definition"]
    scored = [row["latent"] for row in result["eval_result_details"]]
    nces = np.array([np.nan if v is None else v for v in screen["nces"]])
    ranks = np.argsort(np.argsort(np.where(np.isnan(nces), np.inf, nces)))
    assert sorted(ranks[scored] // 8) == list(range(8))  # one per eighth of the screen's ranking
