"""The training helper behind the demo and the sweep (``csae_plugin.training.train_sae``)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BOS, HOOK, make_tiny_model, make_tokens
from sae_lens import SAE

from csae_plugin.training import ARCHITECTURES, TrainSpec, sae_training_config, train_sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_saves_and_loads(tmp_path, architecture):
    model, tokens = make_tiny_model(), make_tokens(64, seed=5)
    spec = TrainSpec(architecture, d_sae=64, k=4)
    sae, runner = train_sae(
        model,
        HOOK,
        tokens,
        spec,
        training_tokens=64 * 40,
        output_path=tmp_path,
        batch_size_tokens=64,
        exclude_special_tokens=[BOS],
        norm_estimate_batches=2,
    )
    # SAELens saves a BatchTopK SAE as the equivalent JumpReLU SAE (per-latent threshold)
    # and a causal SAE (topk activation by default) as the equivalent TopK SAE
    expected = {"batchtopk": "jumprelu", "causal": "topk"}.get(architecture, architecture)
    assert sae.cfg.architecture() == expected
    assert runner.cfg.total_training_steps == 40
    loaded = SAE.load_from_disk(tmp_path)
    x = torch.randn(8, sae.cfg.d_in)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    # b_dec starts at the mean activation, so even 40 steps reconstruct better than zero
    _, cache = model.run_with_cache(tokens[:8], names_filter=[HOOK])
    acts = cache[HOOK][:, 1:].reshape(-1, sae.cfg.d_in)
    error = (sae.decode(sae.encode(acts)) - acts).pow(2).sum()
    assert error < acts.pow(2).sum()


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown architecture 'gated-ish'; choose one of"):
        sae_training_config(TrainSpec("gated-ish", 64), 32, HOOK)


def test_train_sae_output_has_no_library_notices(tmp_path, caplog, recwarn):
    """The SAELens warnings and log lines a user of train_sae cannot act on are silenced (and
    nothing else): torch.tensor copies, model_from_pretrained_kwargs advice, override notes."""
    from csae_plugin._compat import LIBRARY_NOTICES

    model, tokens = make_tiny_model(), make_tokens(64, seed=5)
    with caplog.at_level(logging.INFO, logger="sae_lens"):
        train_sae(
            model,
            HOOK,
            tokens,
            TrainSpec("causal", d_sae=64, k=4),
            training_tokens=64 * 8,
            output_path=tmp_path,
            batch_size_tokens=64,
            exclude_special_tokens=[BOS],
            norm_estimate_batches=2,
        )
    said = [str(w.message).strip() for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if s.startswith(LIBRARY_NOTICES)], said
