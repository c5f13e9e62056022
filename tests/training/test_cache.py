"""Training from cached activations (``csae_plugin/training/cache.py``): the cache holds the
model's activations of the token set, SAEs train from it without running the model (but for
the causal SAE's KL term), and a cache of what a run reads is read once."""

from __future__ import annotations

import warnings

import datasets
import pytest
import torch
from conftest import BOS, EXACT_KL, HOOK, make_tiny_model, make_tokens

from csae_plugin.training import TrainSpec, cache_activations, train_sae
from csae_plugin.training.cache import STORE_BATCH_PROMPTS
from csae_plugin.training.train import activations_read


def test_activations_cached_once_train_every_architecture_and_the_causal_kl(tmp_path):
    """``cache_activations`` stores exactly the model's activations of the token set (each
    row with its token ids), is reused for the same inputs and refuses others;
    SAEs train from it without running the model, except the causal SAE's KL term (every KL
    step, only the fine-tune phase's steps, or once for its second-order form)."""
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
        "causal": ("causal", {**EXACT_KL, "kl_every": 4}, 4),
        "causal_fisher": (
            "causal",
            {**EXACT_KL, "kl_every": 1, "kl_estimator": "fisher", "fisher_sequences": 4},
            1,
        ),
        # the KL fine-tune phase: every step of the last quarter of the 16
        "causal_finetune": ("causal", {**EXACT_KL, "kl_every": 1, "kl_finetune_fraction": 0.25}, 4),
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
