"""The 0.1.0 module names, kept importable: each is now another name for the module that took
over its job (with a DeprecationWarning that says where to import from)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "csae_plugin.causal_sae": "csae_plugin.saes",
    "csae_plugin.registration": "csae_plugin.saes",
    "csae_plugin.loading": "csae_plugin.saes.loading",
    "csae_plugin.runner": "csae_plugin.training.runner",
    "csae_plugin.training_terms": "csae_plugin.training.context",
    "csae_plugin.verification": "csae_plugin.training.verification",
    "csae_plugin.checks": "csae_plugin.causal.tail",
    "csae_plugin.interventions": "csae_plugin.causal",
    "csae_plugin.nces": "csae_plugin.causal.nces",
    "csae_plugin.probing": "csae_plugin.evals.probing",
}
"""0.1.0 module -> the 0.2.0 module that holds its public names."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in csae-plugin 0.2.0; import from {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._spec = module.__spec__  # importlib sets the alias's spec on it: put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
