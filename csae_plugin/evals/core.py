"""SAEBench's ``core`` eval on a model and tokens handed in, written in SAEBench's format.

SAEBench's ``multiple_evals`` loads the model and dataset from the hub by name. This runs the
same steps on an already built ``HookedTransformer`` and token rows (the held-out split):
SAEBench's ``run_evals`` on a SAELens ``ActivationsStore`` over the tokens, its misc metrics, its
NaN -> -1 cleaning and its ``save_single_eval_result``, so every key SAEBench writes holds
SAEBench's own number, written atomically (``tests/evals/test_core.py`` checks them against
SAEBench's ``multiple_evals`` on the same SAE and tokens).

One key is added: SAEBench 0.6.0's ``explained_variance`` measures total variance about a wrong
centre (it squares ``E[x_d^2]`` where ``E[x_d]`` belongs, the bug SAELens fixed upstream in PR
#665); on residual streams with a large mean, such as Gemma's, it comes out above 1.
:func:`run_core` adds the conventional ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over
the same tokens and positions (:func:`explained_variance`) as ``reconstruction_quality.``
:data:`CENTERED_KEY`, and says so in ``eval_result_unstructured`` (:data:`ADDED_NOTE`).
The plugin's tables show that key; ``explained_variance`` stays SAEBench's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import (
    calculate_misc_metrics,
    replace_nans_with_negative_one,
    run_evals,
    save_single_eval_result,
)
from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_lens_version
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer

from csae_plugin._compat import quiet_library_notices
from csae_plugin.causal.tail import activations_at
from csae_plugin.data import as_hf_dataset
from csae_plugin.evals import atomic_path, pending_result, sae_bench_version, validate_inputs

EVAL_TYPE_ID_CORE = "core"

DEFAULT_BATCH_SIZE_PROMPTS = 16
"""Sequences per batch (SAEBench's default ``batch_size_prompts``)."""

CENTERED_KEY = "explained_variance_centered"
"""The key, in ``reconstruction_quality``, of the conventional explained variance."""

ADDED_NOTE = {
    f"reconstruction_quality.{CENTERED_KEY}": "added by csae-plugin: 1 - sum||x - x_hat||^2 "
    "/ sum||x - mean(x)||^2 over the same tokens and positions as explained_variance. "
    "SAEBench 0.6.0's explained_variance centres the total variance wrongly (E[x_d^2] squared "
    "where E[x_d] belongs; fixed in SAELens PR #665) and exceeds 1 on activations with a large "
    "mean. Every other key is SAEBench's own."
}
"""What ``run_core`` adds to SAEBench's file, and why (its ``eval_result_unstructured``)."""


def core_config(
    model_name: str,
    dataset: str,
    context_size: int,
    n_sequences: int,
    batch_size_prompts: int = DEFAULT_BATCH_SIZE_PROMPTS,
) -> CoreEvalConfig:
    """Core with every metric on (as SAEBench's ``run_evaluations``), over ``n_sequences``.

    Both metric passes read ``n_sequences // batch`` whole batches; BOS/EOS/PAD positions are
    excluded from reconstruction (SAEBench's ``--exclude_special_tokens_from_reconstruction``),
    as they are from NCES.
    """
    batch = max(1, min(batch_size_prompts, n_sequences))
    n_batches = max(1, n_sequences // batch)
    return CoreEvalConfig(
        model_name=model_name,
        batch_size_prompts=batch,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        dataset=dataset,
        context_size=context_size,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
    )


def special_token_ids(model: HookedTransformer, bos_token_id: int | None = None) -> set[int]:
    """Token ids core ignores: the tokenizer's PAD, EOS and BOS (as SAEBench), or ``bos_token_id``."""
    ids = {bos_token_id}
    tokenizer = model.tokenizer
    if tokenizer is not None:
        ids |= {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    return {int(i) for i in ids if i is not None}


def run_core(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    *,
    release: str,
    sae_id: str,
    output_path: str | Path,
    config: CoreEvalConfig | None = None,
    dataset: str = "",
    force_rerun: bool = False,
    bos_token_id: int | None = None,
    progress: bool = True,
    eval_id: str | None = None,
) -> dict[str, Any] | None:
    """Run core on ``tokens`` [n_seq, context] and write ``<output_path>/<release>_<sae_id>_...``.

    Returns the written result (``CoreEvalOutput`` as a dict), or ``None`` if the file exists
    and ``force_rerun`` is off. ``config`` defaults to :func:`core_config` over all tokens.
    The SAE's config gets SAEBench's v5-style fields (``load_and_format_sae``), and its
    ``model_name`` from the model when it has none.
    """
    path = pending_result(output_path, release, sae_id, force_rerun)
    if path is None:
        return None
    validate_inputs(model, sae, tokens)
    if sae.cfg.metadata.model_name is None:
        sae.cfg.metadata.model_name = model.cfg.model_name
    if config is None:
        config = core_config(model.cfg.model_name, dataset, tokens.shape[1], tokens.shape[0])
    _, sae, _ = load_and_format_sae(release, sae, str(model.cfg.device))
    sae = sae.to(device=model.cfg.device, dtype=model.cfg.dtype)

    with quiet_library_notices():  # SAELens's activations store copies with torch.tensor
        scalar_metrics, feature_metrics = run_evals(
            sae=sae,
            activation_store=_activation_store(model, sae, tokens, config),
            model=model,
            eval_config=config,
            ignore_tokens=special_token_ids(model, bos_token_id),
            verbose=progress,
        )
    eval_metrics: dict[str, Any] = {
        "unique_id": f"{release}_{sae_id}",
        "sae_set": release,
        "sae_id": sae_id,
        "eval_cfg": config,
        "metrics": scalar_metrics,
    }
    centered = None
    if config.compute_variance_metrics:
        centered = explained_variance(
            model,
            sae,
            tokens[: config.n_eval_sparsity_variance_batches * config.batch_size_prompts],
            special_token_ids(model, bos_token_id),
            config.batch_size_prompts,
        )
    if config.compute_featurewise_density_statistics or (
        config.compute_featurewise_weight_based_metrics
    ):
        eval_metrics["metrics"]["misc_metrics"] = calculate_misc_metrics(feature_metrics)
        eval_metrics["feature_metrics"] = feature_metrics
    with atomic_path(path) as tmp:
        save_single_eval_result(
            replace_nans_with_negative_one(eval_metrics),
            eval_id or get_eval_uuid(),
            get_sae_lens_version(),
            sae_bench_version(),
            str(tmp),
            sae,
        )
        if centered is not None:
            _add_centered(tmp, centered)
    return json.loads(path.read_text())


def _add_centered(path: Path, value: float) -> None:
    """Put :data:`CENTERED_KEY` (NaN -> -1, as SAEBench) and :data:`ADDED_NOTE` into the file
    SAEBench wrote at ``path``."""
    result = json.loads(path.read_text())
    quality = result["eval_result_metrics"].setdefault("reconstruction_quality", {})
    quality[CENTERED_KEY] = replace_nans_with_negative_one(value)
    result["eval_result_unstructured"] = (result.get("eval_result_unstructured") or {}) | {
        "added_by_csae_plugin": ADDED_NOTE
    }
    path.write_text(json.dumps(result, indent=2))


@torch.no_grad()
def explained_variance(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    ignore_tokens: set[int],
    batch_size: int = DEFAULT_BATCH_SIZE_PROMPTS,
) -> float:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` at the SAE's hook over ``tokens``.

    Positions holding an ``ignore_tokens`` id are left out (as core does); sums in float64.
    """
    hook = sae.cfg.metadata.hook_name
    ignore = torch.tensor(sorted(ignore_tokens), dtype=torch.long)
    n, total, total_sq, resid_sq = 0, 0.0, 0.0, 0.0
    for rows in tokens.split(batch_size):
        keep = ~torch.isin(rows, ignore.to(rows.device))
        x = activations_at(model, hook, rows).flatten(2)[keep.to(model.cfg.device)].to(sae.dtype)
        x_hat = sae.decode(sae.encode(x))
        x, x_hat = x.double(), x_hat.double()
        n += x.shape[0]
        total = total + x.sum(0)
        total_sq += float(x.pow(2).sum())
        resid_sq += float((x - x_hat).pow(2).sum())
    if n == 0:
        raise ValueError("no positions left for explained variance; pass non-special tokens")
    variance = total_sq - float((total**2).sum()) / n
    return 1.0 - resid_sq / variance


def _activation_store(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, config: CoreEvalConfig
) -> ActivationsStore:
    """A SAELens store that yields ``tokens``' rows in order (pre-tokenised, no shuffling)."""
    return ActivationsStore(
        model=model,
        dataset=as_hf_dataset(tokens.cpu()),
        streaming=False,
        hook_name=sae.cfg.metadata.hook_name,
        hook_head_index=sae.cfg.metadata.hook_head_index,
        context_size=tokens.shape[1],
        d_in=sae.cfg.d_in,
        n_batches_in_buffer=1,
        total_training_tokens=tokens.shape[0],
        store_batch_size_prompts=config.batch_size_prompts,
        train_batch_size_tokens=config.batch_size_prompts * tokens.shape[1],
        prepend_bos=False,
        normalize_activations=sae.cfg.normalize_activations,
        device=torch.device(model.cfg.device),
        dtype=sae.cfg.dtype,
    )
