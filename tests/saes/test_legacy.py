"""0.1.0 "causal" folders (``csae_plugin/saes/legacy.py``; ``tests/fixtures/causal_sae_0.1.0``)
load as the plain SAELens SAE they are equivalent to, with 0.1.0's outputs; without the plugin,
loading one says to import it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ACTIVATIONS, SAVED_AS, TESTS
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors.torch import load_file

from csae_plugin.saes.loading import SAELoadError, load_sae_from_folder

FIXTURE = TESTS / "fixtures" / "causal_sae_0.1.0"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_0_1_0_causal_folder_loads_as_the_plain_sae_with_the_same_outputs(activation):
    assert json.loads((FIXTURE / activation / "cfg.json").read_text())["architecture"] == "causal"
    sae = SAE.load_from_disk(FIXTURE / activation)
    assert type(sae) is SAVED_AS[activation]
    assert sae.cfg.metadata.training_architecture == "causal"
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        acts = sae.encode(expected["x"])
        recons = sae.decode(acts)
    norms = load_file(FIXTURE / activation / "sae_weights.safetensors")["W_dec"].norm(dim=-1)
    # 0.1.0 measured latents in units of a unit-norm decoder row, as the folded SAE does
    torch.testing.assert_close(acts, expected[f"{activation}_acts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recons, expected[f"{activation}_recons"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones_like(norms))


def test_loading_a_0_1_0_folder_without_the_plugin_says_to_import_it(monkeypatch):
    monkeypatch.delitem(SAE_CLASS_REGISTRY, "causal")
    with pytest.raises(KeyError):  # what plain SAELens says
        SAE.load_from_disk(FIXTURE / "topk")
    with pytest.raises(SAELoadError, match="import csae_plugin"):
        load_sae_from_folder(FIXTURE / "topk")
