"""Causal verification during training (term 4): the hook-up through the runner, the resample
and reweight actions, the model-units view the NCES engine sees, and that it is off when off;
and the lean (chunked, tail-only) KL term (3) against the plain full-logits one."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, D_MODEL, make_tiny_model, make_tokens, runner_config
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler

from csae_plugin import CausalSAETrainingRunner, CausalTrainingSAE, CausalTrainingSAEConfig
from csae_plugin.causal import latent_effects, reference_stats, tail
from csae_plugin.training import kl as tt
from csae_plugin.training import verification as vf
from csae_plugin.training.context import CausalTrainingContext

HOOK = "blocks.0.hook_resid_post"
SCALE = 2.5  # an activation scaling factor far from 1, so a missing (un)scale shows


def causal_cfg(activation: str = "topk", **kw) -> CausalTrainingSAEConfig:
    kw.setdefault("k", 4)
    kw.setdefault("lambda_kl", 0.0)
    return CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, activation=activation, **kw)


def trained_sae(
    activation: str = "topk", steps: int = 20, **kw
) -> tuple[CausalTrainingSAE, torch.optim.Adam]:
    """A causal SAE briefly trained on random activations, and its Adam (with state)."""
    torch.manual_seed(0)
    sae = CausalTrainingSAE(causal_cfg(activation, **kw))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        x = torch.randn(128, D_MODEL) * 3 + 1
        out = sae.training_forward_pass(
            TrainStepInput(x, {"l1": 1e-3, "kl": 0.0}, None, step, False)
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return sae, opt


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


# 1. with verify_every set, training through the causal runner verifies and keeps a history
def test_runner_training_runs_verification_and_keeps_its_history(tiny_model, tiny_dataset):
    sae_cfg = causal_cfg(verify_every=4, verify_latents=16, lambda_kl=1.0, kl_every=4)
    cfg = runner_config(sae_cfg, training_tokens=64 * 16)  # 16 steps of 64 tokens
    runner = CausalSAETrainingRunner(
        cfg,
        override_model=tiny_model,
        override_dataset=tiny_dataset,
        verify_tokens=make_tokens(16, seed=3),
    )
    runner.run()
    history = runner.sae.causal_context.history
    assert [entry["step"] for entry in history] == [4, 8, 12]
    for entry in history:
        assert 0.0 <= entry["frac_verified"] <= 1.0
        assert 0.0 <= entry["frac_dead"] <= 1.0
        assert entry["n_evaluated"] == 16 and 0 <= entry["n_resampled"] <= 4
    assert runner.sae.causal_context._next_latent == 48  # the subset rotates through d_sae


# 2. the latest verification is in every later step's metrics (what SAELens's logger logs)
def test_latest_verification_reaches_the_step_metrics(tiny_model):
    sae, _ = trained_sae(verify_every=2, verify_latents=8)
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
    sae, opt = trained_sae(verify_latents=16)  # cap: 16 // 4 = 4 latents per verification
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
#    scales the L1 term (its config validation for non-relu SAEs is in test_saes.py)
def test_reweight_raises_l1_weights_of_inert_latents_only():
    sae = CausalTrainingSAE(causal_cfg("relu", verify_action="reweight"))
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
        "relu", verify_every=4, verify_latents=32, verify_action="reweight", l1_coefficient=1e-3
    )
    cfg = runner_config(sae_cfg, training_tokens=64 * 10)
    runner = CausalSAETrainingRunner(
        cfg,
        override_model=tiny_model,
        override_dataset=tiny_dataset,
        verify_tokens=make_tokens(16, seed=3),
    )
    runner.run()
    history = runner.sae.causal_context.history
    assert len(history) == 2 and sum(h["n_reweighted"] for h in history) > 0
    assert runner.sae.l1_weights.max() > 1.0 and runner.sae.l1_weights.min() >= 1.0


# 5. the engine sees model units: on the wrapped training SAE it gives the same effects as on
#    the saved inference SAE with the activation scaling folded in
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_model_units_view_matches_the_folded_inference_sae(tiny_model, tmp_path, activation):
    sae, _ = trained_sae(activation)
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


# 7. the lean KL term (chunked, tail-only; training.kl.spliced_kl) equals the plain
#    full-logits KL(p_clean || p_spliced) in value and in its gradient wrt the SAE
def kl_clean_vs_spliced(
    clean_logits: torch.Tensor, spliced_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over scored positions of KL(p_clean || p_spliced), in nats, from full logits."""
    clean_logp = F.log_softmax(clean_logits.float(), dim=-1)
    spliced_logp = F.log_softmax(spliced_logits.float(), dim=-1)
    kl = F.kl_div(spliced_logp, clean_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _plain_spliced_kl(context: CausalTrainingContext, sae, tokens: torch.Tensor) -> torch.Tensor:
    mask = tail.special_token_mask(tokens, context.special_ids)
    with torch.no_grad():
        clean, cache = context.model.run_with_cache(tokens, names_filter=[context.hook_name])
    x = cache[context.hook_name]
    recon = context.scaler.unscale(sae.decode(sae.encode(context.scaler.scale(x))))
    spliced = torch.where(mask.unsqueeze(-1), recon, x)
    logits = context.model.run_with_hooks(
        tokens, fwd_hooks=[(context.hook_name, lambda act, hook: spliced)]
    )
    return kl_clean_vs_spliced(clean, logits, mask)


@pytest.mark.parametrize(
    ("hook", "softcap"),
    [(HOOK, None), ("blocks.1.hook_resid_pre", 5.0), ("blocks.0.hook_mlp_out", None)],
)
def test_lean_kl_equals_the_plain_full_logits_kl(monkeypatch, hook, softcap):
    model = make_tiny_model()
    model.cfg.output_logits_soft_cap = softcap
    monkeypatch.setattr(tt, "KL_CHUNK_BYTES", 4 * 64 * 7)  # 7-row chunks: several, one partial
    torch.manual_seed(0)
    sae = CausalTrainingSAE(causal_cfg())
    context = CausalTrainingContext(
        model=model,
        hook_name=hook,
        next_tokens=None,
        special_ids=torch.tensor([BOS]),
        scaler=ActivationScaler(scaling_factor=SCALE),
    )
    tokens = make_tokens(6, seed=4)
    grads = []
    values = []
    for kl_fn in (context.spliced_kl, lambda s, t: _plain_spliced_kl(context, s, t)):
        kl = kl_fn(sae, tokens)
        kl.backward()
        values.append(kl.detach())
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        sae.zero_grad()
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-7)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-7)
