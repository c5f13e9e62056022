"""Pay for the language model once: cache a token set's activations at a hook on disk with
SAELens's ``CacheActivationsRunner``, then train any number of SAEs (architectures, seeds) from
the cache through SAELens's cached-activations path (``train_sae(...,
cached_activations_path=...)``). Only the causal SAE's own terms (KL, verification) still run
the model, on token sequences of the same training set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
from transformer_lens import HookedTransformer

from csae_plugin._compat import cache_runner_uses, no_progress_bars, quiet_library_notices
from csae_plugin.data import as_hf_dataset

STORE_BATCH_PROMPTS = 8
"""Sequences per model forward when caching (and in ``train_sae``'s store)."""
SHARD_BYTES = 512 * 2**20
"""Largest shard the runner holds in memory before writing it."""


def hook_width(model: HookedTransformer, hook_name: str) -> int:
    """Width of the flattened activation at ``hook_name`` (d_model for the residual stream)."""
    if "resid" in hook_name:
        return model.cfg.d_model
    from csae_plugin.causal.tail import activation_shape

    return int(torch.tensor(activation_shape(model, hook_name)).prod())


def cache_activations(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    path: str | Path,
    *,
    device: str = "cpu",
) -> Path:
    """Run ``model`` over every row of ``tokens`` [n, context] once and save its activations
    at ``hook_name`` (with the token ids) as SAELens's cached-activation dataset at ``path``,
    rows in the order of ``tokens`` (SAELens's own shuffle is not written to disk; training
    mixes activations in its buffer as it does from the model). An existing cache at ``path``
    made from the same inputs is reused; one from other inputs is an error, never mixed in."""
    path = Path(path)
    n_seq, context = tokens.shape
    if n_seq % STORE_BATCH_PROMPTS:
        raise ValueError(
            f"{n_seq} sequences to cache: give a multiple of {STORE_BATCH_PROMPTS} "
            "(the runner reads them in batches of that many and would wrap around to fill one)"
        )
    stamp = {
        "model": model.cfg.model_name,
        "hook": hook_name,
        "tokens": [n_seq, context],
        "tokens_sha1": hashlib.sha1(tokens.long().cpu().numpy().tobytes()).hexdigest(),
    }
    stamp_file = path / "csae_cache.json"
    if stamp_file.is_file():
        if json.loads(stamp_file.read_text()) == stamp:
            return path
        raise ValueError(
            f"{path} holds activations cached from other settings; delete it or pick another path"
        )
    if path.exists():
        shutil.rmtree(path)  # a half-written cache from an interrupted run
    # equal shards of whole batches that add up to exactly the token set (SAELens fills its last
    # shard by wrapping around), each at most SHARD_BYTES
    width = hook_width(model, hook_name)
    batches = n_seq // STORE_BATCH_PROMPTS
    batch_bytes = STORE_BATCH_PROMPTS * context * width * 4
    fits = (s for s in range(1, batches + 1) if batches % s == 0)
    shards = next((s for s in fits if batches // s * batch_bytes <= SHARD_BYTES), batches)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="csae-plugin/tokens",
        model_name=model.cfg.model_name,
        model_batch_size=STORE_BATCH_PROMPTS,
        hook_name=hook_name,
        d_in=width,
        training_tokens=n_seq * context,
        context_size=context,
        new_cached_activations_path=str(path),
        shuffle=False,
        device=device,
        streaming=False,
        buffer_size_gb=(batches // shards * batch_bytes + width * 2) / 1e9,
    )
    # the runner loads its model by name from the hub; give it this one instead. Its own
    # "Caching activations" bar stays; datasets' per-shard "Saving the dataset" bars go.
    with quiet_library_notices(), no_progress_bars(), cache_runner_uses(model):
        CacheActivationsRunner(cfg, override_dataset=as_hf_dataset(tokens)).run()
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return path
