"""What an intervention's null is (``csae_plugin/causal/interventions.py``): what each kind of
random direction keeps of the latent's own direction, spectral bands that never split nearly
equal eigenvalues, and ``matched`` draws that survive rotations within a band."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from engine_setup import D_MODEL, POST, sae_and_stats

from csae_plugin import causal as iv
from csae_plugin.causal.interventions import (
    NEURON_STRATA,
    neuron_concentrated,
    participation_ratio,
)


# 9. the nulls: what each random direction keeps of the latent's own direction
def test_9_null_directions_have_the_promised_shape():
    """``matched`` keeps the latent's energy in each spectral band exactly (every draw),
    ``matched_eigen`` in each principal direction on average over draws, ``covariance``
    follows the eigenvalues, ``isotropic`` is flat; a latent along one principal direction
    gets nulls along that same direction (up to sign)."""
    _, stats = sae_and_stats("standard", POST)
    basis = stats.cov_eigvecs.float()
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(D_MODEL, generator=gen) * torch.linspace(0.05, 3.0, D_MODEL)
    target = (direction @ basis) ** 2 / direction.norm() ** 2
    bands = iv.spectral_bands(stats.cov_eigvals)
    n_bands = int(bands.max()) + 1

    def draws(null: str, d: torch.Tensor | None = direction) -> torch.Tensor:
        u = iv.null_directions(stats, 20_000, torch.Generator().manual_seed(1), null, d)
        assert torch.allclose(u.norm(dim=1), torch.ones(len(u)), atol=1e-5)
        return (u @ basis) ** 2

    def per_band(energy: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*energy.shape[:-1], n_bands).index_add_(-1, bands, energy)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])

    matched = draws("matched")
    torch.testing.assert_close(per_band(matched), per_band(target).expand_as(per_band(matched)))
    eigen, covariance = draws("matched_eigen").mean(0), draws("covariance").mean(0)
    isotropic = draws("isotropic").mean(0)
    assert corr(eigen, target) > 0.98
    assert corr(covariance, stats.cov_eigvals.float()) > 0.98
    assert float(isotropic.max() / isotropic.min()) < 1.2
    assert corr(covariance, target) < 0.9  # the nulls differ, so the checks above can fail
    for null in ("matched", "matched_eigen"):
        along = iv.null_directions(stats, 8, gen, null, 2.0 * basis[:, -1])
        np.testing.assert_allclose((along @ basis[:, -1]).abs().numpy(), 1.0, atol=1e-5)
        with pytest.raises(ValueError, match="needs the latent's decoder direction"):
            iv.null_directions(stats, 2, gen, null)


def test_9_bands_never_split_nearly_equal_eigenvalues():
    lam = torch.tensor([0.0, 1e-12, 1.0, 1.001, 1.5, 1.5, 3.0, 3.02, 3.05, 10.0])
    assert iv.spectral_bands(lam).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 4]


def test_9_matched_null_is_invariant_to_rotations_within_a_band():
    """Rounding can rotate eigenvectors whose eigenvalues nearly coincide into each other
    (another thread count, CPU or device): the ``matched`` draws must not move, where 0.2.0's
    ``matched_eigen`` draws do."""
    sae, stats = sae_and_stats("standard", POST)
    lam = stats.cov_eigvals.clone()
    lam[-3] = lam[-2] * (1 - 1e-4)  # two nearly coincident eigenvalues share a band
    c, s_ = np.cos(0.5), np.sin(0.5)
    rotation = torch.eye(D_MODEL, dtype=stats.cov_eigvecs.dtype)
    rotation[-3:-1, -3:-1] = torch.tensor([[c, -s_], [s_, c]], dtype=rotation.dtype)
    plain = replace(stats, cov_eigvals=lam)
    rotated = replace(stats, cov_eigvals=lam, cov_eigvecs=stats.cov_eigvecs @ rotation)
    d = iv.decoder_directions(sae, torch.tensor([3]))[0].detach()
    for null, moves in (("matched", False), ("matched_eigen", True)):
        a = iv.latent_null_directions(plain, 3, 16, 0, null, d)
        b = iv.latent_null_directions(rotated, 3, 16, 0, null, d)
        assert (float((a - b).abs().max()) > 1e-3) == moves, null


def test_9_matched_permutes_the_coordinates_of_a_latent_on_few_of_them():
    """A direction on few coordinates of the hook's space gets, under ``matched``, its own
    values moved to random coordinates of the same variance strata with random signs (its
    band draws would be dense); a dense direction keeps the band null (0.3.0's draws)."""
    _, stats = sae_and_stats("standard", POST)
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(D_MODEL, generator=gen)
    sparse = torch.zeros(D_MODEL)
    sparse[[3, 17]] = torch.tensor([2.0, -1.0])
    assert not neuron_concentrated(stats, dense)
    assert neuron_concentrated(stats, sparse)
    for seed in range(3):  # a dense latent's matched draws are the band null's, draw for draw
        torch.testing.assert_close(
            iv.latent_null_directions(stats, seed, 8, 0, "matched", dense),
            iv.latent_null_directions(stats, seed, 8, 0, "matched_band", dense),
        )
    u = iv.latent_null_directions(stats, 3, 64, 0, "matched", sparse)
    band = iv.latent_null_directions(stats, 3, 64, 0, "matched_band", sparse)
    assert float(participation_ratio(band).median()) > 4 * 1.6  # dense: 4x its 1.6 coordinates
    unit = sparse / sparse.norm()
    np.testing.assert_allclose(  # the same values, up to sign, on other coordinates
        u.abs().sort(dim=1).values.numpy(),
        unit.abs().sort().values.expand(64, -1).numpy(),
        atol=1e-6,
    )
    rank = torch.empty(D_MODEL, dtype=torch.long)
    rank[stats.act_var.argsort()] = torch.arange(D_MODEL)
    stratum = rank * NEURON_STRATA // D_MODEL
    for row in u:
        assert sorted(stratum[row != 0].tolist()) == sorted(stratum[[3, 17]].tolist())
    assert len({tuple(row.nonzero().flatten().tolist()) for row in u}) > 1  # coordinates move
    assert (u[:, u.abs().sum(0).argmax()] > 0).any() and (u[:, u.abs().sum(0).argmax()] < 0).any()
