"""Input checks shared by the runner, the evals and the CLI: one clear line per problem.

They live with the hook plan in :mod:`csae_plugin.causal.tail`, the one place that reads hook
names; this module keeps the names the runner and the training helpers import.
"""

from __future__ import annotations

from csae_plugin.causal.tail import activation_shape, check_model_matches_sae

__all__ = ["activation_shape", "check_model_matches_sae"]
