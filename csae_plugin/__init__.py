"""Causal sparse autoencoders for SAELens, and the NCES causal-effect eval for SAEBench.

Importing this package registers the "causal" SAE architecture with SAELens.
"""

from csae_plugin._compat import patch_datasets_torchvision

patch_datasets_torchvision()

from csae_plugin.runner import CausalSAETrainingRunner  # noqa: E402
from csae_plugin.saes import (  # noqa: E402
    CausalSAE,
    CausalSAEConfig,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
    register,
)

register()

__version__ = "0.1.0"

__all__ = [
    "CausalSAE",
    "CausalSAEConfig",
    "CausalSAETrainingRunner",
    "CausalTrainingSAE",
    "CausalTrainingSAEConfig",
    "__version__",
]
