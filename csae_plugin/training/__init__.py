"""Training causal SAEs: SAELens's runner with the language model attached (:mod:`.runner`),
the KL term (:mod:`.kl`), causal verification (:mod:`.verification`), and one function that
trains any architecture the same way for comparisons (:mod:`.train`), from the model or from
activations cached once (:mod:`.cache`)."""

from csae_plugin.training.cache import cache_activations
from csae_plugin.training.runner import CausalSAETrainingRunner
from csae_plugin.training.train import ARCHITECTURES, TrainSpec, sae_training_config, train_sae

__all__ = [
    "ARCHITECTURES",
    "CausalSAETrainingRunner",
    "TrainSpec",
    "cache_activations",
    "sae_training_config",
    "train_sae",
]
