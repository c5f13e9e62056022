"""Term 3 of the causal SAE's loss (README, "The causal SAE's loss"): KL(p_clean || p_spliced),
the model's output with the SAE's reconstruction spliced in at the hook against the clean one,
differentiable in the SAE and reduced in chunks."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import softcap_enabled

from csae_plugin.causal.tail import HookPlan, capture, padding_masks, run_tail, special_token_mask

KL_CHUNK_BYTES = 64 * 2**20
"""Budget for one chunk of logits [rows, d_vocab] in the KL term (bounds its peak memory)."""


class _LeanKL(torch.autograd.Function):
    """Mean over rows of KL(p_clean || p_spliced) from final residuals, one chunk of rows at a
    time, so the [rows, d_vocab] logits never exist all at once.

    The result is a scalar, so its gradient wrt the spliced residual, ``(q - p) @ W_U.T`` per
    row (times the softcap's derivative), is computed in the same chunked pass when needed and
    only scaled in :meth:`backward`; nothing vocabulary-sized is kept for the backward pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        clean_h: torch.Tensor,
        w_u: torch.Tensor,
        b_u: torch.Tensor,
        softcap: float | None,
        compute_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        n_rows = h.shape[0]
        cap = softcap if softcap_enabled(softcap) else None
        grad = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        step = max(1, KL_CHUNK_BYTES // (4 * w_u.shape[1]))
        dtype = compute_dtype or w_u.dtype
        w = w_u.to(dtype)

        def logits(rows: torch.Tensor) -> torch.Tensor:
            # the product in ``dtype``, everything after it in float32
            return _capped(torch.addmm(b_u.to(dtype), rows.to(dtype), w).float(), cap)

        for r in range(0, n_rows, step):
            logp = logits(clean_h[r : r + step]).log_softmax(-1)
            zq = logits(h[r : r + step])
            logq = zq.log_softmax(-1)
            p = logp.exp()
            total += torch.linalg.vecdot(p, logp.sub_(logq)).double().sum()
            if grad is not None:
                dz = logq.exp_().sub_(p)  # dKL/dz_spliced = q - p
                if cap is not None:
                    dz.mul_(1 - (zq / cap).square())
                grad[r : r + step] = (dz.to(dtype) @ w.T).to(grad.dtype)
        denom = max(n_rows, 1)
        ctx.save_for_backward(None if grad is None else grad / denom)
        return (total / denom).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad_output * grad), None, None, None, None, None


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


def spliced_kl(
    model: HookedTransformer,
    plan: HookPlan,
    sae: torch.nn.Module,
    tokens: torch.Tensor,
    special_ids: torch.Tensor | None = None,
    scaler: ActivationScaler | None = None,
    positions: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """KL(p_clean || p_spliced) with the SAE's reconstruction spliced in at the hook at every
    scored position (BOS/padding keep their clean activation). Differentiable in the SAE.

    ``positions`` > 0 compares the output distributions at that many positions per sequence
    (``positions * n_sequences`` scored rows drawn without replacement with torch's global
    generator) instead of all: an unbiased estimate of the same mean at a fraction of the
    unembedding's cost.

    The model runs once up to the hook, and the clean and spliced passes only from there
    (:mod:`csae_plugin.causal.tail`); the KL is reduced chunk by chunk (:class:`_LeanKL`),
    so its cost is the layers after the hook plus three unembeddings of the scored rows.
    """
    scaler = scaler or ActivationScaler()
    tokens = tokens.to(model.cfg.device)
    mask = special_token_mask(tokens, special_ids)

    def splice(x: torch.Tensor) -> torch.Tensor:
        recon = scaler.unscale(sae.decode(sae.encode(scaler.scale(x))))
        keep = mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))
        return torch.where(keep, recon.reshape(x.shape).to(x.dtype), x)

    _, attention_mask = padding_masks(model, tokens)
    with torch.no_grad():
        x, start_input = capture(model, plan, tokens, attention_mask)

    def autocast() -> AbstractContextManager[Any]:
        if compute_dtype is None:
            return nullcontext()
        return torch.autocast(x.device.type, dtype=compute_dtype)

    with torch.no_grad(), autocast():
        clean_h = run_tail(model, plan, start_input, x, attention_mask)[mask]
    with autocast():
        spliced_h = run_tail(model, plan, start_input, splice(x), attention_mask)[mask]
    n_rows = clean_h.shape[0]
    if 0 < positions * tokens.shape[0] < n_rows:
        rows = torch.randperm(n_rows)[: positions * tokens.shape[0]].to(clean_h.device)
        clean_h, spliced_h = clean_h[rows], spliced_h[rows]
    unembed = model.unembed
    return _LeanKL.apply(
        spliced_h.float(),
        clean_h.detach().float(),
        unembed.W_U,
        unembed.b_U,
        model.cfg.output_logits_soft_cap,
        compute_dtype,
    )
