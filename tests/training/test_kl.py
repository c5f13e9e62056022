"""The causal SAE's KL term (:mod:`csae_plugin.training.kl`) and its fine-tune phase: the lean
(chunked, tail-only) term equals the plain full-logits KL in value and gradient, ``kl_positions``
draws an unbiased subset of rows, the term lowers the held-out KL against the same run without
it (on every step, or in the fine-tune phase only: the last steps), and its bfloat16 form
computes the same value and gradient as float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BOS,
    HOOK,
    causal_cfg,
    make_tiny_model,
    make_tokens,
    runner_config,
    trained_causal_sae,
)
from sae_lens.training.activation_scaler import ActivationScaler

from csae_plugin import CausalSAETrainingRunner, CausalTrainingSAE, CausalTrainingSAEConfig
from csae_plugin.causal import tail
from csae_plugin.causal.tail import parse_hook
from csae_plugin.training import kl as tt
from csae_plugin.training.context import CausalTrainingContext
from csae_plugin.training.kl import spliced_kl

SCALE = 2.5  # an activation scaling factor far from 1, so a missing (un)scale shows


def finetune_cfg(**kw) -> CausalTrainingSAEConfig:
    return causal_cfg(
        **{"k": 2, "kl_every": 1, "kl_batch_size": 8, "kl_finetune_fraction": 0.25, **kw}
    )


# the lean KL term (chunked, tail-only; training.kl.spliced_kl) equals the plain
# full-logits KL(p_clean || p_spliced) in value and in its gradient wrt the SAE
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
    sae = CausalTrainingSAE(causal_cfg(lambda_kl=0.0))
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


def test_kl_positions_scores_a_random_subset_of_rows_an_unbiased_estimate(tiny_model):
    """``kl_positions``: the term is the mean KL over ``positions * n_seq`` rows drawn among
    the scored ones (so between the smallest and largest per-row KL), all rows when that is
    as many as there are, and averages to the full term over draws."""
    sae, _ = trained_causal_sae("topk", steps=5)
    tokens = make_tokens(4, seed=7)
    context = CausalTrainingContext(
        model=tiny_model,
        hook_name=HOOK,
        next_tokens=None,
        special_ids=torch.tensor([BOS]),
    )
    with torch.no_grad():
        full = context.spliced_kl(sae, tokens).item()
        assert context.spliced_kl(sae, tokens, positions=tokens.shape[1]).item() == full
        torch.manual_seed(0)
        draws = torch.tensor(
            [context.spliced_kl(sae, tokens, positions=2).item() for _ in range(300)]
        )
    assert full > 0
    assert draws.std() > 0.05 * full  # a subset really is drawn, differently each time
    assert abs(draws.mean().item() - full) < 0.05 * full, (draws.mean().item(), full)


def test_the_fine_tune_phase_runs_the_kl_term_on_the_last_steps_only(
    tiny_model, tiny_dataset, monkeypatch
):
    steps_with_kl = []
    real = CausalTrainingContext.kl_term

    def counted(self, sae):
        steps_with_kl.append(self.total_steps)
        return real(self, sae)

    monkeypatch.setattr(CausalTrainingContext, "kl_term", counted)
    cfg = runner_config(finetune_cfg(kl_finetune_fraction=0.3), training_tokens=64 * 10)
    runner = CausalSAETrainingRunner(cfg, override_model=tiny_model, override_dataset=tiny_dataset)
    assert runner.sae.causal_context.total_steps == cfg.total_training_steps == 10
    runner.run()
    assert len(steps_with_kl) == 3  # ceil(0.3 * 10)
    context = runner.sae.causal_context
    assert [context.in_kl_phase(s, 0.3) for s in range(10)] == [False] * 7 + [True] * 3
    assert all(context.in_kl_phase(s, 0.0) for s in range(10))


@pytest.mark.parametrize(
    ("phase", "bound"),
    [({}, 0.8), ({"kl_finetune_fraction": 0.25}, 0.9)],
    ids=["every_step", "fine_tune"],
)
def test_the_kl_term_lowers_held_out_kl_against_the_same_run_without_it(
    tiny_model, tiny_dataset, phase, bound
):
    """Seeded: the same run with lambda_kl 0 and 10, the term on every step or in the fine-tune
    phase only; a disconnected term fails this."""
    heldout = make_tokens(64, seed=123)
    context = CausalTrainingContext(tiny_model, HOOK, None, special_ids=torch.tensor([BOS]))
    kls = {}
    for lambda_kl in (0.0, 10.0):
        torch.manual_seed(0)
        sae_cfg = causal_cfg(k=2, lambda_kl=lambda_kl, kl_every=1, kl_batch_size=8, **phase)
        cfg = runner_config(sae_cfg, training_tokens=16 * 512)
        sae = CausalSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        ).run()
        with torch.no_grad():
            kls[lambda_kl] = context.spliced_kl(sae, heldout).item()
    assert kls[10.0] < bound * kls[0.0], kls


def test_bfloat16_kl_gives_the_float32_value_and_gradient(tiny_model):
    torch.manual_seed(0)
    sae = CausalTrainingSAE(finetune_cfg())
    with torch.no_grad():
        sae.W_dec.mul_(0.3)  # a poor reconstruction: a KL well above bfloat16's rounding
    tokens = make_tokens(8, seed=3)
    params = [p for p in sae.parameters() if p.requires_grad]
    values, grads = {}, {}
    for dtype in (None, torch.bfloat16):
        kl = spliced_kl(
            tiny_model, parse_hook(HOOK), sae, tokens, torch.tensor([BOS]), compute_dtype=dtype
        )
        values[dtype] = kl.item()
        grads[dtype] = torch.cat([g.flatten() for g in torch.autograd.grad(kl, params)])
    assert values[None] > 0.01
    assert values[torch.bfloat16] == pytest.approx(values[None], rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(grads[None], grads[torch.bfloat16], dim=0)
    assert cosine > 0.98


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_finetune_fraction": 1.5}, "kl_finetune_fraction=1.5 must be in"),
        ({"kl_dtype": "float8"}, "kl_dtype 'float8' must be"),
    ],
)
def test_fine_tune_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        finetune_cfg(**overrides)


def test_the_fine_tune_phase_needs_the_runs_length():
    context = CausalTrainingContext(None, HOOK, None)
    with pytest.raises(ValueError, match="needs the run's length"):
        context.in_kl_phase(3, 0.5)
