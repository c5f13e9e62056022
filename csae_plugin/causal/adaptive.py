"""NCES with a second round for the undecided latents (adaptive allocation, futility stopping).

Round 1 scores every latent at the configured S1 sequences x K1 null draws. A latent whose
round-1 p-value is above ``futility`` under every null run (clearly null) stops there, with its
round-1 result. Every other latent gets a second round up to S sequences x K null draws in all:
its next S - S1 rows where it fires (its own copy and the K1 first draws there) and K - K1 new
null draws (further independent draws of the same null, from their own seeded stream) on all S
rows. Its data is then exactly a fixed S x K design's, and its p-value, NCES, CI and percentile
are computed from all of it as in a fixed design (:func:`merge_rounds`,
:func:`adaptive_details`); q-values are Benjamini-Hochberg over every latent's final p-value.

Why the error rate is kept (futility stopping only). Compare with the full design that gives
every latent S x K on the same draws. A latent that continues has the same p-value in both
(up to the variance prior of the moderated test, fitted on the latents that continue; the
simulation and the tests measure that this does not raise the false-verification rate). A
latent that stops keeps a p-value above ``futility``; with ``futility`` >= ``fdr_level`` no
such p-value can be rejected by BH nor change its threshold (BH at level alpha only looks at
p-values at most alpha), so the adaptive result is the full design's with those latents' p-values
set to 1. BH is monotone (raising p-values never adds a rejection), so the adaptive design
verifies a subset of what the full design verifies: on a dictionary of null latents its chance
of any false verification is at most the full design's, which BH keeps at ``fdr_level``, and on
any dictionary it makes no more false verifications than the full design. Stopping a latent
early for being clearly *verified* would not have this property (it adds a second chance to
reject) and is not done.

Per-SAE estimates (geometric mean, rank, fraction beating the null, mean KLs) are kept from
round 1, the same design for every latent: the latents that continue were chosen for scoring
high in round 1, so mixing designs would bias them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from csae_plugin.causal.engine import LatentEffects
from csae_plugin.causal.nces import bh_verdict, effects_details


def continues(p_round1: np.ndarray, futility: float) -> np.ndarray:
    """Latents that go on to a second round: a round-1 p-value at most ``futility`` under
    some null (``p_round1`` [n] or [n, n_nulls]; NaN, e.g. dead, stops)."""
    p = np.asarray(p_round1, dtype=np.float64)
    p = p[:, None] if p.ndim == 1 else p
    return (np.nan_to_num(p, nan=np.inf) <= futility).any(axis=1)


def round1_p_values(details: pd.DataFrame, nulls: tuple[str, ...]) -> np.ndarray:
    """Round-1 p-values per latent and null [n, n_nulls] from :func:`effects_details`."""
    if len(nulls) == 1:
        return details[["p_value"]].to_numpy(dtype=np.float64)
    return details[[f"p_value_{null}" for null in nulls]].to_numpy(dtype=np.float64)


def merge_rounds(
    first: LatentEffects,
    more_sequences: LatentEffects | None,
    more_draws: LatentEffects | None,
) -> LatentEffects:
    """The second-round latents' effects at S x K in all.

    ``first``: round 1 for these latents (S1 x K1); ``more_sequences``: their next rows where
    they fire, own copy and the K1 first draws (None if S = S1); ``more_draws``: the K - K1 new
    draws on all S rows, without own copies (None if K = K1).
    """
    effect, null, rows, positions = (
        first.effect,
        first.null_effects,
        first.sequences,
        first.n_positions,
    )
    if more_sequences is not None:
        _check_same_latents(first, more_sequences)
        effect = np.concatenate([effect, more_sequences.effect], axis=1)
        null = np.concatenate([null, more_sequences.null_effects], axis=1)
        rows = np.concatenate([rows, more_sequences.sequences], axis=1)
        positions = np.concatenate([positions, more_sequences.n_positions], axis=1)
    if more_draws is not None:
        _check_same_latents(first, more_draws)
        if not np.array_equal(more_draws.sequences, rows):
            raise ValueError("the new null draws were run on other rows than the latents' own")
        null = np.concatenate([null, more_draws.null_effects], axis=3)
    return replace(
        first,
        effect=effect,
        null_effects=null,
        sequences=rows,
        n_positions=positions,
        null_draws=null.shape[3],
    )


def _check_same_latents(a: LatentEffects, b: LatentEffects) -> None:
    if not np.array_equal(a.latents, b.latents) or a.nulls != b.nulls:
        raise ValueError("the rounds' effects are of other latents or nulls")


def subset(effects: LatentEffects, keep: np.ndarray) -> LatentEffects:
    """``effects`` of the latents where ``keep`` (a mask over ``effects.latents``)."""
    keep = np.asarray(keep, dtype=bool)
    return replace(
        effects,
        latents=effects.latents[keep],
        effect=effects.effect[keep],
        null_effects=effects.null_effects[keep],
        sequences=effects.sequences[keep],
        n_positions=effects.n_positions[keep],
    )


def adaptive_details(
    round1: pd.DataFrame,
    final: LatentEffects,
    *,
    fdr_level: float = 0.05,
    **kwargs: float | int | str,
) -> pd.DataFrame:
    """Per-latent details (``effects_details``'s columns) of an adaptive run.

    ``round1``: :func:`effects_details` of every latent's round 1, with its ``n_null_draws``;
    ``final``: the second-round latents' merged effects (:func:`merge_rounds`). Their rows
    come from ``final``, the others from ``round1``; then q-values and verdicts are recomputed
    over every latent's final p-value, per null. Adds ``second_round``.
    """
    details = round1.copy()
    details["second_round"] = False
    if len(final.latents):
        position = {int(latent): row for row, latent in enumerate(details["latent"])}
        rows = [position[int(latent)] for latent in final.latents]
        second = effects_details(final, fdr_level=fdr_level, **kwargs)
        second["n_null_draws"] = final.null_draws
        second["second_round"] = True
        for column in second.columns:
            details.iloc[rows, details.columns.get_loc(column)] = second[column].to_numpy()
    nulls = final.nulls
    suffixes = [""] if len(nulls) == 1 else ["", *(f"_{null}" for null in nulls)]
    dead = details["dead"].to_numpy(dtype=bool)
    for suffix in suffixes:
        q, verified = bh_verdict(
            details[f"p_value{suffix}"].to_numpy(dtype=np.float64),
            details[f"nces{suffix}"].to_numpy(dtype=np.float64),
            dead,
            fdr_level,
        )
        details[f"q_value{suffix}"] = q
        details[f"verified{suffix}"] = verified
    per_null = ["verified"] if len(nulls) == 1 else [f"verified_{null}" for null in nulls]
    details["verified_all_nulls"] = details[per_null].to_numpy(dtype=bool).all(axis=1)
    return details


def copies_per_latent(details: pd.DataFrame) -> float:
    """Average intervened copies per evaluated latent and null: sequences x (1 + null
    draws), the design's size (the engine runs the latent's own copy once for all nulls);
    NaN without latents."""
    if not len(details):
        return float("nan")
    return float((details["n_sequences"] * (1 + details["n_null_draws"])).mean())
