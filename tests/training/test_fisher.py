"""The KL term to second order (``kl_estimator="fisher"``, ``csae_plugin/training/fisher.py``):
1/2 delta^T F delta predicts the exact KL of small errors, and training with it weights the
reconstruction error by F."""

from __future__ import annotations

import torch
from conftest import BOS, D_MODEL, HOOK, causal_cfg, make_tokens, runner_config

from csae_plugin import CausalSAETrainingRunner
from csae_plugin.causal.tail import capture, parse_hook, special_token_mask
from csae_plugin.training.context import CausalTrainingContext
from csae_plugin.training.fisher import fisher_kl, hook_fisher


class _Perturb(torch.nn.Module):
    """Stands in for an SAE in the KL term: reconstruction = x + sigma * eps_t * v, with
    eps_t i.i.d. N(0, 1) per position (so errors at two positions never act together on average)."""

    def __init__(self, v: torch.Tensor, sigma: float):
        super().__init__()
        self.v, self.sigma = v, sigma

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn(*x.shape[:-1], 1) * self.v


def test_fisher_term_is_the_kl_to_second_order_along_each_direction(tiny_model):
    """``kl_estimator="fisher"``: 1/2 delta^T F delta with F from :func:`hook_fisher` predicts
    the exact KL of small errors, direction by direction (F's top eigenvector and one from its
    lower quarter, whose KLs differ many-fold; the very bottom is the direction the next
    LayerNorm removes, with no effect at all)."""
    tokens = make_tokens(16, seed=11)
    fisher = hook_fisher(
        tiny_model, HOOK, tokens, special_ids=torch.tensor([BOS]), samples=64, progress=False
    )
    assert torch.allclose(fisher, fisher.T) and torch.linalg.eigvalsh(fisher).min() > -1e-9
    context = CausalTrainingContext(
        model=tiny_model, hook_name=HOOK, next_tokens=None, special_ids=torch.tensor([BOS])
    )
    _, eigvecs = torch.linalg.eigh(fisher)
    torch.manual_seed(0)
    exact, predicted = [], []
    for v in (eigvecs[:, -1], eigvecs[:, D_MODEL // 4]):
        v = v.float()
        with torch.no_grad():
            kl = torch.tensor([context.spliced_kl(_Perturb(v, 0.05), tokens) for _ in range(20)])
        exact.append(kl.mean().item())
        predicted.append(fisher_kl(0.05 * v[None, :], fisher).item())  # E[eps^2] = 1
    assert exact[0] > 5 * exact[1], exact
    for e, p in zip(exact, predicted, strict=True):
        assert abs(p - e) < 0.25 * e, (exact, predicted)


def test_fisher_kl_term_weights_the_reconstruction_error_by_f(tiny_model, tiny_dataset):
    """Training with ``kl_estimator="fisher"`` lowers the error where F is large at the expense
    of where it is small: with F heavy on a half-dimensional subspace (set on the context, so the
    model-derived estimate, tested above, is not needed), the SAE trained with the term has a
    smaller share of its error in that subspace than the same run without it."""
    # heavy on a random half-dimensional subspace (not on coordinates: Adam's per-coordinate
    # step sizes would largely undo a per-coordinate weighting of the decoder's gradient)
    basis, _ = torch.linalg.qr(
        torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(0))
    )
    heavy = basis[:, : D_MODEL // 2]
    fisher = (heavy @ heavy.T).double() + 1e-3 * torch.eye(D_MODEL, dtype=torch.float64)
    heldout = make_tokens(64, seed=123)
    with torch.no_grad():
        x, _ = capture(tiny_model, parse_hook(HOOK), heldout, None)
    x = x[special_token_mask(heldout, torch.tensor([BOS]))]
    share = {}
    for lambda_kl in (0.0, 100.0):
        torch.manual_seed(0)
        cfg = runner_config(
            causal_cfg("topk", k=8, lambda_kl=lambda_kl, kl_every=1, kl_estimator="fisher"),
            training_tokens=16 * 512,
        )
        runner = CausalSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        )
        runner.sae.causal_context.fisher = fisher
        sae = runner.run()
        with torch.no_grad():
            error = sae.decode(sae.encode(x)) - x
        share[lambda_kl] = ((error @ heavy).square().sum() / error.square().sum()).item()
    assert share[100.0] < 0.85 * share[0.0], share  # measured 0.36 against 0.46
