"""Train a causal SAE or a TopK baseline on a real model with a GPU and a model hub.

Two configurations, as a user with a GPU would run them:

    python examples/train_gpu.py gpt2-small --architecture causal
    python examples/train_gpu.py gpt2-small --architecture topk
    python examples/train_gpu.py gemma-2-2b --architecture causal   # ~24 GB GPU memory

then score both with

    sae_bench run --eval core,nces --model gpt2 --dataset Skylion007/openwebtext \
        --sae output/gpt2-small-causal output/gpt2-small-topk --device cuda

Everything but the model, hook, width and token budget is the same for both architectures,
so the two SAEs are comparable. ``--training-tokens`` scales the budget down for a quick try.

The causal SAE's KL term runs as a fine-tune over the last 5% of training, each KL step on
16,384 tokens (every position of ``16384 // context_size`` whole sequences), the scale at which
output-aware SAEs are known to gain (end-to-end SAEs, Braun et al. 2024; KL fine-tuning,
Karvonen 2025): per-step gradients from a few sequences are mostly noise (evals/REPORT.md).
The GPU memory this takes at Gemma-2-2B's context of 1024 has not been measured: lower
``KL_TOKENS`` if it does not fit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.config import LoggingConfig

import csae_plugin
from csae_plugin.training import TrainSpec, sae_training_config


@dataclass(frozen=True)
class Setup:
    model_name: str
    hook_name: str
    d_in: int
    d_sae: int
    k: int
    dataset_path: str
    context_size: int
    training_tokens: int
    lr: float


SETUPS = {
    "gpt2-small": Setup(
        model_name="gpt2",
        hook_name="blocks.8.hook_resid_pre",
        d_in=768,
        d_sae=16 * 768,
        k=32,
        dataset_path="Skylion007/openwebtext",
        context_size=128,
        training_tokens=50_000_000,
        lr=3e-4,
    ),
    "gemma-2-2b": Setup(
        model_name="gemma-2-2b",
        hook_name="blocks.19.hook_resid_post",
        d_in=2304,
        d_sae=16_384,
        k=64,
        dataset_path="monology/pile-uncopyrighted",
        context_size=1024,
        training_tokens=200_000_000,
        lr=2e-4,
    ),
}


KL_TOKENS = 16_384
"""Tokens per KL step of the causal SAE's fine-tune phase."""


def causal_overrides(setup: Setup) -> dict[str, object]:
    """The causal SAE's KL fine-tune at :data:`KL_TOKENS` per step, and verification."""
    return {
        "lambda_kl": 4.0,
        "kl_every": 1,
        "kl_batch_size": max(1, KL_TOKENS // setup.context_size),
        "kl_positions": 0,
        "kl_finetune_fraction": 0.05,
        "kl_dtype": "bfloat16",
        "verify_every": 2000,
    }


def runner_config(
    name: str, architecture: str, training_tokens: int | None, device: str
) -> LanguageModelSAERunnerConfig:
    """The SAELens runner config of setup ``name`` for ``architecture``."""
    setup = SETUPS[name]
    overrides = causal_overrides(setup) if architecture == "causal" else {}
    spec = TrainSpec(architecture, setup.d_sae, setup.k, overrides)
    return LanguageModelSAERunnerConfig(
        sae=sae_training_config(spec, setup.d_in, setup.hook_name),
        model_name=setup.model_name,
        hook_name=setup.hook_name,
        dataset_path=setup.dataset_path,
        is_dataset_tokenized=False,
        streaming=True,
        context_size=setup.context_size,
        training_tokens=training_tokens or setup.training_tokens,
        train_batch_size_tokens=4096,
        lr=setup.lr,
        lr_warm_up_steps=1000,
        device=device,
        exclude_special_tokens=True,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=f"output/{name}-{architecture}",
        checkpoint_path=f"checkpoints/{name}-{architecture}",
        dtype="float32",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setup", choices=sorted(SETUPS))
    parser.add_argument("--architecture", default="causal", choices=["causal", "topk"])
    parser.add_argument("--training-tokens", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cfg = runner_config(args.setup, args.architecture, args.training_tokens, args.device)
    sae = csae_plugin.CausalSAETrainingRunner(cfg).run()
    print(f"trained {sae.cfg.architecture()} SAE, saved to {cfg.output_path}")


if __name__ == "__main__":
    main()
