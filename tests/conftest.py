"""Shared offline fixtures: a tiny TransformerLens model and token data built in-process."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

import csae_plugin  # noqa: F401  (registers "causal")

D_MODEL = 32
N_CTX = 16
D_VOCAB = 64
BOS = 1


def make_tiny_model(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


def make_tokens(n_seq: int, seed: int = 0, context: int = N_CTX) -> torch.Tensor:
    """Random tokens with a repeated structure (so the model's outputs vary), BOS first."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, D_VOCAB, (n_seq, context), generator=gen)
    tokens[:, 0] = BOS
    return tokens


@pytest.fixture(scope="session")
def tiny_model() -> HookedTransformer:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    return make_tokens(256)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_tokens: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"input_ids": tiny_tokens.tolist()})


def runner_config(sae_cfg, output_path=None, training_tokens: int = 16 * 256, seed: int = 0, **kw):
    """A SAELens runner config for the tiny model, offline (no wandb, no hub)."""
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig

    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="tiny",
        hook_name=kw.pop("hook_name", "blocks.0.hook_resid_post"),
        dataset_path="tiny",
        is_dataset_tokenized=True,
        context_size=N_CTX,
        training_tokens=training_tokens,
        train_batch_size_tokens=64,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None if output_path is None else str(output_path),
        checkpoint_path=None,
        exclude_special_tokens=[BOS],
        seed=seed,
        **kw,
    )
