"""A second-order screen: an estimate of every latent's effect, null and NCES at once.

The KL's gradient at the clean point is zero, so first-order attribution scores every latent 0.
Its leading term is quadratic: for a perturbation delta of the activations at the hook,
KL summed over the scored positions ~ 1/2 delta^T G delta, with G the Fisher metric of the
model's output distributions pulled back to the hook. With labels y_u sampled from the clean
model's own predictions at every position u, g = d/dx sum_u log p(y_u) satisfies
E[(g . delta)^2] = delta^T G delta (the cross terms between positions vanish in expectation),
so S backward passes estimate the quadratic form for every latent at once:

    effect_i(s) ~ 1/2 mean_samples (sum_t c_{t,i} g_t . d_i)^2 / n_scored_i(s)

where c_{t,i} is the intervention's change of latent i at position t and n_scored_i(s) the
number of positions from its first intervened one on (the exact engine's mean). The null's
expectation follows from its directions' second moment: for unit directions u with
E[u u^T] ~ V diag(w_i) V^T (V the activations' principal directions; ``matched``: d_i's
energy fraction in each spectral band spread evenly over the band, ``matched_eigen``: the
energy fractions of d_i, ``covariance``: lambda / sum(lambda), ``isotropic``: 1 / d_in),
null_i(s) ~ 1/2 ||d_i||^2 mean_samples sum_j w_ij ((V^T v_i)_j)^2 / n_scored_i(s) with
v_i = sum_t c_{t,i} g_t. (The engine normalises each random direction; the estimate uses the
unnormalised second moment.)

It is an estimate, never NCES itself: it under-predicts where the model's response to a large
ablation is not quadratic (saturating nonlinearities, activation plateaus), and it is used to
choose which latents the exact engine scores (``latents="screen:N"``) and to report a rough
score for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from csae_plugin.causal.inputs import capture_rows, prepare_inputs
from csae_plugin.causal.interventions import (
    DEFAULT_NULL,
    check_null,
    decoder_directions,
    spectral_bands,
)
from csae_plugin.causal.reference_stats import ReferenceStats
from csae_plugin.causal.tail import encode, logits, run_tail

SCREEN_INTERVENTIONS = ("zero", "mean", "steer")
"""Interventions whose change c_{t,i} is fixed by the clean activations (not ``resample``)."""


@dataclass
class ScreenScores:
    """Per latent [d_sae]: estimated mean effect per sequence (nats), the null's, their ratio
    (NaN where the latent never fired on the screened tokens) and the sequences it fired in."""

    effect: np.ndarray
    null: np.ndarray
    n_sequences: np.ndarray
    intervention: str
    null_name: str
    samples: int

    def as_dict(self) -> dict[str, object]:
        """Plain lists per latent (index = latent), for a result file."""
        return {
            "definition": "second-order estimate (csae_plugin.causal.screen), not NCES",
            "intervention": self.intervention,
            "null": self.null_name,
            "samples": self.samples,
            "effect": self.effect.tolist(),
            "null_effect": self.null.tolist(),
            "nces": self.nces.tolist(),
            "n_sequences": self.n_sequences.tolist(),
        }

    @property
    def nces(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_sequences > 0, self.effect / self.null, np.nan)


def null_weights(
    stats: ReferenceStats, directions: torch.Tensor, null: str = DEFAULT_NULL
) -> torch.Tensor:
    """w [n, d_in]: each latent's null second moment E[u u^T] = V diag(w) V^T (rows sum to 1)."""
    check_null(null)
    basis = stats.cov_eigvecs.to(directions)
    if null == "matched_eigen":
        energy = (directions @ basis) ** 2
    elif null in ("matched", "matched_band"):  # each band's energy spread over the band
        bands = spectral_bands(stats.cov_eigvals).to(directions.device)
        per_dir = (directions @ basis) ** 2
        n_bands = int(bands.max()) + 1
        band_energy = torch.zeros(
            len(directions), n_bands, dtype=per_dir.dtype, device=per_dir.device
        )
        band_energy.index_add_(1, bands, per_dir)
        size = torch.bincount(bands, minlength=n_bands).to(per_dir)
        energy = (band_energy / size)[:, bands]
    elif null == "covariance":
        energy = stats.cov_eigvals.to(directions).clamp(min=0).expand(len(directions), -1)
    else:
        energy = torch.ones_like(directions)
    return energy / energy.sum(1, keepdim=True).clamp(min=1e-30)


