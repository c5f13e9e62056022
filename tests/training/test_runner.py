"""The causal runner (``csae_plugin/training/runner.py``): it attaches the language model to the
SAE (never as a submodule) for the KL term, and refuses a hook the model lacks or an SAE whose
``d_in`` is not the model's activation size."""

from __future__ import annotations

import pytest
from conftest import causal_cfg, runner_config

from csae_plugin import CausalSAETrainingRunner, CausalTrainingSAEConfig
from csae_plugin.training.context import CausalTrainingContext


def test_causal_runner_attaches_the_model_and_computes_kl(tiny_model, tiny_dataset):
    cfg = runner_config(causal_cfg(kl_every=1), training_tokens=16 * 32)
    runner = CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)
    context = runner.sae.causal_context
    assert isinstance(context, CausalTrainingContext) and context.model is tiny_model
    # the model is not a submodule: never saved, never optimised
    assert not any(name.startswith("model") for name, _ in runner.sae.named_parameters())
    assert all(not k.startswith("model") for k in runner.sae.state_dict())
    runner.run()
    assert all(p.grad is None for p in tiny_model.parameters())


def test_wrong_hook_name_gives_a_clear_error(tiny_model, tiny_dataset):
    cfg = runner_config(causal_cfg(), hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="hook 'blocks.7.hook_resid_post' is not in the model"):
        CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)


def test_d_in_mismatch_gives_a_clear_error(tiny_model, tiny_dataset):
    cfg = runner_config(CausalTrainingSAEConfig(d_in=48, d_sae=64, k=4))
    with pytest.raises(ValueError, match="d_in=48 does not match the model's activation size 32"):
        CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)
