"""Term 3 to second order: the KL as a Fisher-weighted reconstruction error, no model per step.

For a small change delta_t of the activation at the hook, KL(p_clean || p_spliced) is
1/2 sum_{t,u} delta_t^T H_tu delta_u, with H the model's output Fisher metric pulled back to the
hook. Keeping the diagonal blocks and averaging them over positions gives one [d_in, d_in]
matrix F = mean_t H_tt, and the mean KL over positions is approximately

    1/2 mean_t delta_t^T F delta_t,

a reconstruction error weighted by how much each direction moves the model's output. F depends
on the model and the data, not on the SAE, so it is estimated once, before training, from
backward passes with labels sampled from the model's own predictions
(``E_y[g g^T] = H_tt`` for ``g = d/dh_t sum_u log p(y_u)``, ``y ~ p_clean``); every training step
then costs one [tokens, d_in] x [d_in, d_in] product and never runs the model, so a causal SAE
trained this way reads cached activations like its baselines.

What it drops against the exact term: the off-diagonal blocks (errors at two positions acting
together through attention) and the per-position weighting (F is one average). Its value is
deterministic, where the exact term's gradient, estimated on a few sequences, is mostly sampling
noise at the sizes a CPU affords (``evals/REPORT.md``, "Why the KL term raised the held-out
KL"; the script, ``evals/kl_diagnosis.py``, is at commit 65eea3c).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from csae_plugin.causal.inputs import EngineInputs, capture_rows
from csae_plugin.causal.screen import sampled_gradients
from csae_plugin.causal.tail import padding_masks, parse_hook, special_token_mask


def hook_fisher(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    *,
    special_ids: torch.Tensor | None = None,
    samples: int = 2,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """F = mean over scored positions t of E_{y ~ p_clean}[g_t g_t^T], [d_in, d_in] float64.

    ``tokens`` [n, T]; positions holding ``special_ids`` (BOS) or padding are not scored, as in
    the exact term. Costs one tail forward and ``samples`` backward passes per batch.
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    plan = parse_hook(hook_name)
    tokens = tokens.to(model.cfg.device)
    not_pad, attention_mask = padding_masks(model, tokens)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    valid = not_pad & special_token_mask(tokens, special_ids)
    setup = EngineInputs(model, None, plan, tokens, valid, attention_mask)  # type: ignore[arg-type]
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    total, count = None, 0
    n_seq = tokens.shape[0]
    # shown on a terminal only: it runs inside the training bar, and nested bars written to a
    # log file come out as cursor-movement codes
    for start in tqdm(
        range(0, n_seq, batch_size),
        desc="Fisher at the hook",
        unit="batch",
        disable=None if progress else True,
        leave=False,
    ):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        with torch.no_grad():
            x, start_input = capture_rows(setup, rows)
        scored = valid[rows.to(valid.device)]
        for g in sampled_gradients(setup, x, start_input, rows, samples, generator):
            g = g[scored].double()
            total = g.T @ g if total is None else total + g.T @ g
            count += g.shape[0]
    if total is None or count == 0:
        raise ValueError("no scored positions to estimate the Fisher metric on (all BOS/padding)")
    return total / count


def fisher_kl(delta: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """1/2 mean over rows of delta^T F delta: the second-order KL of reconstruction errors
    ``delta`` [rows, d_in] (in the units ``fisher`` was estimated in)."""
    return 0.5 * ((delta @ fisher.to(delta)) * delta).sum(-1).mean()
