"""The token rows the evals run on, loaded one way for ``core``, ``nces`` and the API.

Evaluation rows are the first ``n_eval_sequences`` of the corpus's held-out split
(``data.corpus_splits(...).eval``), reference rows (NCES's null covariance and intervention
values) the first ``n_reference_sequences`` of its training split; both splits are already
shuffled. Rows handed in are used as they are: only the missing ones are loaded.
"""

from __future__ import annotations

import contextlib

import torch
from transformer_lens import HookedTransformer

from csae_plugin._compat import no_progress_bars
from csae_plugin.data import corpus_splits
from csae_plugin.evals import EvalInputError
from csae_plugin.evals.nces.eval_config import EMBEDDED_DATASET, NCESEvalConfig


def load_tokens(
    model: HookedTransformer, config: NCESEvalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation, reference) token rows for ``config`` from the model's tokenizer."""
    if model.tokenizer is None:
        raise EvalInputError(
            f"model {model.cfg.model_name} has no tokenizer; pass eval_tokens and "
            "reference_tokens as token tensors"
        )
    dataset = None if config.dataset == EMBEDDED_DATASET else config.dataset
    splits = corpus_splits(model.tokenizer, config.context_size, dataset=dataset)
    return splits.eval[: config.n_eval_sequences], splits.train[: config.n_reference_sequences]


def eval_and_reference_tokens(
    model: HookedTransformer,
    config: NCESEvalConfig,
    eval_tokens: torch.Tensor | None = None,
    reference_tokens: torch.Tensor | None = None,
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eval_tokens`` and ``reference_tokens``, each loaded by :func:`load_tokens` when
    ``None`` (nothing is loaded when both are given; no progress bars unless ``progress``).

    Loading rows longer than the model's context is refused with a one-line error first.
    """
    if eval_tokens is not None and reference_tokens is not None:
        return eval_tokens, reference_tokens
    if config.context_size > model.cfg.n_ctx and eval_tokens is None:
        raise EvalInputError(
            f"context_size {config.context_size} is longer than model "
            f"{config.model_name}'s n_ctx={model.cfg.n_ctx} positions; pass "
            f"--context-size {model.cfg.n_ctx} or less"
        )
    with contextlib.nullcontext() if progress else no_progress_bars():
        loaded_eval, loaded_reference = load_tokens(model, config)
    return (
        loaded_eval if eval_tokens is None else eval_tokens,
        loaded_reference if reference_tokens is None else reference_tokens,
    )
