"""Causal verification during training (term 4): the hook-up through the runner, the resample
and reweight actions, the model-units view the NCES engine sees, and that it is off when off."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    BOS,
    D_MODEL,
    HOOK,
    causal_cfg,
    make_tokens,
    runner_config,
    trained_causal_sae,
)
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler

from csae_plugin import CausalSAETrainingRunner, CausalTrainingSAE
from csae_plugin.causal import latent_effects, reference_stats
from csae_plugin.training import verification as vf
from csae_plugin.training.context import CausalTrainingContext

SCALE = 2.5  # an activation scaling factor far from 1, so a missing (un)scale shows


def context_for(
    model, sae: CausalTrainingSAE, optimizer=None, n_verify: int = 16
) -> CausalTrainingContext:
    context = CausalTrainingContext(
        model=model,
        hook_name=HOOK,
        next_tokens=lambda n: make_tokens(n, seed=7),
        special_ids=torch.tensor([BOS]),
        scaler=ActivationScaler(scaling_factor=SCALE),
        verify_tokens=make_tokens(n_verify, seed=99),
        optimizer=optimizer,
    )
    sae.attach(context)
    return context


def run_verifying(sae_cfg, steps: int, model, dataset) -> CausalSAETrainingRunner:
    """The causal runner, ``steps`` steps of 64 tokens, verifying on 16 sequences; after its run."""
    cfg = runner_config(sae_cfg, training_tokens=64 * steps)
    runner = CausalSAETrainingRunner(
        cfg, override_model=model, override_dataset=dataset, verify_tokens=make_tokens(16, seed=3)
    )
    runner.run()
    return runner


# 1. with verify_every set, training through the causal runner verifies and keeps a history
def test_runner_training_runs_verification_and_keeps_its_history(tiny_model, tiny_dataset):
    sae_cfg = causal_cfg(verify_every=4, verify_latents=16, lambda_kl=1.0, kl_every=4)
    runner = run_verifying(sae_cfg, 16, tiny_model, tiny_dataset)  # 16 steps of 64 tokens
    history = runner.sae.causal_context.history
    assert [entry["step"] for entry in history] == [4, 8, 12]
    for entry in history:
        assert 0.0 <= entry["frac_verified"] <= 1.0
        assert 0.0 <= entry["frac_dead"] <= 1.0
        assert entry["n_evaluated"] == 16 and 0 <= entry["n_resampled"] <= 4
    assert runner.sae.causal_context._next_latent == 48  # the subset rotates through d_sae


# 2. the latest verification is in every later step's metrics (what SAELens's logger logs)
def test_latest_verification_reaches_the_step_metrics(tiny_model):
    sae, _ = trained_causal_sae(steps=20, verify_every=2, verify_latents=8)
    context_for(tiny_model, sae)
    x = torch.randn(64, D_MODEL)
    out = sae.training_forward_pass(TrainStepInput(x, {"kl": 0.0}, None, 1, False))
    assert not any(k.startswith("verify_") for k in out.metrics)
    sae.training_forward_pass(TrainStepInput(x, {"kl": 0.0}, None, 2, False))
    out = sae.training_forward_pass(TrainStepInput(x, {"kl": 0.0}, None, 3, False))
    latest = sae.causal_context.history[-1]
    assert latest["step"] == 2
    assert out.metrics["verify_frac_verified"] == latest["frac_verified"]
    assert out.metrics["verify_n_resampled"] == latest["n_resampled"]


# 3. resample re-initialises exactly the dead latents of the subset and zeroes their Adam state
def test_resample_reinitialises_only_the_dead_latents_and_their_adam_state(tiny_model):
    sae, opt = trained_causal_sae(
        steps=20, verify_latents=16
    )  # cap: 16 // 4 = 4 latents per verification
    context = context_for(tiny_model, sae, optimizer=opt)
    with torch.no_grad():
        sae.b_enc[2] = -1e4  # never fires
        view = vf.ModelUnitsSAE(sae, context.scaler, HOOK)
        fires = (view.encode(vf._hook_activations(context)) > 0).any(0)
    dead_mask = torch.zeros(64, dtype=torch.bool)
    dead_mask[10] = True  # dead by the trainer's mask
    chosen = torch.nonzero((~fires | dead_mask)[:16]).squeeze(1)
    assert 2 in chosen and 10 in chosen and len(chosen) <= 4
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state_before = {
        n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()
    }

    result = vf.verify_and_act(context, sae, dead_mask)

    others = torch.ones(64, dtype=torch.bool)
    others[chosen] = False
    n = len(chosen)
    assert result["n_resampled"] == n and result["frac_dead"] == pytest.approx(n / 16)
    params = dict(sae.named_parameters())
    assert not torch.isclose(params["W_dec"][chosen], before["W_dec"][chosen]).all(dim=1).any()
    assert torch.equal(params["W_dec"][others], before["W_dec"][others])
    assert torch.equal(params["W_enc"][:, others], before["W_enc"][:, others])
    assert torch.equal(params["b_enc"][others], before["b_enc"][others])
    assert torch.equal(params["b_dec"], before["b_dec"])
    assert torch.all(params["b_enc"][chosen] == 0)
    # encoder column along the decoder row, at a fifth of the others' mean norm
    cos = torch.cosine_similarity(params["W_enc"][:, chosen].T, params["W_dec"][chosen], dim=1)
    torch.testing.assert_close(cos, torch.ones(n))
    enc_norm = before["W_enc"][:, others].norm(dim=0).mean()
    torch.testing.assert_close(params["W_enc"][:, chosen].norm(dim=0), (0.2 * enc_norm).expand(n))
    for name, p in sae.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            new, old = opt.state[p][key], state_before[name][key]
            if name == "W_enc":
                assert torch.all(new[:, chosen] == 0) and torch.equal(
                    new[:, others], old[:, others]
                )
            elif name in ("W_dec", "b_enc"):
                assert torch.all(new[chosen] == 0) and torch.equal(new[others], old[others])
            else:
                assert torch.equal(new, old)


# 4. reweight raises the L1 weight of inert latents that fire, relaxes verified ones, and
#    scales the L1 term (its config validation for non-relu SAEs is in saes/test_causal.py)
def test_reweight_raises_l1_weights_of_inert_latents_only():
    sae = CausalTrainingSAE(causal_cfg("relu", verify_action="reweight", lambda_kl=0.0))
    with torch.no_grad():
        sae.l1_weights[[0, 4]] = torch.tensor([3.0, 6.0])
    details = pd.DataFrame(
        {
            "latent": [0, 1, 2, 3, 4],
            "nces": [2.0, 0.5, np.nan, 1.5, 0.9],
            "verified": [True, False, False, False, False],
            "dead": [False, False, True, False, False],
        }
    )
    assert vf.reweight_latents(sae, details) == 2
    expected = torch.ones(64)
    expected[[0, 1, 4]] = torch.tensor([2.0, 2.0, vf.MAX_L1_WEIGHT])
    torch.testing.assert_close(sae.l1_weights, expected)

    x = torch.randn(32, D_MODEL) * 3
    step = TrainStepInput(x, {"l1": 1.0, "kl": 0.0}, None, 1, False)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    weighted = sae.calculate_aux_loss(step, feature_acts, hidden_pre, sae.decode(feature_acts))
    # SAELens's standard L1 (decoder-norm weighted), each latent's term scaled by its weight
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(
        weighted["l1_loss"], (feature_acts * expected * norms).sum(-1).mean()
    )


def test_reweight_through_the_runner_changes_l1_weights(tiny_model, tiny_dataset):
    sae_cfg = causal_cfg(
        "relu",
        verify_every=4,
        verify_latents=32,
        verify_action="reweight",
        l1_coefficient=1e-3,
        lambda_kl=0.0,
    )
    runner = run_verifying(sae_cfg, 10, tiny_model, tiny_dataset)
    history = runner.sae.causal_context.history
    assert len(history) == 2 and sum(h["n_reweighted"] for h in history) > 0
    assert runner.sae.l1_weights.max() > 1.0 and runner.sae.l1_weights.min() >= 1.0


# 5. the engine sees model units: on the wrapped training SAE it gives the same effects as on
#    the saved inference SAE with the activation scaling folded in
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_model_units_view_matches_the_folded_inference_sae(tiny_model, tmp_path, activation):
    sae, _ = trained_causal_sae(activation, steps=20)
    sae.eval()
    view = vf.ModelUnitsSAE(sae, ActivationScaler(scaling_factor=SCALE), HOOK)
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(SCALE)
    folded.save_inference_model(tmp_path)
    inference = SAE.load_from_disk(tmp_path)
    inference.cfg.metadata.hook_name = HOOK
    tokens = make_tokens(16, seed=11)

    def effects(s):
        stats = reference_stats(tiny_model, s, tokens, bos_token_id=BOS)
        return latent_effects(
            tiny_model,
            s,
            tokens,
            range(0, 64, 4),
            stats,
            null_draws=2,
            seqs_per_latent=3,
            bos_token_id=BOS,
            progress=False,
        )

    with torch.no_grad():
        ours, theirs = effects(view), effects(inference)
        unscaled = effects(vf.ModelUnitsSAE(sae, ActivationScaler(), HOOK))
    assert (ours.n_sequences > 0).sum() >= 8
    np.testing.assert_array_equal(ours.sequences, theirs.sequences)
    np.testing.assert_allclose(ours.effect, theirs.effect, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(ours.null_per_draw, theirs.null_per_draw, rtol=1e-4, atol=1e-8)
    assert not np.allclose(np.nan_to_num(unscaled.effect), np.nan_to_num(ours.effect), rtol=1e-2)


# 6. with the terms off the causal runner never verifies: training equals SAELens's own runner
def test_terms_off_means_no_verification_and_plain_saelens_training(
    tiny_model, tiny_dataset, monkeypatch
):
    def fail(*args, **kwargs):
        raise AssertionError("verification ran with verify_every=0")

    monkeypatch.setattr(vf, "verify_and_act", fail)
    sae_cfg = causal_cfg(verify_every=0, lambda_kl=0.0)
    torch.manual_seed(0)  # SAELens's runner draws from the global generator
    ours = CausalSAETrainingRunner(
        runner_config(sae_cfg, training_tokens=64 * 8),
        override_model=tiny_model,
        override_dataset=tiny_dataset,
        verify_tokens=make_tokens(16, seed=3),
    )
    ours_sae = ours.run()
    torch.manual_seed(0)
    plain = LanguageModelSAETrainingRunner(
        runner_config(copy.deepcopy(sae_cfg), training_tokens=64 * 8),
        override_model=tiny_model,
        override_dataset=tiny_dataset,
    ).run()
    assert ours.sae.causal_context.history == []
    for name, param in plain.named_parameters():
        assert torch.equal(dict(ours_sae.named_parameters())[name], param), name
