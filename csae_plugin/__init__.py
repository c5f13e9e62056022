"""Causal sparse autoencoders for SAELens, and the NCES causal-effect eval for SAEBench.

Importing this package registers the "causal" SAE architecture with SAELens. Layout:
``saes`` (the architecture and its registration), ``training`` (runner, KL term, verification),
``causal`` (the model's tail, the intervention engine, NCES statistics), ``evals`` (the SAEBench
evals and the Python API that runs them, :mod:`csae_plugin.evals.api`); ``cli`` and ``demo`` are
front-ends over that API.
"""

from csae_plugin import _moved
from csae_plugin._compat import patch_datasets_torchvision

patch_datasets_torchvision()
_moved.install()

from csae_plugin.saes import (  # noqa: E402
    CausalSAE,
    CausalSAEConfig,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
    register,
)
from csae_plugin.training.runner import CausalSAETrainingRunner  # noqa: E402

register()

__version__ = "0.7.0"

__all__ = [
    "CausalSAE",
    "CausalSAEConfig",
    "CausalSAETrainingRunner",
    "CausalTrainingSAE",
    "CausalTrainingSAEConfig",
    "__version__",
]
