"""The engine's inputs, checked once: tokens, the SAE's hook plan, and which positions count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from csae_plugin.causal.tail import HookPlan, capture, padding_masks, plan_for_sae

_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")


@dataclass(frozen=True)
class EngineInputs:
    """What every engine pass needs, validated once by :func:`prepare_inputs`."""

    model: HookedTransformer
    sae: SAE
    plan: HookPlan
    tokens: torch.Tensor
    valid: torch.Tensor  # [n_seq, T] bool: may be intervened and scored (not BOS, not padding)
    attention_mask: torch.Tensor | None  # what TransformerLens would use for these tokens


def prepare_inputs(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, bos_token_id: int | None
) -> EngineInputs:
    """Validate the inputs (one-line ValueErrors) and work out masks and the tail plan."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"no tokens: expected a non-empty [n_seq, context] tensor, got {shape}")
    if sae.cfg.normalize_activations in _RUNTIME_NORMS:
        raise ValueError(
            f"SAE normalize_activations={sae.cfg.normalize_activations!r} makes decode depend on "
            "each token's norm, so a latent has no fixed decoder direction; fold it or use 'none'"
        )
    plan = plan_for_sae(model, sae)
    tokens = tokens.to(model.cfg.device)
    bos = bos_token_id
    if bos is None and model.tokenizer is not None:
        bos = model.tokenizer.bos_token_id
    not_pad, attention_mask = padding_masks(model, tokens)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding in these rows: the same forward without a mask
    valid = not_pad.clone()
    if bos is not None:
        valid[:, 0] &= tokens[:, 0] != bos
    return EngineInputs(model, sae, plan, tokens, valid, attention_mask)


def capture_rows(setup: EngineInputs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean x at the hook [b, T, d_in] and the tail's input for token ``rows``, checked finite."""
    mask = None if setup.attention_mask is None else setup.attention_mask[rows]
    x, start_input = capture(setup.model, setup.plan, setup.tokens[rows], mask)
    if not torch.isfinite(x).all():
        raise ValueError(
            f"model produced NaN activations at {setup.plan.hook_name} (token rows "
            f"{int(rows[0])}-{int(rows[-1])}); check the model's weights and dtype"
        )
    return x, start_input
