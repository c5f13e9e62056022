"""Train any SAE architecture on a model and a fixed token set through SAELens's runner.

The demo, the benchmarks and the comparison sweep all train the causal SAE and its baselines
the same way: same model, hook, tokens, width, budget and learning rate, through
:class:`~csae_plugin.training.runner.CausalSAETrainingRunner` (which behaves exactly like SAELens's
runner for the baselines). This module only builds the configs; the training is SAELens's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from sae_lens.config import LoggingConfig
from sae_lens.saes.sae import TrainingSAEConfig
from transformer_lens import HookedTransformer

from csae_plugin._compat import quiet_library_notices, sparse_progress_bar
from csae_plugin.data import as_hf_dataset
from csae_plugin.saes.causal import CausalTrainingSAEConfig
from csae_plugin.training.cache import STORE_BATCH_PROMPTS, hook_width
from csae_plugin.training.runner import CausalSAETrainingRunner

ARCHITECTURES = ("causal", "standard", "topk", "batchtopk", "jumprelu")
"""What :func:`sae_training_config` builds: the causal SAE and SAELens's baselines."""


@dataclass
class TrainSpec:
    """One SAE to train: its architecture, width and sparsity, plus config overrides.

    ``k`` is the target L0: TopK/BatchTopK/causal use it directly, JumpReLU through its
    quadratic L0 loss (``target_l0``); the standard (ReLU + L1) SAE ignores it and uses
    ``l1_coefficient`` from ``overrides``.
    """

    architecture: str
    d_sae: int
    k: int = 32
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.architecture}_{self.d_sae}_k{self.k}"


def sae_training_config(spec: TrainSpec, d_in: int, hook_name: str) -> TrainingSAEConfig:
    """The SAELens training config of ``spec`` (unknown architecture: one-line ValueError)."""
    kw = dict(spec.overrides)
    # residual norms differ by orders of magnitude across models: train on scaled activations
    # (SAELens folds the scale into the saved weights)
    kw.setdefault("normalize_activations", "expected_average_only_in")
    common: dict[str, Any] = {"d_in": d_in, "d_sae": spec.d_sae}
    if spec.architecture == "causal":
        return CausalTrainingSAEConfig(**common, k=spec.k, **kw)
    if spec.architecture == "topk":
        return TopKTrainingSAEConfig(**common, k=spec.k, **kw)
    if spec.architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, k=spec.k, **kw)
    if spec.architecture == "jumprelu":
        kw.setdefault("jumprelu_sparsity_loss_mode", "quadratic")
        kw.setdefault("l0_coefficient", 0.1)
        return JumpReLUTrainingSAEConfig(**common, target_l0=float(spec.k), **kw)
    if spec.architecture == "standard":
        kw.setdefault("l1_coefficient", 5.0)
        return StandardTrainingSAEConfig(**common, **kw)
    raise ValueError(
        f"unknown architecture {spec.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
    )


BATCH_SIZE_TOKENS = 1024
"""Training batch size in tokens (:func:`train_sae`'s default)."""
NORM_ESTIMATE_BATCHES = 16
"""Training batches the activation scale is estimated on (:func:`train_sae`'s default)."""
MEAN_INIT_BATCHES = 4
"""Training batches whose mean starts every SAE's ``b_dec`` (:class:`_MeanInitRunner`)."""


