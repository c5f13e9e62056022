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

import torch
from sae_lens import SAE

from csae_plugin.causal.draws import draw_generator

if TYPE_CHECKING:
    from csae_plugin.causal.reference_stats import ReferenceStats

INTERVENTIONS = ("zero", "mean", "resample", "steer")
"""Ways to change one latent: to 0, to its reference mean, to a reference value, or add to it."""

NULLS = ("matched", "matched_eigen", "covariance", "isotropic")
"""Random-direction nulls. With Sigma = V diag(lambda) V^T the activations' covariance and d the
latent's decoder direction, the null's unit directions u are:

* ``matched`` (the default): the band null (below), except for a latent concentrated on far
  fewer coordinates of the hook's space than band draws are (:func:`neuron_concentrated`):
  its own coordinates, permuted among coordinates of similar variance, random signs
  (:func:`neuron_permuted`). The model's norms weight each coordinate, so the coordinate
  basis is privileged, and a sparse direction is not distributed like dense band draws.
* band (NCES 0.3.0's ``matched``, drawn as ``matched_band``): d's own energy in each band of
  Sigma's spectrum (:func:`spectral_bands`), each band's part a uniformly random direction
  within that band. Within-band rotations of V (rounding moves eigenvectors where eigenvalues
  nearly coincide) leave it unchanged, and a random direction isotropic within bands is
  distributed exactly like its own null draws.
* ``matched_eigen`` (NCES 0.2.0's ``matched``): V (|V^T d| * z), z ~ N(0, I): d's energy per
  principal direction, rescaled by a random factor each, so a random direction is not
  distributed like its own nulls; kept to compare with 0.2.0 results.
* ``covariance``: u ~ N(0, Sigma); ``isotropic``: u ~ N(0, I). Calibrated only for directions
  shaped like them (docs/nces.md, "the null")."""

ENGINE_NULLS = (*NULLS, "matched_band")
"""Nulls the engine draws: :data:`NULLS` and ``matched_band``, NCES 0.3.0's ``matched``."""

_STREAMS = {"matched_eigen": 0, "isotropic": 2, "matched": 3, "matched_band": 3}
"""Each null's random stream key (0.2.0's nulls keep theirs, so their draws are unchanged)."""

BAND_RELATIVE_GAP = 0.01
"""Neighbouring eigenvalues (ascending) start a new spectral band when the larger exceeds the
smaller by more than this fraction: nearly coincident ones, whose eigenvectors rounding can
rotate into each other, always share a band."""

BAND_FLOOR = 1e-9
"""Eigenvalues below this fraction of the largest (numerically zero) form one band."""

NEURON_STRATA = 16
"""Coordinates of the hook's space, ranked by variance, form this many equal strata; the
neuron-permuted null moves a coordinate's value only within its stratum."""

NEURON_NULL_RATIO = 0.25
"""A latent gets the neuron-permuted null when its direction's participation ratio (the number
of coordinates it effectively uses) is below this fraction of its band draws' median."""

SELECTION_DRAWS = 32
"""Band draws (from one fixed stream) the selection compares a direction with."""

DEFAULT_NULL = "matched"


def spectral_bands(eigvals: torch.Tensor, relative_gap: float = BAND_RELATIVE_GAP) -> torch.Tensor:
    """Band index of each eigenvalue (``eigvals`` ascending, as ``torch.linalg.eigh`` gives).

    A band is a run of neighbours each within ``relative_gap`` of the next; eigenvalues below
    :data:`BAND_FLOOR` x the largest share band 0.
    """
    lam = eigvals.double().cpu().clamp(min=0)
    floor = BAND_FLOOR * float(lam.max()) if len(lam) else 0.0
    tiny = lam <= floor
    breaks = (lam[1:] > lam[:-1] * (1 + relative_gap)) & ~tiny[1:] & ~tiny[:-1]
    breaks |= tiny[:-1] & ~tiny[1:]
    return torch.cat([torch.zeros(1, dtype=torch.long), breaks.long().cumsum(0)])


