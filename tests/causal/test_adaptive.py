"""The adaptive second round (csae_plugin.causal.adaptive): futility stopping keeps the error
rate, a strong latent is still verified, and the second round's draws are new and seeded.

The error-rate claims run on synthetic effects (log effects = direction term + sequence
noise, the two-way model docs/nces.md measures), through the same functions the eval calls;
the engine claims on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_setup import POST, eval_tokens, make_sae, reference_tokens, tiny_model

from csae_plugin import causal as iv
from csae_plugin.causal.adaptive import (
    adaptive_details,
    continues,
    copies_per_latent,
    merge_rounds,
    round1_p_values,
    subset,
)
from csae_plugin.causal.engine import LatentEffects
from csae_plugin.causal.interventions import latent_null_directions
from csae_plugin.causal.nces import effects_details

S1, K1, S2, K2 = 8, 6, 16, 12
FDR = 0.05
OPTIONS = dict(fdr_level=FDR, n_resamples=10, seed=0)


def synthetic(n_latents: int, seed: int, log_ratios: np.ndarray | None = None) -> LatentEffects:
    """S2 x K2 effects of null-like latents (the first ``len(log_ratios)`` real at them)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(0, 0.2, (n_latents, 1, 1 + K2))
    logs = direction + rng.normal(0, 0.45, (n_latents, S2, 1 + K2))
    if log_ratios is not None:
        logs[: len(log_ratios), :, 0] += log_ratios[:, None] - direction[: len(log_ratios), :, 0]
    effects = np.exp(logs - 4)
    return LatentEffects(
        latents=np.arange(n_latents),
        effect=effects[..., 0],
        null_effects=effects[:, :, None, 1:],
        sequences=np.tile(np.arange(S2), (n_latents, 1)),
        n_positions=np.ones((n_latents, S2), dtype=np.int64),
        intervention="zero",
        null_draws=K2,
        alpha=1.0,
    )


def cut(effects: LatentEffects, seqs: slice, draws: slice, real: bool = True) -> LatentEffects:
    null = effects.null_effects[:, seqs, :, draws]
    effect = effects.effect[:, seqs] if real else np.full(null.shape[:2], np.nan)
    return LatentEffects(
        latents=effects.latents,
        effect=effect,
        null_effects=null,
        sequences=effects.sequences[:, seqs],
        n_positions=effects.n_positions[:, seqs],
        intervention="zero",
        null_draws=null.shape[3],
        alpha=1.0,
    )


def adaptive_run(full: LatentEffects, futility: float):
    """Round 1 at S1 x K1, the second round to S2 x K2 for the latents that continue."""
    first = cut(full, slice(0, S1), slice(0, K1))
    round1 = effects_details(first, **OPTIONS)
    round1["n_null_draws"] = K1
    keep = continues(round1_p_values(round1, first.nulls), futility)
    more = subset(full, keep)
    final = merge_rounds(
        subset(first, keep),
        cut(more, slice(S1, S2), slice(0, K1)),
        cut(more, slice(0, S2), slice(K1, K2), real=False),
    )
    return adaptive_details(round1, final, **OPTIONS)


def test_continues_stops_the_clearly_null_and_the_untestable():
    p = np.array([[0.05, 0.9], [0.5, 0.6], [np.nan, np.nan], [0.2, np.nan]])
    assert continues(p, 0.2).tolist() == [True, False, False, True]
    assert continues(p[:, 0], 0.1).tolist() == [True, False, False, False]


def test_second_round_data_is_the_full_designs():
    full = synthetic(24, seed=0)
    everyone = adaptive_run(full, futility=1.0)  # every latent continues: the full design
    fixed = effects_details(full, **OPTIONS)
    for column in ("nces", "p_value", "q_value", "verified", "n_sequences"):
        np.testing.assert_array_equal(everyone[column], fixed[column])
    assert (everyone["n_null_draws"] == K2).all() and everyone["second_round"].all()


def test_on_null_dictionaries_the_error_rate_is_kept():
    """Over 40 null dictionaries: stopped latents keep p-values above the futility threshold,
    false verifications stay within the FDR level, and the adaptive verdicts are the full
    design's on the same draws but for the variance prior, refit on the latents that continue
    (which moved one verdict in these 40; the simulation measures its effect on the rate)."""
    any_false, per_latent, beyond_full = [], [], 0
    for seed in range(40):
        full = synthetic(64, seed=100 + seed)
        adaptive = adaptive_run(full, futility=0.2)
        everyone = adaptive_run(full, futility=1.0)
        assert adaptive["p_value"][~adaptive["second_round"]].min() > 0.2
        beyond_full += int((adaptive["verified"] & ~everyone["verified"]).any())
        any_false.append(adaptive["verified"].any())
        per_latent.append(adaptive["verified"].mean())
    assert beyond_full <= 2
    assert np.mean(any_false) <= 2 * FDR  # FWER = FDR on all-null dictionaries (+ noise)
    assert np.mean(per_latent) <= FDR / 10


def test_strong_latents_get_the_second_round_and_are_verified():
    full = synthetic(64, seed=7, log_ratios=np.full(6, np.log(3.0)))
    adaptive = adaptive_run(full, futility=0.2)
    assert adaptive["second_round"][:6].all() and adaptive["verified"][:6].all()
    assert adaptive["second_round"][6:].mean() < 0.5  # most null latents stop
    copies = copies_per_latent(adaptive)
    assert S1 * (1 + K1) < copies < S2 * (1 + K2)


@pytest.fixture(scope="module")
def tiny_world():
    model, sae = tiny_model(), make_sae("standard", POST)
    stats = iv.reference_stats(model, sae, reference_tokens(), seed=0)
    return model, sae, stats


def effects_of(world, **kwargs) -> LatentEffects:
    model, sae, stats = world
    options = dict(seed=3, batch_size=16, progress=False, null_draws=K1, seqs_per_latent=S1)
    return iv.latent_effects(model, sae, eval_tokens(), [2, 5, 11], stats, **(options | kwargs))


def test_second_round_on_the_engine_extends_round_one(tiny_world):
    """The next sequences are round 1's design continued; the new draws are new, seeded."""
    fixed = effects_of(tiny_world, seqs_per_latent=S2)  # S2 x K1 at once
    first = effects_of(tiny_world)
    more_seqs = effects_of(tiny_world, seqs_per_latent=S2 - S1, first_sequence=S1)
    more_draws = effects_of(tiny_world, seqs_per_latent=S2, null_draws=K2 - K1, draw_round=1)
    again = effects_of(tiny_world, seqs_per_latent=S2, null_draws=K2 - K1, draw_round=1, real=False)
    merged = merge_rounds(first, more_seqs, again)
    np.testing.assert_array_equal(merged.sequences, fixed.sequences)
    np.testing.assert_allclose(merged.effect, fixed.effect, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(
        merged.null_effects[..., :K1], fixed.null_effects, rtol=1e-5, equal_nan=True
    )
    assert merged.null_draws == K2 and np.isnan(again.effect).all()
    np.testing.assert_array_equal(again.null_effects, more_draws.null_effects)  # reproducible
    _, sae, stats = tiny_world
    d = iv.decoder_directions(sae, torch.tensor([5]))[0]
    old = latent_null_directions(stats, 5, K2, 3, "matched", d)
    new = latent_null_directions(stats, 5, K2 - K1, 3, "matched", d, draw_round=1)
    assert torch.equal(new, latent_null_directions(stats, 5, K2 - K1, 3, "matched", d, 1))
    assert (old @ new.T).abs().max() < 0.999  # none of them repeats a round-1 draw
