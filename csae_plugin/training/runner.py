"""SAELens's training runner with the language model attached for the causal SAE's terms 3-4."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset, LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from csae_plugin.causal.tail import check_model_matches_sae
from csae_plugin.saes.causal import CausalTrainingSAE
from csae_plugin.training.context import CausalTrainingContext


class CausalSAETrainingRunner(LanguageModelSAETrainingRunner):
    """A ``LanguageModelSAETrainingRunner`` that also gives a causal SAE the model and tokens
    for its KL and verification terms. Same config, checkpoints and logging as the parent;
    for any other architecture it behaves exactly like the parent.

    Args:
        verify_tokens: held-out token sequences [n, context] for causal verification (term 4).
            Defaults to sequences drawn once from the training stream.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: HfDataset | None = None,
        override_model: Any = None,
        override_sae: TrainingSAE[Any] | None = None,
        verify_tokens: torch.Tensor | None = None,
    ):
        super().__init__(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        check_model_matches_sae(self.model, cfg.hook_name, self.sae.cfg.d_in)
        if isinstance(self.sae, CausalTrainingSAE):
            store = self.activations_store
            if verify_tokens is None and self.sae.cfg.verify_every > 0:
                n_verify = 4 * self.sae.cfg.verify_seqs_per_latent
                verify_tokens = store.get_batch_tokens(n_verify).cpu()
            self.sae.attach(
                CausalTrainingContext(
                    model=self.model,
                    hook_name=cfg.hook_name,
                    next_tokens=lambda n: store.get_batch_tokens(n),
                    special_ids=store.exclude_special_tokens,
                    verify_tokens=verify_tokens,
                    total_steps=cfg.total_training_steps,
                )
            )

    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]):
        """Train with the model frozen (no gradients are accumulated in it), handing the
        trainer's activation scaler and optimizer to the causal terms."""
        context = getattr(self.sae, "causal_context", None)
        if context is None:
            return super().run_trainer_with_interruption_handling(trainer)
        context.scaler = trainer.activation_scaler
        context.optimizer = trainer.optimizer
        grad_flags = [p.requires_grad for p in self.model.parameters()]
        self.model.requires_grad_(False)
        try:
            return super().run_trainer_with_interruption_handling(trainer)
        finally:
            for param, flag in zip(self.model.parameters(), grad_flags, strict=True):
                param.requires_grad_(flag)
