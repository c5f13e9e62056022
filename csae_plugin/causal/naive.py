"""The slow reference the engine is tested against number for number: one full hooked forward
per variant, KL from float64 log-softmax over the whole vocabulary (:func:`naive_latent_effect`),
and the same over exactly the pairs and random draws of an engine run
(:func:`naive_latent_effects`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from csae_plugin.causal.engine import LatentEffects
from csae_plugin.causal.inputs import prepare_inputs
from csae_plugin.causal.interventions import (
    check_intervention,
    decoder_directions,
    latent_null_directions,
    resample_values,
)
from csae_plugin.causal.reference_stats import ReferenceStats


def naive_latent_effect(
    model: HookedTransformer,
    sae: SAE,
    sequence: torch.Tensor,
    latent: int,
    stats: ReferenceStats,
    *,
    intervention: str = "zero",
    alpha: float = 1.0,
    null_dirs: torch.Tensor | None = None,
    resample_values: torch.Tensor | None = None,
    bos_token_id: int | None = None,
) -> tuple[float, np.ndarray]:
    """Reference: E_i(s) and the null effects for one latent on one sequence [T], the slow way.

    One full forward per variant with a hook splicing D(f') + (x - D(f)) (null: x plus the same
    per-position norm along each row of ``null_dirs``), KL from float64 log-softmax over the
    full vocabulary. Returns ``(effect, null_effects[K])``; NaN if the latent never fires.
    """
    check_intervention(intervention)
    tokens = sequence.reshape(1, -1).to(model.cfg.device)
    setup = prepare_inputs(model, sae, tokens, bos_token_id)
    hook = setup.plan.hook_name
    valid = setup.valid[0]
    null_dirs = torch.zeros(0, sae.cfg.d_in) if null_dirs is None else null_dirs
    with torch.no_grad():
        seen: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: object) -> None:
            seen["x"] = act.detach().clone()

        clean = model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])[0]
        clean_lp = clean.double().log_softmax(-1)
        x = seen["x"]
        f = sae.encode(x)
        f = (f.to_dense() if f.is_sparse else f)[0]  # [T, d_sae]
        f_i = f[:, latent]
        if intervention == "steer":
            positions = valid.clone()
            target = f_i + alpha * stats.max_act[latent]
        else:
            positions = valid & (f_i > 0)
            if intervention == "zero":
                target = torch.zeros_like(f_i)
            elif intervention == "mean":
                target = torch.full_like(f_i, float(stats.mean_act[latent]))
            else:
                if resample_values is None:
                    raise ValueError("intervention 'resample' needs resample_values")
                target = resample_values.to(f_i)
        if not positions.any():
            return float("nan"), np.full(len(null_dirs), np.nan)
        t0 = int(positions.nonzero()[0])
        scored = valid.clone()
        scored[:t0] = False
        f_new = f.clone()
        f_new[positions, latent] = target[positions]
        coeff = torch.where(positions, f_new[:, latent] - f_i, 0.0)
        direction = decoder_directions(sae, torch.tensor([latent]))[0]

        def effect_of(splice: Callable[[torch.Tensor], torch.Tensor]) -> float:
            def hook_fn(act: torch.Tensor, hook: object) -> torch.Tensor:
                return splice(act)

            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, hook_fn)])[0]
            lq = logits.double().log_softmax(-1)
            kl = (clean_lp.exp() * (clean_lp - lq)).sum(-1)
            return float(kl[scored].mean())

        def real(act: torch.Tensor) -> torch.Tensor:
            rec = sae.decode(f.unsqueeze(0)).reshape(act.shape)
            return sae.decode(f_new.unsqueeze(0)).reshape(act.shape) + (act - rec)

        def along(u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            delta = coeff[:, None] * direction.norm() * u.to(coeff)[None, :]
            return lambda act: act + delta.reshape(act.shape).to(act)

        effect = effect_of(real)
        nulls = np.array([effect_of(along(u)) for u in null_dirs])
    return effect, nulls


def naive_latent_effects(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    effects: LatentEffects,
    stats: ReferenceStats,
    *,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`naive_latent_effect` on exactly an engine run's latents, sequences (rows of
    ``tokens``, the engine's input) and random draws (its first null, ``seed`` as the engine's):
    ``(effect, null_per_draw)`` shaped as ``effects``' arrays, NaN where it had no sequence."""
    effect = np.full(effects.effect.shape, np.nan)
    null = np.full(effects.null_per_draw.shape, np.nan)
    directions = decoder_directions(sae, torch.as_tensor(effects.latents))
    for li, latent in enumerate(effects.latents):
        dirs = latent_null_directions(
            stats, int(latent), effects.null_draws, seed, effects.nulls[0], directions[li]
        )
        for j, row in enumerate(effects.sequences[li]):
            if row < 0:
                continue
            values = resample_values(stats, int(latent), int(row), tokens.shape[1], seed)
            effect[li, j], null[li, j] = naive_latent_effect(
                model,
                sae,
                tokens[row],
                int(latent),
                stats,
                intervention=effects.intervention,
                alpha=effects.alpha,
                null_dirs=dirs,
                resample_values=values,
                bos_token_id=bos_token_id,
            )
    return effect, null
