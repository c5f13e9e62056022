"""The training helper behind the demo and the sweep (``csae_plugin.training.train_sae``)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BOS, make_tiny_model, make_tokens
from sae_lens import SAE

from csae_plugin.training import ARCHITECTURES, TrainSpec, sae_training_config, train_sae

HOOK = "blocks.0.hook_resid_post"


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


def test_activations_cached_once_train_every_architecture_and_the_causal_kl(tmp_path):
    """``cache_activations`` stores exactly the model's activations of the token set (each
    row with its token ids), is reused for the same inputs and refuses others;
    SAEs train from it without running the model, except the causal SAE's KL term (every KL
    step, only the fine-tune phase's steps, or once for its second-order form)."""
    import datasets

    from csae_plugin.training import cache_activations

    model, tokens = make_tiny_model(), make_tokens(32, seed=5)
    path = cache_activations(model, HOOK, tokens, tmp_path / "cache")
    cached = datasets.load_from_disk(str(path)).with_format("torch")
    with torch.no_grad():
        _, acts = model.run_with_cache(tokens, names_filter=[HOOK])
    assert len(cached) == tokens.shape[0]  # no row wrapped around to fill a shard
    torch.testing.assert_close(cached["token_ids"].long(), tokens)
    torch.testing.assert_close(cached[HOOK], acts[HOOK])
    assert cache_activations(model, HOOK, tokens, path) == path  # reused
    with pytest.raises(ValueError, match="other settings"):
        cache_activations(model, HOOK, tokens[:16], path)

    forwards = []
    # positions the model runs on (the runner's own 2-token shape check aside)
    model.blocks[0].register_forward_hook(lambda _, args, out: forwards.append(out.shape[1]))
    # (architecture, overrides, passes of the model up to the hook): none for TopK; the causal
    # SAE's 4 KL steps; with the second-order KL, the one batch its Fisher metric is estimated on
    cases = {
        "topk": ("topk", {}, 0),
        "causal": ("causal", {"kl_every": 4}, 4),
        "causal_fisher": (
            "causal",
            {"kl_every": 1, "kl_estimator": "fisher", "fisher_sequences": 4},
            1,
        ),
        # the KL fine-tune phase: every step of the last quarter of the 16
        "causal_finetune": ("causal", {"kl_every": 1, "kl_finetune_fraction": 0.25}, 4),
    }
    for name, (architecture, overrides, expected) in cases.items():
        forwards.clear()
        sae, runner = train_sae(
            model,
            HOOK,
            tokens,
            TrainSpec(architecture, 64, 4, overrides),
            training_tokens=64 * 16,
            output_path=tmp_path / name,
            batch_size_tokens=64,
            exclude_special_tokens=[BOS],
            norm_estimate_batches=2,
            cached_activations_path=path,
        )
        assert runner.cfg.use_cached_activations and runner.cfg.total_training_steps == 16
        assert sum(n > 2 for n in forwards) == expected, (name, forwards)
    with pytest.raises(ValueError, match="multiple of 8"):
        cache_activations(model, HOOK, tokens[:12], tmp_path / "odd")


def test_a_cache_of_what_a_run_reads_is_read_once(tmp_path):
    """``activations_read`` bounds what a run reads (scale estimate, b_dec's start, training,
    the mixing buffer's read-ahead): from a cache that large SAELens starts no second epoch,
    so no activation is used twice; a cache of only the training tokens is read again."""
    import warnings

    from csae_plugin.training import cache_activations
    from csae_plugin.training.cache import STORE_BATCH_PROMPTS
    from csae_plugin.training.train import activations_read

    model = make_tiny_model()
    context = make_tokens(1).shape[1]
    training_tokens, batch = 64 * 8, 64
    needed = activations_read(training_tokens, context, batch, norm_estimate_batches=2)
    per_block = (context - 1) * STORE_BATCH_PROMPTS  # BOS excluded
    epochs = {}
    for name, tokens_cached in (("enough", needed), ("training only", training_tokens)):
        rows = -(-tokens_cached // per_block) * STORE_BATCH_PROMPTS
        tokens = make_tokens(rows, seed=5)
        path = cache_activations(model, HOOK, tokens, tmp_path / name / "cache")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_sae(
                model,
                HOOK,
                tokens,
                TrainSpec("topk", 64, 4),
                training_tokens=training_tokens,
                output_path=tmp_path / name / "sae",
                batch_size_tokens=batch,
                exclude_special_tokens=[BOS],
                norm_estimate_batches=2,
                cached_activations_path=path,
            )
        epochs[name] = any("beginning new epoch" in str(w.message) for w in caught)
    assert epochs == {"enough": False, "training only": True}
