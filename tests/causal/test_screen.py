"""The second-order screen (``nces_screen``): its estimate is the exact effect's quadratic term,
and its null expectation the random-direction null's mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_setup import BOS, POST, make_sae, reference_tokens, tiny_model, tokens

from csae_plugin import causal as iv
from csae_plugin.causal.screen import nces_screen

EPS = 1e-3  # decoder scale: small perturbations, where the quadratic term is the whole KL


def scaled_sae(kind: str = "standard"):
    sae = make_sae(kind, POST)
    with torch.no_grad():
        sae.W_dec.mul_(EPS)  # the same latents fire; each moves x by EPS times as much
    return sae


def exact_effects(model, sae, rows, latents, stats, **kw):
    """The exact engine on ``rows``, in batches of 64 copies."""
    return iv.latent_effects(
        model, sae, rows, latents, stats, batch_size=64, bos_token_id=BOS, progress=False, **kw
    )


def test_screen_matches_the_exact_small_perturbation_effect_and_null():
    model, sae = tiny_model(), scaled_sae()
    rows = tokens()[64:70]  # every latent's sequences: all 6 rows
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    screen = nces_screen(
        model, sae, rows, stats, null="isotropic", samples=3000, bos_token_id=BOS, progress=False
    )
    latents = [i for i in range(12) if screen.n_sequences[i] >= 3]
    assert len(latents) >= 6
    exact = exact_effects(
        model, sae, rows, latents, stats, null="isotropic", null_draws=300, seqs_per_latent=6
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
    exact = exact_effects(model, sae, rows, latents, stats, null_draws=4, seqs_per_latent=32)
    rho = spearmanr(screen.effect[latents], np.nanmean(exact.effect, 1)).statistic
    assert rho > 0.8


def test_screen_refuses_what_it_cannot_estimate():
    model, sae = tiny_model(), make_sae("standard", POST)
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    with pytest.raises(ValueError, match="screen with 'zero'"):
        nces_screen(model, sae, tokens()[64:66], stats, intervention="resample")
    with pytest.raises(ValueError, match="samples=0"):
        nces_screen(model, sae, tokens()[64:66], stats, samples=0)


def test_the_screens_null_reads_0_3_0s_band_null_as_the_matched_one():
    """Definition 0.3.0 draws ``matched_band``: the screen's null expectation for it is the
    band-spread energy of ``matched`` (not the isotropic fallback)."""
    from csae_plugin.causal.screen import null_weights

    sae = make_sae("standard", POST)
    stats = iv.reference_stats(tiny_model(), sae, reference_tokens(), bos_token_id=BOS)
    directions = iv.decoder_directions(sae, torch.arange(8)).detach().double()
    band = null_weights(stats, directions, "matched_band")
    torch.testing.assert_close(band, null_weights(stats, directions, "matched"))
    assert not torch.allclose(band, null_weights(stats, directions, "isotropic"))