def null_directions(
    stats: ReferenceStats,
    n: int,
    generator: torch.Generator,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` unit random directions of kind ``null`` (:data:`NULLS`) [n, d_in].

    ``direction`` (the latent's decoder direction, any norm) is needed by the matched nulls.
    """
    check_null(null)
    basis = stats.cov_eigvecs.double().cpu()
    z = torch.randn(n, basis.shape[1], generator=generator, dtype=torch.float64)
    if null == "isotropic":
        u = z
    elif null == "covariance":
        u = (z * stats.cov_eigvals.double().cpu().sqrt()) @ basis.T
    elif direction is None:
        raise ValueError(f"the {null!r} null needs the latent's decoder direction")
    elif null == "matched_eigen":
        u = (z * (direction.double().cpu().reshape(-1) @ basis).abs()) @ basis.T
    elif null == "matched" and neuron_concentrated(stats, direction):
        u = neuron_permuted(direction.double().cpu().reshape(-1), stats.act_var, n, generator)
    else:
        u = band_matched(z, direction.double().cpu().reshape(-1), basis, stats.cov_eigvals)
    return (u / u.norm(dim=1, keepdim=True).clamp(min=1e-30)).float()


def band_matched(
    z: torch.Tensor, direction: torch.Tensor, basis: torch.Tensor, eigvals: torch.Tensor
) -> torch.Tensor:
    """Rows of ``z`` [n, d_in] made into ``direction``'s band-matched null draws [n, d_in].

    Each band's part of z (its projection on the band's eigenspace, which no within-band
    rotation of ``basis`` changes) is rescaled to the direction's energy in that band.
    """
    bands = spectral_bands(eigvals)
    n_bands = int(bands.max()) + 1
    energy = torch.zeros(n_bands, dtype=torch.float64).index_add_(
        0, bands, (direction @ basis) ** 2
    )
    coords = z @ basis  # [n, d_in]: z in the eigenbasis
    z_energy = torch.zeros(len(z), n_bands, dtype=torch.float64).index_add_(1, bands, coords**2)
    scale = (energy / z_energy.clamp(min=1e-300)).sqrt()  # [n, n_bands]
    return (coords * scale[:, bands]) @ basis.T


def participation_ratio(x: torch.Tensor) -> torch.Tensor:
    """(sum x_j^2)^2 / sum x_j^4 along the last axis: how many coordinates x effectively uses."""
    x2 = x.double() ** 2
    return x2.sum(-1) ** 2 / (x2**2).sum(-1).clamp(min=1e-300)


def concentration(stats: ReferenceStats, direction: torch.Tensor) -> float:
    """The direction's participation ratio over the median of :data:`SELECTION_DRAWS` band
    draws of it (one fixed stream, so it depends on the direction and the statistics only)."""
    d = direction.double().cpu().reshape(-1)
    basis = stats.cov_eigvecs.double().cpu()
    z = torch.randn(SELECTION_DRAWS, len(d), generator=draw_generator(0, 5), dtype=torch.float64)
    band = band_matched(z, d, basis, stats.cov_eigvals)
    return float(participation_ratio(d) / participation_ratio(band).median())


def neuron_concentrated(stats: ReferenceStats, direction: torch.Tensor) -> bool:
    """Whether ``matched`` draws ``direction``'s null by :func:`neuron_permuted`: when the
    direction uses fewer than :data:`NEURON_NULL_RATIO` x as many coordinates as its band draws
    (:func:`concentration`). Measured on Gemma 3 270M layer 6
    (``evals/benchmarks/null_shapes.py``): random isotropic, covariance-shaped, PCA and
    activation-sampled directions sit within a factor e^0.95 of their band draws; sparse and
    single-coordinate ones 25-170x below.
    """
    return concentration(stats, direction) < NEURON_NULL_RATIO


def neuron_permuted(
    direction: torch.Tensor, act_var: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` draws [n, d_in] of ``direction``'s coordinates with random signs, each value moved
    to a uniformly random coordinate of its variance stratum (:data:`NEURON_STRATA` equal groups
    of coordinates ranked by ``act_var``): the direction's sparsity and its energy per variance
    stratum are kept, which coordinates carry it is random."""
    d_in = len(direction)
    by_var = act_var.double().cpu().argsort()  # coordinates, ascending variance
    stratum = torch.arange(d_in, dtype=torch.float64) * min(NEURON_STRATA, d_in) // d_in
    keys = stratum + torch.rand(n, d_in, generator=generator, dtype=torch.float64)
    moved = by_var[keys.argsort(dim=1)]  # [n, d_in]: the coordinate whose value goes to by_var
    signs = torch.randint(0, 2, (n, d_in), generator=generator, dtype=torch.float64) * 2 - 1
    out = torch.empty(n, d_in, dtype=torch.float64)
    out[:, by_var] = direction[moved] * signs
    return out


def latent_null_directions(
    stats: ReferenceStats,
    latent: int,
    null_draws: int,
    seed: int,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
    draw_round: int = 0,
) -> torch.Tensor:
    """The engine's null directions of kind ``null`` for ``latent`` [null_draws, d_in].

    One set per latent and null, shared by all its sequences (each null from its own stream,
    ``draw_generator(seed, 0, latent[, stream])``), so the null also measures how
    much random directions differ from each other. ``draw_round`` r >= 1 gives further
    independent draws of the same null from a stream of their own (``draw_generator(seed, 0,
    latent, stream, r)``, the covariance null's stream being 1 there): the adaptive second
    round's new draws (:mod:`csae_plugin.causal.adaptive`).
    """
    check_null(null)
    keys = (latent,) if null == "covariance" else (latent, _STREAMS[null])
    if draw_round:
        keys = (latent, _STREAMS.get(null, 1), draw_round)
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


def check_null(null: str, allowed: Sequence[str] = ENGINE_NULLS) -> None:
    if null not in allowed:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")


def check_nulls(
    nulls: str | Sequence[str], allowed: Sequence[str] = ENGINE_NULLS
) -> tuple[str, ...]:
    """``nulls`` as a tuple of distinct null names in ``allowed`` ('matched,covariance' also
    accepted); a config's nulls are :data:`NULLS`, the engine also draws ``matched_band``."""
    names = nulls.split(",") if isinstance(nulls, str) else list(nulls)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"no null given; choose one or more of {', '.join(NULLS)}")
    for name in names:
        check_null(name, allowed)
    return tuple(dict.fromkeys(names))


def check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(
            f"unknown intervention {intervention!r}; choose one of {', '.join(INTERVENTIONS)}"
        )


def intervened_positions(intervention: str, f_i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions an intervention changes: active non-special ones (``steer``: all non-special)."""
    return valid.expand_as(f_i) if intervention == "steer" else valid & (f_i > 0)