def buffer_batches(batch_size_tokens: int, context_size: int) -> int:
    """SAELens's ``n_batches_in_buffer`` here: its mixing buffer holds this many sequences'
    activations (``n_batches_in_buffer * context_size``), at least 8 training batches."""
    return max(16, -(-8 * batch_size_tokens // context_size))


def activations_read(
    training_tokens: int,
    context_size: int,
    batch_size_tokens: int = BATCH_SIZE_TOKENS,
    norm_estimate_batches: int = NORM_ESTIMATE_BATCHES,
) -> int:
    """At most how many activations :func:`train_sae` reads for a run.

    The scale estimate and the mean that starts ``b_dec`` take their own batches before
    training, and SAELens's mixing buffer reads up to its size ahead. An activation cache
    smaller than this makes SAELens start a second epoch, so some activations are used twice.
    """
    before = (norm_estimate_batches + MEAN_INIT_BATCHES) * batch_size_tokens
    ahead = buffer_batches(batch_size_tokens, context_size) * context_size + batch_size_tokens
    return before + training_tokens + ahead


class _MeanInitRunner(CausalSAETrainingRunner):
    """The runner, with every SAE's ``b_dec`` started at the mean training activation.

    Residual streams carry a large constant component, many times the per-token spread
    (measured in ``docs/benchmarks.md``), which short training budgets cannot learn from a zero
    ``b_dec``; every architecture gets the same start, so comparisons stay fair.
    """

    def run_trainer_with_interruption_handling(self, trainer: Any):
        scaler = trainer.activation_scaler
        if self.sae.cfg.normalize_activations == "expected_average_only_in":
            scaler.estimate_scaling_factor(
                d_in=self.sae.cfg.d_in,
                data_provider=trainer.data_provider,
                n_batches_for_norm_estimate=self.cfg.n_batches_for_norm_estimate,
            )
        batch = torch.cat([next(trainer.data_provider) for _ in range(MEAN_INIT_BATCHES)])
        with torch.no_grad():
            self.sae.b_dec.copy_(scaler.scale(batch).mean(0).to(self.sae.b_dec))
        sparse_progress_bar(trainer, self.cfg.total_training_steps)
        return super().run_trainer_with_interruption_handling(trainer)


def train_sae(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    spec: TrainSpec,
    *,
    training_tokens: int,
    output_path: str | Path,
    batch_size_tokens: int = BATCH_SIZE_TOKENS,
    lr: float = 1e-3,
    seed: int = 0,
    exclude_special_tokens: list[int] | None = None,
    verify_tokens: torch.Tensor | None = None,
    device: str = "cpu",
    norm_estimate_batches: int = NORM_ESTIMATE_BATCHES,
    cached_activations_path: str | Path | None = None,
) -> tuple[SAE, CausalSAETrainingRunner]:
    """Train ``spec`` on activations of ``tokens`` [n, context] at ``hook_name``.

    The SAE is saved by SAELens under ``output_path`` and returned as the inference SAE loaded
    back from there (so what is evaluated is exactly what a user would load), together with
    the runner (whose causal context, if any, holds the verification history). The activation
    scale is estimated on ``norm_estimate_batches`` training batches (SAELens's default 1,000
    would cost more than the whole training on a CPU). The default learning rate, above
    SAELens's 3e-4, suits short budgets (measured in ``docs/benchmarks.md``).

    With ``cached_activations_path`` (:func:`csae_plugin.training.cache.cache_activations`
    of the same ``tokens``), the activations are read from that cache through SAELens's
    cached-activations path instead of running the model; a causal SAE's KL and verification
    terms still draw their sequences from ``tokens``.
    """
    d_in = hook_width(model, hook_name)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_training_config(spec, d_in, hook_name),
        model_name=model.cfg.model_name,
        hook_name=hook_name,
        dataset_path="csae-plugin/tokens",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=tokens.shape[1],
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        store_batch_size_prompts=STORE_BATCH_PROMPTS,
        use_cached_activations=cached_activations_path is not None,
        cached_activations_path=None
        if cached_activations_path is None
        else str(cached_activations_path),
        n_batches_in_buffer=buffer_batches(batch_size_tokens, tokens.shape[1]),
        lr=lr,
        n_batches_for_norm_estimate=norm_estimate_batches,
        device=device,
        act_store_device=device,
        seed=seed,
        exclude_special_tokens=exclude_special_tokens or False,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(output_path),
        checkpoint_path=None,
        n_checkpoints=0,
        verbose=False,
    )
    torch.manual_seed(seed)  # SAELens's runner seeds its data shuffles, not the SAE's init
    with quiet_library_notices():
        runner = _MeanInitRunner(
            cfg,
            override_model=model,
            override_dataset=as_hf_dataset(tokens),
            verify_tokens=verify_tokens,
        )
        runner.run()
        return SAE.load_from_disk(output_path, device=device), runner
