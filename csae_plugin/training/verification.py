"""Causal verification during training (term 4 of the causal loss, ``csae_plugin.saes.causal``).

Every ``verify_every`` steps the causal SAE asks :func:`verify_and_act` to score a rotating
subset of its latents with the batched NCES engine on held-out sequences, then act on the
latents that are dead or causally inert (not verified and NCES not above 1):

* ``resample``: re-initialise them along directions the SAE reconstructs badly (inputs drawn
  with probability proportional to their squared reconstruction error, as in Anthropic's and
  SAELens's resampling), with a small encoder, zero ``b_enc`` and fresh Adam state; at most
  a quarter of the subset per verification, dead ones first, then the lowest NCES;
* ``reweight`` (``relu`` only): inert latents that fire pay a larger L1 weight, verified ones
  relax back towards weight 1. Dead latents are left alone: L1 on a latent that never fires
  costs nothing.

The training SAE works on scaled activations (SAELens's ``ActivationScaler``); the engine
sees it through :class:`ModelUnitsSAE`, which scales before encoding and unscales after
decoding, so error terms, decoder directions and null perturbations are in model units.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from csae_plugin.causal import latent_effects, reference_stats
from csae_plugin.causal.nces import effects_details, nces_metrics
from csae_plugin.causal.tail import activations_at, special_token_mask

FDR_LEVEL = 0.05
"""Benjamini-Hochberg level at which a latent counts as verified (as in the NCES eval)."""

RESAMPLE_FRACTION = 0.25
"""At most this fraction of the evaluated subset is resampled per verification (at least 1)."""

ENCODER_INIT_SCALE = 0.2
"""A resampled encoder column's norm, relative to the mean norm of the other columns."""

REWEIGHT_FACTOR = 2.0
"""An inert latent's L1 weight is multiplied by this per verification ..."""

MAX_L1_WEIGHT = 8.0
"""... up to this cap."""

RELAX_RATE = 0.5
"""A verified latent's L1 weight moves this fraction of the way back to 1 per verification."""

ENGINE_BATCH_SIZE = 16
"""Intervened sequence copies per tail forward: small, so verification never needs much memory."""

_BOOTSTRAP_RESAMPLES = 200  # the CI is not used here, only the p-values behind "verified"


