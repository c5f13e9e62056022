"""Reference dictionaries (random, PCA, identity, planted) as plain SAELens SAEs, on the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import BOS, D_MODEL, HOOK, make_tiny_model, make_tokens

from csae_plugin.evals.reference_saes import (
    RANDOM_SHAPES,
    REFERENCE_KINDS,
    hook_activations,
    reference_directions,
    reference_fisher,
    reference_sae,
    save_reference_saes,
)
from csae_plugin.saes.loading import load_sae_from_folder


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return hook_activations(make_tiny_model(), HOOK, make_tokens(64), bos_token_id=BOS)


@pytest.fixture(scope="module")
def fisher() -> torch.Tensor:
    return reference_fisher(make_tiny_model(), HOOK, make_tokens(16, seed=5), bos_token_id=BOS)


def test_activations_leave_out_bos(acts):
    assert acts.shape == (64 * 15, D_MODEL)


@pytest.mark.parametrize("kind", REFERENCE_KINDS + RANDOM_SHAPES)
def test_each_reference_fires_at_the_rate_asked_with_unit_directions(acts, fisher, kind):
    width = 48 if kind.startswith("random") else None
    sae = reference_sae(kind, acts, HOOK, d_sae=width, firing_rate=0.05, seed=3, fisher=fisher)
    assert sae.cfg.d_sae == (48 if width else D_MODEL)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
    rate = (sae.encode(acts) > 0).float().mean(0)
    assert float((rate - 0.05).abs().max()) < 0.01
    # a latent's value is the projection of x - mean on its direction where it fires
    f = sae.encode(acts)
    projection = (acts - acts.mean(0)) @ sae.W_dec.T
    fired = f > 0
    torch.testing.assert_close(f[fired], projection[fired], rtol=1e-4, atol=1e-4)


def test_directions_have_the_promised_shapes(acts):
    cov = torch.cov(acts.T.double())
    eigvals, eigvecs = torch.linalg.eigh(cov)
    pca = reference_directions("pca", acts)
    top = eigvecs[:, -1].float()
    assert float((pca[0] @ top).abs()) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(reference_directions("identity", acts), torch.eye(D_MODEL))
    iso = reference_directions("random_isotropic", acts, 4000, seed=0)
    shaped = reference_directions("random_covariance", acts, 4000, seed=0)

    def energy(dirs: torch.Tensor) -> torch.Tensor:
        return ((dirs.double() @ eigvecs) ** 2).mean(0)

    assert float(energy(iso).max() / energy(iso).min()) < 1.3  # flat over the spectrum
    ratio = energy(shaped) / (eigvals / eigvals.sum())
    assert float(ratio.max() / ratio.min()) < 1.5 or float(eigvals.min()) < 1e-6
    sparse = reference_directions("random_sparse", acts, 50, seed=0)
    assert ((sparse != 0).sum(1) == 8).all()
    with pytest.raises(ValueError, match="at most d_in"):
        reference_directions("pca", acts, D_MODEL + 1)
    with pytest.raises(ValueError, match="needs the hook's"):
        reference_directions("planted_fisher", acts)
    with pytest.raises(ValueError, match="unknown reference SAE"):
        reference_directions("random_gaussian", acts)


def test_saved_references_load_as_plain_saelens_saes(tmp_path):
    folders = save_reference_saes(
        make_tiny_model(), HOOK, make_tokens(32), tmp_path, d_sae=40, bos_token_id=BOS
    )
    assert [f.name for f in folders][:2] == [
        "reference_random-isotropic",
        "reference_random-covariance",
    ]
    for folder in folders:
        sae = load_sae_from_folder(folder)
        assert type(sae).__name__ == "JumpReLUSAE"
        assert sae.cfg.metadata.hook_name == HOOK
    again = save_reference_saes(make_tiny_model(), HOOK, make_tokens(32), tmp_path, d_sae=40)
    assert again == folders


def test_planted_directions_are_the_top_fisher_directions(acts, fisher):
    """The positive control: the directions the output is most sensitive to per unit norm,
    far more (to second order) than the average of their band-matched null directions."""
    planted = reference_directions("planted_fisher", acts, 4, fisher=fisher).double()
    values = torch.linalg.eigvalsh(fisher)
    sensitivity = ((planted @ fisher) * planted).sum(1)
    torch.testing.assert_close(sensitivity, values.flip(0)[:4], rtol=1e-4, atol=0)
    random = reference_directions("random_covariance", acts, 200, seed=1).double()
    assert float(sensitivity.min()) > 2 * float(((random @ fisher) * random).sum(1).mean())
