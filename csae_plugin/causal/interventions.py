"""What an intervention on one latent is, and the random directions it is compared with.

An intervention changes one latent's value (:data:`INTERVENTIONS`) at the positions where it is
active (``steer``: every non-special position), and moves the activation along the latent's
effective decoder direction by the change. The null moves it by the same amount along random
directions of a kind in :data:`NULLS`, drawn from seeded per-latent streams so that the fast
engine and the naive reference see the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from sae_lens import SAE

if TYPE_CHECKING:
    from csae_plugin.causal.reference_stats import ReferenceStats

INTERVENTIONS = ("zero", "mean", "resample", "steer")
"""Ways to change one latent: to 0, to its reference mean, to a reference value, or add to it."""

NULLS = ("matched", "covariance", "isotropic")
"""Random-direction nulls. With Sigma = V diag(lambda) V^T the activations' covariance and d the
latent's decoder direction, u is z ~ N(0, I) mapped by V (|V^T d| * z) (``matched``: the
latent's own energy in each principal direction, signs and mixing within randomised),
V (sqrt(lambda) * z) (``covariance``: u ~ N(0, Sigma)) or z itself (``isotropic``), then
normalised. ``matched`` is the default: it is the one under which random dictionaries of every
shape tried score NCES ~1 and fail verification (README, "what exactly is measured")."""

DEFAULT_NULL = "matched"


def draw_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``: independent streams per latent/sequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def null_directions(
    stats: ReferenceStats,
    n: int,
    generator: torch.Generator,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` unit random directions of kind ``null`` (:data:`NULLS`) [n, d_in].

    ``direction`` (the latent's decoder direction, any norm) is needed by ``matched``.
    """
    check_null(null)
    basis = stats.cov_eigvecs.double().cpu()
    z = torch.randn(n, basis.shape[1], generator=generator, dtype=torch.float64)
    if null == "isotropic":
        u = z
    else:
        if null == "covariance":
            scale = stats.cov_eigvals.double().cpu().sqrt()
        elif direction is None:
            raise ValueError("the 'matched' null needs the latent's decoder direction")
        else:
            scale = (direction.double().cpu().reshape(-1) @ basis).abs()
        u = (z * scale) @ basis.T
    return (u / u.norm(dim=1, keepdim=True).clamp(min=1e-30)).float()


def latent_null_directions(
    stats: ReferenceStats,
    latent: int,
    null_draws: int,
    seed: int,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The engine's null directions of kind ``null`` for ``latent`` [null_draws, d_in].

    One set per latent and null, shared by all its sequences (each null from its own stream,
    ``draw_generator(seed, 0, latent[, NULLS.index(null)])``), so the null also measures how
    much random directions differ from each other.
    """
    check_null(null)
    keys = (latent,) if null == "covariance" else (latent, NULLS.index(null))
    return null_directions(stats, null_draws, draw_generator(seed, 0, *keys), null, direction)


def resample_values(
    stats: ReferenceStats, latent: int, sequence: int, n_ctx: int, seed: int
) -> torch.Tensor:
    """The engine's ``resample`` targets for ``latent`` on token row ``sequence`` [n_ctx].

    Each position gets the latent's value at its own uniformly drawn pool token
    (from ``draw_generator(seed, 1, latent, sequence)``).
    """
    gen = draw_generator(seed, 1, latent, sequence)
    idx = torch.randint(stats.resample_pool.shape[0], (n_ctx,), generator=gen)
    return stats.resample_pool[idx, latent]


def decoder_directions(sae: SAE, latents: torch.Tensor) -> torch.Tensor:
    """Effective decoder directions d_i = decode(e_i) - decode(0), flattened to [n, d_in].

    Differs from ``W_dec[i]`` when decoding rescales (e.g. TopK's
    ``rescale_acts_by_decoder_norm``), so perturbations are always exactly what decode adds.
    """
    one_hot = torch.zeros(len(latents) + 1, sae.cfg.d_sae, dtype=sae.dtype, device=sae.W_dec.device)
    one_hot[torch.arange(len(latents), device=one_hot.device), latents.to(one_hot.device)] = 1.0
    out = sae.decode(one_hot).reshape(len(latents) + 1, -1)
    return (out[:-1] - out[-1:]).float()


def check_null(null: str) -> None:
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")


def check_nulls(nulls: str | Sequence[str]) -> tuple[str, ...]:
    """``nulls`` as a tuple of distinct known null names ('matched,covariance' also accepted)."""
    names = nulls.split(",") if isinstance(nulls, str) else list(nulls)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"no null given; choose one or more of {', '.join(NULLS)}")
    for name in names:
        check_null(name)
    return tuple(dict.fromkeys(names))


def check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(
            f"unknown intervention {intervention!r}; choose one of {', '.join(INTERVENTIONS)}"
        )


def intervened_positions(intervention: str, f_i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions an intervention changes: active non-special ones (``steer``: all non-special)."""
    return valid.expand_as(f_i) if intervention == "steer" else valid & (f_i > 0)
