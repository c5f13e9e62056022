"""Registers the "causal" architecture with SAELens's registry, idempotently."""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from csae_plugin.causal_sae import (
    ARCHITECTURE,
    CausalSAE,
    CausalSAEConfig,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
)


def register() -> None:
    """Make "causal" loadable and trainable by SAELens. Importing twice (or reloading the
    module, which creates new classes) replaces the earlier entry instead of raising."""
    SAE_CLASS_REGISTRY.pop(ARCHITECTURE, None)
    SAE_TRAINING_CLASS_REGISTRY.pop(ARCHITECTURE, None)
    register_sae_class(ARCHITECTURE, CausalSAE, CausalSAEConfig)
    register_sae_training_class(ARCHITECTURE, CausalTrainingSAE, CausalTrainingSAEConfig)
