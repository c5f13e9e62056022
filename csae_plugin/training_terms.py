"""The causal SAE's loss terms that need the language model (terms 3 and 4 of csae.md).

:class:`CausalTrainingContext` holds the model and a source of token sequences; the runner
creates it and attaches it to the training SAE, which calls :meth:`kl_term` and :meth:`verify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

if TYPE_CHECKING:
    from csae_plugin.causal_sae import CausalTrainingSAE


def special_token_mask(tokens: torch.Tensor, special_ids: torch.Tensor | None) -> torch.Tensor:
    """True at positions that are scored: not BOS/EOS/padding."""
    if special_ids is None or special_ids.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, special_ids.to(tokens.device))


def kl_clean_vs_spliced(
    clean_logits: torch.Tensor, spliced_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over scored positions of KL(p_clean || p_spliced), in nats."""
    clean_logp = F.log_softmax(clean_logits.float(), dim=-1)
    spliced_logp = F.log_softmax(spliced_logits.float(), dim=-1)
    kl = F.kl_div(spliced_logp, clean_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class CausalTrainingContext:
    """What the causal SAE needs from the runner: the frozen model and token sequences."""

    model: HookedTransformer
    hook_name: str
    next_tokens: Callable[[int], torch.Tensor]
    special_ids: torch.Tensor | None = None
    scaler: ActivationScaler = field(default_factory=ActivationScaler)
    verify_tokens: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    _next_latent: int = 0

    def spliced_kl(self, sae: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """KL(p_clean || p_spliced) with the SAE's reconstruction spliced in at the hook at every
        scored position (BOS/padding keep their clean activation). Differentiable in the SAE."""
        mask = special_token_mask(tokens, self.special_ids)
        with torch.no_grad():
            clean_logits, cache = self.model.run_with_cache(tokens, names_filter=[self.hook_name])
        x = cache[self.hook_name]
        recon = self.scaler.unscale(sae.decode(sae.encode(self.scaler.scale(x))))
        spliced = torch.where(mask.unsqueeze(-1), recon.to(x.dtype), x)
        spliced_logits = self.model.run_with_hooks(
            tokens, fwd_hooks=[(self.hook_name, lambda act, hook: spliced)]
        )
        return kl_clean_vs_spliced(clean_logits, spliced_logits, mask)

    def kl_term(self, sae: CausalTrainingSAE) -> torch.Tensor:
        tokens = self.next_tokens(sae.cfg.kl_batch_size)
        return self.spliced_kl(sae, tokens)

    def verify(
        self, sae: CausalTrainingSAE, dead_neuron_mask: torch.Tensor | None
    ) -> dict[str, float]:
        from csae_plugin.verification import verify_and_act

        result = verify_and_act(self, sae, dead_neuron_mask)
        self.history.append(result)
        return result
