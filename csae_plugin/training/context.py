"""What the causal SAE's model-dependent terms need from the runner.

:class:`CausalTrainingContext` holds the frozen model and a source of token sequences; the
runner creates it and attaches it to the training SAE, which calls :meth:`kl_term` (term 3,
:mod:`csae_plugin.training.kl`) and :meth:`verify` (term 4,
:mod:`csae_plugin.training.verification`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from csae_plugin.causal.tail import HookPlan, parse_hook
from csae_plugin.saes.causal import CausalTrainingSAE
from csae_plugin.training.fisher import fisher_kl, hook_fisher
from csae_plugin.training.kl import spliced_kl
from csae_plugin.training.verification import verify_and_act


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
    fisher: torch.Tensor | None = None
    total_steps: int | None = None
    plan: HookPlan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.plan = parse_hook(self.hook_name)  # an unsupported hook fails before training

    def spliced_kl(
        self,
        sae: torch.nn.Module,
        tokens: torch.Tensor,
        positions: int = 0,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """KL(p_clean || p_spliced) on ``tokens`` (:func:`csae_plugin.training.kl.spliced_kl`)."""
        return spliced_kl(
            self.model,
            self.plan,
            sae,
            tokens,
            self.special_ids,
            self.scaler,
            positions,
            compute_dtype=compute_dtype,
        )

    def in_kl_phase(self, step: int, finetune_fraction: float) -> bool:
        """Whether training ``step`` (0-based) lies in the KL phase: every step when
        ``finetune_fraction`` is 0, else the last ``ceil(fraction * total_steps)`` steps."""
        if finetune_fraction == 0:
            return True
        if self.total_steps is None:
            raise ValueError(
                "kl_finetune_fraction > 0 needs the run's length: train with "
                "csae_plugin.CausalSAETrainingRunner (it sets total_steps)"
            )
        return step >= self.total_steps - math.ceil(finetune_fraction * self.total_steps)

    def kl_term(self, sae: CausalTrainingSAE) -> torch.Tensor:
        tokens = self.next_tokens(sae.cfg.kl_batch_size)
        dtype = torch.bfloat16 if sae.cfg.kl_dtype == "bfloat16" else None
        return self.spliced_kl(sae, tokens, sae.cfg.kl_positions, compute_dtype=dtype)

    def fisher_term(
        self, sae: CausalTrainingSAE, sae_in: torch.Tensor, sae_out: torch.Tensor
    ) -> torch.Tensor:
        """Second-order KL of the training batch's reconstruction errors (``sae_in`` and
        ``sae_out`` as the SAE sees them, i.e. scaled):
        :func:`csae_plugin.training.fisher.fisher_kl` in the hook's units, with its Fisher
        metric estimated on the first call from ``fisher_sequences`` sequences."""
        if self.fisher is None:
            self.fisher = hook_fisher(
                self.model,
                self.hook_name,
                self.next_tokens(sae.cfg.fisher_sequences),
                special_ids=self.special_ids,
                samples=sae.cfg.fisher_samples,
                seed=int(torch.randint(2**31 - 1, ())),
            )
        return fisher_kl(self.scaler.unscale(sae_out) - self.scaler.unscale(sae_in), self.fisher)

    def verify(
        self,
        sae: CausalTrainingSAE,
        dead_neuron_mask: torch.Tensor | None,
        step: int | None = None,
    ) -> dict[str, float]:
        """Causal verification (term 4); the result, with its training ``step``, is appended
        to :attr:`history`."""
        result = verify_and_act(self, sae, dead_neuron_mask)
        self.history.append({"step": step, **result})
        return result
