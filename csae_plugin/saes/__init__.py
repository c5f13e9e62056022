"""The "causal" SAE architecture and its registration with SAELens.

Training: ``CausalTrainingSAE`` / ``CausalTrainingSAEConfig`` under the name "causal" in any
SAELens config; checkpoints keep that training form, so a run resumes exactly. The final SAE is
saved as the plain SAELens SAE it is equivalent to (TopK, JumpReLU or standard), so no reader
needs this package. "causal" folders (checkpoints, and folders saved by 0.1.0) load through
``CausalSAE`` / ``CausalSAEConfig`` as that plain SAE once the package is imported.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from csae_plugin.saes.causal import (
    ACTIVATIONS,
    ARCHITECTURE,
    CausalBatchTopKTrainingSAE,
    CausalStandardTrainingSAE,
    CausalTopKTrainingSAE,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
)
from csae_plugin.saes.legacy import CausalSAE, CausalSAEConfig


def register() -> None:
    """Make "causal" trainable by SAELens (and 0.1.0 "causal" folders loadable). Importing
    twice (or reloading the module, which creates new classes) replaces the earlier entry
    instead of raising."""
    SAE_CLASS_REGISTRY.pop(ARCHITECTURE, None)
    SAE_TRAINING_CLASS_REGISTRY.pop(ARCHITECTURE, None)
    register_sae_class(ARCHITECTURE, CausalSAE, CausalSAEConfig)
    register_sae_training_class(ARCHITECTURE, CausalTrainingSAE, CausalTrainingSAEConfig)


__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURE",
    "CausalBatchTopKTrainingSAE",
    "CausalSAE",
    "CausalSAEConfig",
    "CausalStandardTrainingSAE",
    "CausalTopKTrainingSAE",
    "CausalTrainingSAE",
    "CausalTrainingSAEConfig",
    "register",
]