class VerifiedSAE(Protocol):
    """What verification uses of the training SAE (``csae_plugin.saes.causal``'s
    ``CausalTrainingSAE``): its config, weights, encoder as saved, decoder and training mode.
    Stated here so that this module imports neither the SAE nor the context that calls it."""

    cfg: Any
    training: bool
    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_as_saved(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


class VerificationContext(Protocol):
    """What verification uses of the runner's context (``csae_plugin.training.context``'s
    ``CausalTrainingContext``, which calls :func:`verify_and_act` with itself): the frozen
    model at its hook, the scaler, held-out tokens, the optimizer whose Adam state a resample
    resets, the past verifications, and the rotation's next latent (advanced here)."""

    model: HookedTransformer
    hook_name: str
    scaler: ActivationScaler
    special_ids: torch.Tensor | None
    verify_tokens: torch.Tensor | None
    optimizer: torch.optim.Optimizer | None
    history: list[dict[str, Any]]
    _next_latent: int


class ModelUnitsSAE:
    """A training SAE as the NCES engine needs it: model-unit activations in and out.

    ``encode(x) = sae.encode(scaler.scale(x))`` and ``decode(f) = scaler.unscale(sae.decode(f))``;
    parameters are shared with ``sae`` (nothing is copied). A ``batchtopk`` SAE encodes with
    its learned threshold, as its saved inference SAE does, instead of a batch-level top-k.
    """

    def __init__(self, sae: VerifiedSAE, scaler: ActivationScaler, hook_name: str):
        self.sae = sae
        self.scaler = scaler
        self.cfg = copy.copy(sae.cfg)
        self.cfg.metadata = copy.copy(sae.cfg.metadata)
        self.cfg.metadata.hook_name = hook_name
        if self.cfg.normalize_activations in ("expected_average_only_in", "covariance_whitening"):
            self.cfg.normalize_activations = "none"  # the scaler below does it
        self.hook_z_reshaping_mode = False

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.dtype

    @property
    def W_dec(self) -> torch.Tensor:
        return self.sae.W_dec

    def encode_scaled(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """Latents of activations already in the SAE's scaled units."""
        return self.sae.encode_as_saved(x_scaled)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(self.scaler.scale(x.to(self.dtype)))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.scaler.unscale(self.sae.decode(feature_acts))


def verify_and_act(
    context: VerificationContext,
    sae: VerifiedSAE,
    dead_neuron_mask: torch.Tensor | None,
) -> dict[str, float]:
    """Score the next ``verify_latents`` latents on ``context.verify_tokens`` and act on them.

    Dead = never fires on the verify tokens, or in the trainer's ``dead_neuron_mask``.
    Returns ``frac_verified`` (over evaluated non-dead latents), ``frac_dead``,
    ``n_evaluated``, ``nces_median``, ``n_resampled`` or ``n_reweighted``, and ``seconds``.
    """
    if context.verify_tokens is None or context.verify_tokens.numel() == 0:
        raise ValueError(
            "causal verification needs held-out token sequences: pass verify_tokens to "
            "CausalSAETrainingRunner, or set verify_every=0"
        )
    start = time.perf_counter()
    cfg = sae.cfg
    seed = len(context.history)  # fresh null directions at each verification
    latents = next_latents(context, cfg.d_sae, cfg.verify_latents)
    view = ModelUnitsSAE(sae, context.scaler, context.hook_name)
    model, tokens = context.model, context.verify_tokens
    bos = _bos_token_id(context)
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            stats = reference_stats(model, view, tokens, bos_token_id=bos, seed=seed)  # type: ignore[arg-type]
            effects = latent_effects(
                model,
                view,  # type: ignore[arg-type]
                tokens,
                latents,
                stats,
                intervention="zero",
                null_draws=cfg.verify_null_draws,
                seqs_per_latent=cfg.verify_seqs_per_latent,
                batch_size=ENGINE_BATCH_SIZE,
                seed=seed,
                bos_token_id=bos,
                progress=False,
            )
            details = effects_details(
                effects, fdr_level=FDR_LEVEL, n_resamples=_BOOTSTRAP_RESAMPLES
            )
            if dead_neuron_mask is not None:
                details["dead"] |= dead_neuron_mask.detach().cpu().numpy()[latents]
            metrics = nces_metrics(details)
            result = {
                "frac_verified": metrics["frac_verified"],
                "frac_dead": metrics["frac_dead"],
                "n_evaluated": float(len(latents)),
                "nces_median": metrics["nces_median"],
            }
            if cfg.verify_action == "resample":
                cap = max(1, int(len(latents) * RESAMPLE_FRACTION))
                chosen = latents_to_resample(details, cap)
                resample_latents(context, sae, view, chosen, seed=seed)
                result["n_resampled"] = float(len(chosen))
            else:
                result["n_reweighted"] = float(reweight_latents(sae, details))
    finally:
        sae.train(was_training)
    result["seconds"] = time.perf_counter() - start
    return result


def next_latents(context: VerificationContext, d_sae: int, n: int) -> np.ndarray:
    """The next ``n`` latents of the rotation (all ``d_sae`` in turn), advancing it."""
    n = min(n, d_sae)
    latents = (context._next_latent + np.arange(n)) % d_sae
    context._next_latent = int((context._next_latent + n) % d_sae)
    return latents


def inert_mask(details: pd.DataFrame) -> np.ndarray:
    """Not verified and NCES not above 1 (undefined NCES counts as not above 1)."""
    nces = details["nces"].to_numpy(dtype=np.float64)
    return ~details["verified"].to_numpy() & ~(np.nan_to_num(nces, nan=0.0) > 1)


def latents_to_resample(details: pd.DataFrame, cap: int) -> np.ndarray:
    """Up to ``cap`` dead or inert latents of ``details``: dead first, then lowest NCES."""
    dead = details["dead"].to_numpy()
    candidates = dead | inert_mask(details)
    nces = np.nan_to_num(details["nces"].to_numpy(dtype=np.float64), nan=0.0)
    order = np.lexsort((nces, ~dead))  # dead (False sorts first), then by NCES
    order = order[candidates[order]][:cap]
    return details["latent"].to_numpy()[np.sort(order)].astype(np.int64)


@torch.no_grad()
def resample_latents(
    context: VerificationContext,
    sae: VerifiedSAE,
    view: ModelUnitsSAE,
    latents: np.ndarray,
    seed: int = 0,
) -> None:
    """Re-initialise ``latents`` along high-error directions of the verify tokens.

    Inputs are drawn with probability proportional to their squared reconstruction error;
    the decoder row is the normalised error (scaled to the mean norm of the other rows),
    the encoder column the same direction at :data:`ENCODER_INIT_SCALE` of the mean encoder
    norm, ``b_enc`` 0, the L1 weight 1, and their Adam moments 0.
    """
    if len(latents) == 0:
        return
    x_scaled = context.scaler.scale(_hook_activations(context).to(sae.dtype))
    error = x_scaled - sae.decode(view.encode_scaled(x_scaled))
    weights = error.pow(2).sum(-1).double().cpu()
    gen = torch.Generator().manual_seed(seed)
    if weights.sum() <= 0:  # a perfect reconstruction: random centred data directions
        error = x_scaled - x_scaled.mean(0)
        weights = torch.ones_like(weights)
    picks = torch.multinomial(
        weights, len(latents), replacement=len(latents) > len(weights), generator=gen
    )
    directions = error[picks.to(error.device)]
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    idx = torch.as_tensor(latents, device=sae.W_dec.device)
    others = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=idx.device)
    others[idx] = False
    if not others.any():
        others[:] = True
    dec_norm = sae.W_dec[others].norm(dim=-1).mean()
    enc_norm = sae.W_enc[:, others].norm(dim=0).mean()
    sae.W_dec[idx] = directions * dec_norm
    sae.W_enc[:, idx] = directions.T * enc_norm * ENCODER_INIT_SCALE
    sae.b_enc[idx] = 0.0
    if hasattr(sae, "l1_weights"):
        sae.l1_weights[idx] = 1.0
    if context.optimizer is not None:
        reset_adam_state(context.optimizer, sae, idx)


def reset_adam_state(
    optimizer: torch.optim.Optimizer, sae: VerifiedSAE, latents: torch.Tensor
) -> None:
    """Zero Adam's moments for ``latents``: W_enc columns, W_dec rows and b_enc entries."""
    for param, index in (
        (sae.W_enc, (slice(None), latents)),
        (sae.W_dec, latents),
        (sae.b_enc, latents),
    ):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0


@torch.no_grad()
def reweight_latents(sae: VerifiedSAE, details: pd.DataFrame) -> int:
    """Raise the L1 weight of inert latents that fire; relax verified ones towards 1.

    Returns the number of latents whose weight was raised.
    """
    latents = details["latent"].to_numpy()
    verified = details["verified"].to_numpy()
    inert = inert_mask(details) & ~details["dead"].to_numpy()
    weights = sae.l1_weights
    up = torch.as_tensor(latents[inert], device=weights.device)
    relax = torch.as_tensor(latents[verified], device=weights.device)
    weights[up] = (weights[up] * REWEIGHT_FACTOR).clamp(max=MAX_L1_WEIGHT)
    weights[relax] = 1 + (weights[relax] - 1) * (1 - RELAX_RATE)
    return int(inert.sum())


def _hook_activations(context: VerificationContext) -> torch.Tensor:
    """Model-unit activations at the hook on the verify tokens' scored positions [n, d_in]."""
    model: HookedTransformer = context.model
    tokens = context.verify_tokens.to(model.cfg.device)  # type: ignore[union-attr]
    x = activations_at(model, context.hook_name, tokens)
    x = x.reshape(*x.shape[:2], -1)
    return x[special_token_mask(tokens, context.special_ids)]


def _bos_token_id(context: VerificationContext) -> int | None:
    """The model tokenizer's BOS, else the verify tokens' first token if it is special."""
    tokenizer = context.model.tokenizer
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    first = context.verify_tokens[0, 0].cpu()  # type: ignore[index]
    if context.special_ids is not None and bool(torch.isin(first, context.special_ids.cpu())):
        return int(first)
    return None
