"""Activation statistics on reference tokens: what the interventions and the nulls are set by."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from csae_plugin.causal.draws import draw_generator
from csae_plugin.causal.inputs import capture_rows, prepare_inputs
from csae_plugin.causal.tail import encode


@dataclass
class ReferenceStats:
    """Activation statistics on reference tokens (BOS and padding excluded).

    Per latent: ``mean_act`` (mean of f_i, zeros included; the ``mean`` intervention),
    ``max_act`` (the ``steer`` scale), ``firing_freq``, and ``resample_pool`` [pool, d_sae],
    the latent values at uniformly drawn reference tokens (the ``resample`` intervention).
    For the null: ``act_mean`` and the eigendecomposition of the covariance Sigma of x at the
    hook, ``cov_eigvals`` [d_in] (clamped at 0) and ``cov_eigvecs`` [d_in, d_in] (columns,
    each with its largest entry positive), and ``act_var`` [d_in], Sigma's diagonal (the
    variance of each coordinate: the neuron-permuted null's strata).
    """

    mean_act: torch.Tensor
    max_act: torch.Tensor
    firing_freq: torch.Tensor
    resample_pool: torch.Tensor
    act_mean: torch.Tensor
    cov_eigvals: torch.Tensor
    cov_eigvecs: torch.Tensor
    act_var: torch.Tensor
    n_tokens: int

    @property
    def cov_factor(self) -> torch.Tensor:
        """A square root L of Sigma (``L @ L.T == Sigma``) [d_in, d_in]."""
        return self.cov_eigvecs * self.cov_eigvals.sqrt()

    @property
    def mean_active_act(self) -> torch.Tensor:
        """Mean of f_i over the tokens where latent i fires (0 for latents that never fire)."""
        safe = self.firing_freq.clamp(min=1e-30)
        return torch.where(self.firing_freq > 0, self.mean_act / safe, 0.0)


@torch.no_grad()
def reference_stats(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    pool_size: int = 512,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> ReferenceStats:
    """Stream ``tokens`` [n, T] through the model and SAE once and collect :class:`ReferenceStats`.

    Memory holds one batch of activations at a time. The resample pool draws ``pool_size``
    reference tokens uniformly with replacement, seeded by ``seed``.
    """
    setup = prepare_inputs(model, sae, tokens, bos_token_id)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    n_valid = int(setup.valid.sum())
    if n_valid == 0:
        raise ValueError("no reference tokens: every position is BOS or padding")
    flat_valid = setup.valid.flatten().nonzero().squeeze(1).cpu()  # indexes the CPU pool
    gen = draw_generator(seed, 2)
    pool_tokens = flat_valid[torch.randint(n_valid, (pool_size,), generator=gen)]

    sum_f = torch.zeros(d_sae, dtype=torch.float64)
    max_f = torch.zeros(d_sae, dtype=torch.float64)
    count_f = torch.zeros(d_sae, dtype=torch.float64)
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    sum_xx = torch.zeros(d_in, d_in, dtype=torch.float64)
    pool = torch.zeros(pool_size, d_sae, dtype=torch.float32)
    n_seq, n_ctx = tokens.shape
    starts = range(0, n_seq, batch_size)
    for start in tqdm(starts, desc="reference stats", disable=not progress):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        x, _ = capture_rows(setup, rows)
        f = encode(sae, x).float()
        valid = setup.valid[rows].to(x.device)
        fv = f[valid].double().cpu()
        xv = x[valid].double().cpu()
        sum_f += fv.sum(0)
        count_f += (fv > 0).sum(0)
        if fv.shape[0]:
            max_f = torch.maximum(max_f, fv.max(0).values)
        sum_x += xv.sum(0)
        sum_xx += xv.T @ xv
        in_batch = (pool_tokens >= start * n_ctx) & (pool_tokens < (start + len(rows)) * n_ctx)
        local = pool_tokens[in_batch] - start * n_ctx
        pool[in_batch] = f.reshape(-1, d_sae)[local.to(f.device)].float().cpu()

    act_mean = sum_x / n_valid
    cov = (sum_xx - n_valid * torch.outer(act_mean, act_mean)) / max(n_valid - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    # an eigenvector's sign is arbitrary, and rounding (another thread count, another machine)
    # can flip it, which would change every null draw mapped through it: fix each column's
    # largest entry positive
    largest = eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True))
    eigvecs = eigvecs * torch.where(largest < 0, -1.0, 1.0).to(eigvecs)
    return ReferenceStats(
        mean_act=(sum_f / n_valid).float(),
        max_act=max_f.float(),
        firing_freq=(count_f / n_valid).float(),
        resample_pool=pool,
        act_mean=act_mean.float(),
        cov_eigvals=eigvals.clamp(min=0),
        cov_eigvecs=eigvecs,
        act_var=cov.diagonal().clone(),
        n_tokens=n_valid,
    )
