"""Which latents the NCES eval scores: the ``latents`` setting's language.

``auto`` (every latent up to :data:`AUTO_ALL_MAX`, else ``screen:``:data:`AUTO_SCREENED`),
``all``, a count ``N`` (a seeded random subset), a list of indices, or ``screen:N``: every
latent screened by a cheap second-order estimate (:mod:`csae_plugin.causal.screen`), then
``N`` drawn across the screen's range (:func:`stratified_by_screen`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from csae_plugin.causal import ReferenceStats
from csae_plugin.causal.screen import SCREEN_INTERVENTIONS, ScreenScores, nces_screen
from csae_plugin.evals import EvalInputError
from csae_plugin.evals.nces.eval_config import NCESEvalConfig

AUTO_ALL_MAX = 512
"""``latents='auto'`` scores every latent up to this many, else ``screen:AUTO_SCREENED``."""

AUTO_SCREENED = 256


def select_latents(latents: str | int | list[int], d_sae: int, seed: int) -> np.ndarray:
    """The latent indices to evaluate: all, a seeded random subset of a count, or a list (each
    index once, below ``d_sae``; a one-line error otherwise)."""
    if latents == "all":
        return np.arange(d_sae)
    if isinstance(latents, int):
        if latents >= d_sae:
            return np.arange(d_sae)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(d_sae, size=latents, replace=False))
    ids = np.asarray(latents, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= d_sae:
        raise EvalInputError(
            f"latent index {int(ids.max())} out of range: the SAE has d_sae={d_sae} latents; "
            f"pass indices from 0 to {d_sae - 1}"
        )
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = int(np.argmax(counts > 1))
        raise EvalInputError(
            f"latent {int(values[repeated])} is listed {int(counts[repeated])} times in "
            "latents; list each latent once"
        )
    return ids


def resolve_latents(latents: str | int | list[int], d_sae: int) -> str | int | list[int]:
    """``'auto'`` made concrete for an SAE of ``d_sae`` latents; anything else unchanged."""
    if latents != "auto":
        return latents
    return "all" if d_sae <= AUTO_ALL_MAX else f"screen:{AUTO_SCREENED}"


def check_latents(config: NCESEvalConfig, d_sae: int) -> None:
    """A one-line :class:`EvalInputError` if ``config.latents`` lists latents an SAE of
    ``d_sae`` latents cannot score (an index past ``d_sae``, one listed twice); needs no model."""
    spec = resolve_latents(config.latents, d_sae)
    if isinstance(spec, list):
        select_latents(spec, d_sae, config.random_seed)


def stratified_by_screen(scores: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` latents, one drawn uniformly from each of ``n`` equal strata of the latents
    ordered by ``scores`` (NaN, never fired on the screened tokens, last): every latent has
    the same chance n / d_sae, so per-SAE fractions over the sample stay unbiased, and the
    sample spans the screen's range."""
    d_sae = len(scores)
    if n >= d_sae:
        return np.arange(d_sae)
    order = np.argsort(np.where(np.isnan(scores), np.inf, scores), kind="stable")
    rng = np.random.default_rng(seed)
    return np.sort([rng.choice(stratum) for stratum in np.array_split(order, n)])


@dataclass
class LatentSelection:
    """The latents to score, how they were chosen (for the progress line), and the screen's
    scores of every latent when ``screen:N`` chose them."""

    latents: np.ndarray
    how: str
    screen: ScreenScores | None = None


def choose_latents(
    model: HookedTransformer,
    sae: SAE,
    eval_tokens: torch.Tensor,
    stats: ReferenceStats,
    config: NCESEvalConfig,
    *,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> LatentSelection:
    """The latents ``config.latents`` picks of ``sae``; ``screen:N`` first screens every latent
    on the first ``config.screen_sequences`` evaluation rows (with the config's intervention
    where the screen has it, else ``zero``, and its first null)."""
    d_sae = sae.cfg.d_sae
    spec = resolve_latents(config.latents, d_sae)
    if not (isinstance(spec, str) and spec.startswith("screen:")):
        how = "all" if spec == "all" else "as asked"
        return LatentSelection(select_latents(spec, d_sae, config.random_seed), how)
    screen = nces_screen(
        model,
        sae,
        eval_tokens[: config.screen_sequences],
        stats,
        intervention=config.intervention if config.intervention in SCREEN_INTERVENTIONS else "zero",
        null=config.engine_nulls[0],
        samples=config.screen_samples,
        alpha=config.steer_alpha,
        seed=config.random_seed,
        bos_token_id=bos_token_id,
        progress=progress,
    )
    latents = stratified_by_screen(screen.nces, int(spec.split(":")[1]), config.random_seed)
    how = f"drawn across the screen's range ({spec}; the screen scored all {d_sae})"
    return LatentSelection(latents, how, screen)
