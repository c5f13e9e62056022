"""The "causal" architecture: registration, training through SAELens's runner, save/load,
the conformance behaviours SAELens checks for its own architectures, and input errors."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from conftest import BOS, D_MODEL, make_tokens, runner_config
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAETrainingRunner,
    TopKTrainingSAEConfig,
)
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

import csae_plugin
from csae_plugin import (
    CausalSAE,
    CausalSAEConfig,
    CausalSAETrainingRunner,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
)
from csae_plugin.loading import SAELoadError, load_sae_from_folder
from csae_plugin.training_terms import CausalTrainingContext

ACTIVATIONS = ["relu", "topk", "batchtopk"]


def causal_cfg(activation: str = "topk", **kw) -> CausalTrainingSAEConfig:
    kw.setdefault("k", 4)
    return CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, activation=activation, **kw)


def trained(activation: str, steps: int = 30, seed: int = 0) -> CausalTrainingSAE:
    """A causal SAE briefly trained on random activations, so its weights are not at init."""
    torch.manual_seed(seed)
    sae = CausalTrainingSAE(causal_cfg(activation, lambda_kl=0.0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    from sae_lens.saes.sae import TrainStepInput

    for step in range(steps):
        x = torch.randn(128, D_MODEL) * 3 + 1
        out = sae.training_forward_pass(
            TrainStepInput(x, {"l1": 1e-3, "kl": 0.0}, None, step, False)
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return sae


# 1. registration
def test_importing_registers_causal_for_inference_and_training():
    assert SAE_CLASS_REGISTRY["causal"] == (CausalSAE, CausalSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["causal"] == (CausalTrainingSAE, CausalTrainingSAEConfig)


def test_registration_is_idempotent_on_reimport_and_reload():
    importlib.import_module("csae_plugin")
    csae_plugin.registration.register()
    reloaded = importlib.reload(csae_plugin.registration)
    reloaded.register()
    assert "causal" in SAE_CLASS_REGISTRY and "causal" in SAE_TRAINING_CLASS_REGISTRY


# 2. training through SAELens's standard runner
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_plain_saelens_runner_trains_and_saves_a_causal_sae(
    tiny_model, tiny_dataset, tmp_path, activation, caplog
):
    cfg = runner_config(
        causal_cfg(activation, kl_every=2), tmp_path / "out", training_tokens=16 * 64
    )
    with caplog.at_level(logging.WARNING):
        sae = LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        ).run()
    assert sae.cfg.architecture() == "causal"
    warnings = [r for r in caplog.records if "no language model attached" in r.getMessage()]
    assert len(warnings) == 1  # says once that the KL term is off
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert isinstance(loaded, CausalSAE)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(20, D_MODEL) * 3
    if activation == "batchtopk":  # saved as a JumpReLU at the learned threshold
        torch.testing.assert_close(loaded.threshold, sae.topk_threshold.expand(64))
    else:
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


def test_plain_runner_trains_a_topk_baseline(tiny_model, tiny_dataset, tmp_path):
    cfg = runner_config(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4), tmp_path / "topk")
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=tiny_dataset
    ).run()
    assert SAE.load_from_disk(tmp_path / "topk").cfg.architecture() == "topk"
    assert sae.cfg.d_sae == 64


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


# 3. the KL term lowers KL(clean || spliced): a measured comparison with fixed seeds
def _heldout_kl(sae: CausalTrainingSAE, model, tokens: torch.Tensor) -> float:
    context = CausalTrainingContext(
        model=model,
        hook_name="blocks.0.hook_resid_post",
        next_tokens=None,
        special_ids=torch.tensor([BOS]),
    )
    with torch.no_grad():
        return context.spliced_kl(sae, tokens).item()


def test_kl_term_lowers_downstream_kl_against_the_same_run_without_it(tiny_model, tiny_dataset):
    heldout = make_tokens(64, seed=123)
    kls = {}
    for lambda_kl in (0.0, 10.0):
        torch.manual_seed(0)
        cfg = runner_config(
            causal_cfg("topk", k=2, lambda_kl=lambda_kl, kl_every=1, kl_batch_size=8),
            training_tokens=16 * 512,
        )
        runner = CausalSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        )
        kls[lambda_kl] = _heldout_kl(runner.run(), tiny_model, heldout)
    assert kls[10.0] < 0.8 * kls[0.0], kls


# 4. save/load round trip
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, activation):
    sae = trained(activation)
    sae.eval()
    sae.save_inference_model(tmp_path / "inference")
    sae.save_model(tmp_path / "training")
    x = torch.randn(256, D_MODEL) * 3 + 1
    inference = SAE.load_from_disk(tmp_path / "inference")
    training = CausalTrainingSAE.load_from_disk(tmp_path / "training")
    if activation != "batchtopk":  # batchtopk is a JumpReLU at inference, by design
        torch.testing.assert_close(inference.encode(x), sae.encode(x))
    torch.testing.assert_close(training.encode(x), sae.encode(x))
    torch.testing.assert_close(training.W_dec, sae.W_dec)
    torch.testing.assert_close(inference.W_dec, sae.W_dec)


# 5. conformance with SAELens's own architecture tests
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_activation_norm_scaling_factor_preserves_outputs(activation):
    sae = trained(activation)
    sae.eval()
    scale = 3.7
    x = torch.randn(64, D_MODEL) * 2
    expected = sae.decode(sae.encode(x * scale)) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fold_W_dec_norm_preserves_outputs_and_normalises_decoder(activation):
    sae = trained(activation)
    sae.eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, 1) + 0.5)
    x = torch.randn(64, D_MODEL) * 2
    feats, recons = sae.encode(x), sae.decode(sae.encode(x))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae))
    torch.testing.assert_close(sae.encode(x), feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recons, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_error_term_forward_equals_clean_forward(tiny_model, tmp_path, activation):
    trained(activation).save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    model = HookedSAETransformer(tiny_model.cfg)
    model.load_state_dict(tiny_model.state_dict())
    tokens = make_tokens(4, seed=5)
    clean = model(tokens)
    model.add_sae(sae, use_error_term=True)
    torch.testing.assert_close(model(tokens), clean, rtol=1e-4, atol=1e-5)
    model.reset_saes()
    model.add_sae(sae, use_error_term=False)
    assert not torch.allclose(model(tokens), clean, atol=1e-3)  # the splice is really there


# 6. input errors: one clear line each
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"activation": "gelu"}, "is not one of relu, topk, batchtopk"),
        ({"k": 0}, "0 < k <= d_sae"),
        ({"k": 65}, "0 < k <= d_sae"),
        ({"kl_every": 0}, "kl_every=0 must be >= 1"),
        ({"verify_action": "reweight"}, "needs activation='relu'"),
    ],
)
def test_bad_config_gives_a_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as err:
        causal_cfg(**kwargs)
    assert "\n" not in str(err.value)


def test_wrong_hook_name_gives_a_clear_error(tiny_model, tiny_dataset):
    cfg = runner_config(causal_cfg(), hook_name="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="hook 'blocks.7.hook_resid_post' is not in the model"):
        CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)


def test_d_in_mismatch_gives_a_clear_error(tiny_model, tiny_dataset):
    cfg = runner_config(CausalTrainingSAEConfig(d_in=48, d_sae=64, k=4))
    with pytest.raises(ValueError, match="d_in=48 does not match the model's activation size 32"):
        CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)


def test_loading_without_the_plugin_says_to_import_it(tmp_path, monkeypatch):
    trained("topk").save_inference_model(tmp_path)
    monkeypatch.delitem(SAE_CLASS_REGISTRY, "causal")
    with pytest.raises(KeyError):  # what plain SAELens says
        SAE.load_from_disk(tmp_path)
    with pytest.raises(SAELoadError, match="import csae_plugin"):
        load_sae_from_folder(tmp_path)


def test_corrupt_or_missing_sae_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(SAELoadError, match="does not exist"):
        load_sae_from_folder(tmp_path / "nope")
    trained("topk").save_inference_model(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match="is corrupt"):
        load_sae_from_folder(tmp_path)
