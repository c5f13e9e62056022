"""The causal SAE's KL term (:mod:`csae_plugin.training.kl`) and its fine-tune phase: the phase
runs the term on the last steps only, lowers the held-out KL against the same run without it,
and its bfloat16 form computes the same value and gradient as float32."""

from __future__ import annotations

import pytest
import torch
from conftest import BOS, D_MODEL, make_tokens, runner_config

from csae_plugin import CausalSAETrainingRunner, CausalTrainingSAE, CausalTrainingSAEConfig
from csae_plugin.causal.tail import parse_hook
from csae_plugin.training.context import CausalTrainingContext
from csae_plugin.training.kl import spliced_kl

HOOK = "blocks.0.hook_resid_post"


def finetune_cfg(**kw) -> CausalTrainingSAEConfig:
    kw = {"k": 2, "kl_every": 1, "kl_batch_size": 8, "kl_finetune_fraction": 0.25, **kw}
    return CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, **kw)


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


def test_kl_fine_tune_lowers_held_out_kl_against_the_same_run_without_it(tiny_model, tiny_dataset):
    """Seeded: the same run with lambda_kl 0 and 10; a disconnected term fails this."""
    heldout = make_tokens(64, seed=123)
    context = CausalTrainingContext(tiny_model, HOOK, None, special_ids=torch.tensor([BOS]))
    kls = {}
    for lambda_kl in (0.0, 10.0):
        torch.manual_seed(0)
        cfg = runner_config(finetune_cfg(lambda_kl=lambda_kl), training_tokens=16 * 512)
        sae = CausalSAETrainingRunner(
            cfg, override_model=tiny_model, override_dataset=tiny_dataset
        ).run()
        with torch.no_grad():
            kls[lambda_kl] = context.spliced_kl(sae, heldout).item()
    assert kls[10.0] < 0.9 * kls[0.0], kls


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
