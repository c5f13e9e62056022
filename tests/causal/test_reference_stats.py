"""Reference statistics (``csae_plugin/causal/reference_stats.py``): no autograd graph held
across batches, and eigenvectors with a fixed sign, so the null's draws survive a flip."""

from __future__ import annotations

import numpy as np
import torch
from engine_setup import BOS, POST, reference_tokens, sae_and_stats, tiny_model
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from csae_plugin import causal as iv


def test_reference_stats_builds_no_autograd_graph():
    """Called outside ``no_grad`` (as evals/benchmarks/nces.py does), the statistics must not hold
    an autograd graph spanning every batch of reference tokens."""
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=50, n_ctx=8, act_fn="gelu"
        )
    )
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=16, d_sae=32, k=4, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")
        )
    )
    tokens = torch.randint(1, 50, (6, 8), generator=torch.Generator().manual_seed(0))
    stats = iv.reference_stats(model, sae, tokens, batch_size=2, bos_token_id=0)
    for value in (stats.mean_act, stats.max_act, stats.act_mean, stats.cov_factor):
        assert not value.requires_grad
    assert np.isfinite(stats.act_mean.numpy()).all()


def test_null_draws_do_not_depend_on_eigenvector_signs(monkeypatch):
    """Rounding can flip an eigenvector's sign; the stats fix each column's largest entry
    positive, so the null's draws survive a flip."""
    sae, stats = sae_and_stats("standard", POST)
    vecs = stats.cov_eigvecs
    assert (vecs.gather(0, vecs.abs().argmax(0, keepdim=True)) > 0).all()
    eigh = torch.linalg.eigh

    def flipping_eigh(matrix):
        values, vectors = eigh(matrix)
        return values, vectors * torch.where(torch.arange(len(values)) % 2 == 0, -1.0, 1.0)

    monkeypatch.setattr(torch.linalg, "eigh", flipping_eigh)
    again = iv.reference_stats(tiny_model(), sae, reference_tokens(), bos_token_id=BOS)
    torch.testing.assert_close(again.cov_eigvecs, vecs)
    d = iv.decoder_directions(sae, torch.tensor([3]))[0]
    torch.testing.assert_close(
        iv.latent_null_directions(again, 3, 4, 0, "matched", d),
        iv.latent_null_directions(stats, 3, 4, 0, "matched", d),
    )