def nces_screen(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    stats: ReferenceStats,
    *,
    intervention: str = "zero",
    null: str = DEFAULT_NULL,
    samples: int = 8,
    batch_size: int = 4,
    alpha: float = 1.0,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> ScreenScores:
    """Screen every latent of ``sae`` on ``tokens`` [n, T] (see the module docstring).

    Costs one tail forward and ``samples`` backward passes per batch of ``batch_size`` rows,
    whatever the number of latents.
    """
    if intervention not in SCREEN_INTERVENTIONS:
        raise ValueError(
            f"the screen supports interventions {', '.join(SCREEN_INTERVENTIONS)}, not "
            f"{intervention!r} (its change is random); screen with 'zero'"
        )
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    setup = prepare_inputs(model, sae, tokens, bos_token_id)
    d_sae = sae.cfg.d_sae
    device = setup.tokens.device
    with torch.no_grad():
        directions = decoder_directions(sae, torch.arange(d_sae)).to(device)  # [d_sae, d_in]
        basis = stats.cov_eigvecs.to(directions)
        rotated = directions @ basis  # V^T d_i, as rows
        weights = null_weights(stats, directions, null) * directions.norm(dim=1, keepdim=True) ** 2
    effect = torch.zeros(d_sae, dtype=torch.float64)
    null_sum = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.int64)
    generator = torch.Generator(device=device).manual_seed(seed)
    n_seq = setup.tokens.shape[0]
    bar = tqdm(total=n_seq, desc="NCES screen", unit="seq", disable=not progress)
    for start in range(0, n_seq, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        with torch.no_grad():
            x, start_input = capture_rows(setup, rows)
            f = encode(sae, x).float()
        valid = setup.valid[rows].to(device)
        change, first = _changes(intervention, f, valid, stats, alpha)
        n_ctx = f.shape[1]
        positions = torch.arange(n_ctx, device=device)
        # scored positions from each latent's first intervened one on [b, d_sae]
        after = valid[:, :, None] & (positions[None, :, None] >= first[:, None, :])
        n_scored = after.sum(1)
        fires = first < n_ctx
        real = torch.zeros(len(rows), d_sae, dtype=torch.float64, device=device)
        nul = torch.zeros_like(real)
        for g in sampled_gradients(setup, x, start_input, rows, samples, generator):
            v = torch.einsum("bti,btd->bid", change, g @ basis)  # V^T v_i per row [b, d_sae, d_in]
            real += ((v * rotated).sum(-1) ** 2).double()
            nul += ((v**2) * weights).sum(-1).double()
        scale = 0.5 / samples / n_scored.clamp(min=1).double()
        keep = fires.cpu()
        effect += torch.where(keep, (real * scale).cpu(), 0.0).sum(0)
        null_sum += torch.where(keep, (nul * scale).cpu(), 0.0).sum(0)
        fired += keep.sum(0)
        bar.update(len(rows))
    bar.close()
    count = fired.clamp(min=1).double()
    return ScreenScores(
        effect=(effect / count).numpy(),
        null=(null_sum / count).numpy(),
        n_sequences=fired.numpy(),
        intervention=intervention,
        null_name=null,
        samples=samples,
    )


def _changes(
    intervention: str, f: torch.Tensor, valid: torch.Tensor, stats: ReferenceStats, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_{t,i} = f'_{t,i} - f_{t,i} [b, T, d_sae] (0 where not intervened) and each latent's
    first intervened position per row [b, d_sae] (T where none)."""
    n_ctx = f.shape[1]
    if intervention == "steer":
        active = valid[:, :, None].expand_as(f)
        change = alpha * stats.max_act.to(f)[None, None, :] * active
    else:
        active = valid[:, :, None] & (f > 0)
        target = 0.0 if intervention == "zero" else stats.mean_act.to(f)[None, None, :]
        change = torch.where(active, target - f, 0.0)
    any_active = active.any(1)
    first = torch.where(any_active, active.int().argmax(1), n_ctx)
    return change, first


def sampled_gradients(setup, x, start_input, rows, samples, generator):
    """d/dx sum_u log p(y_u) at the hook [b, T, d_in], once per label sample y ~ p_clean.

    d/dh log p(y) = s_y W_U[:, y] - W_U (p * s) with s = dlogit/dz (1 without a soft cap), so
    each sample needs only a gather and one backward through the tail, no logits.
    """
    model = setup.model
    mask = None if setup.attention_mask is None else setup.attention_mask[rows]
    valid = setup.valid[rows].to(x.device).reshape(-1)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        h = run_tail(model, setup.plan, start_input, x, mask)
        h_rows = h.reshape(-1, h.shape[-1])[valid]
        with torch.no_grad():
            w_u = model.unembed.W_U.float()
            capped = logits(
                model, h_rows.detach()
            )  # one unembedding; soft-capped if the model caps
            cap = model.cfg.output_logits_soft_cap
            # d cap tanh(z / cap) / dz = 1 - tanh^2 = 1 - (capped / cap)^2
            slope = 1 - (capped / cap) ** 2 if cap and cap > 0 else None
            probs = capped.softmax(-1)
            del capped
            expected = (probs if slope is None else probs * slope) @ w_u.T  # [rows, d_model]
        for _ in range(samples):
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            picked = w_u[:, labels].T
            if slope is not None:
                picked = picked * slope.gather(1, labels[:, None])
            grad_h = (picked - expected).to(h.dtype)
            (g,) = torch.autograd.grad(h_rows, x, grad_outputs=grad_h, retain_graph=True)
            yield g.float()
