"""The "causal" training architecture: SAELens's TopK, BatchTopK or standard SAE plus two terms
that need the language model (the README, "The causal SAE's loss"):

3. downstream faithfulness, ``lambda_kl * KL(p_clean || p_spliced)``: by default its
   second-order form on every training token (``kl_estimator="fisher"``); the exact KL every
   ``kl_every`` steps or as a fine-tune phase at the end of training on request;
4. causal verification every ``verify_every`` steps (NCES on held-out sequences), after which
   dead or causally inert latents are resampled (or, with ``relu``, pay a higher L1 weight).

Everything else is SAELens's own: encoder, decoder, initialisation and the auxiliary
(dead-latent) loss come from ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` /
``StandardTrainingSAE`` with their default coefficients, so a causal SAE with ``lambda_kl=0``
and ``verify_every=0`` trains to exactly the baseline's weights.

As SAELens does for BatchTopK, "causal" is a training architecture. Checkpoints (``save_model``,
which SAELens's trainer calls) keep the training form, architecture "causal" with every
parameter and buffer as they are (``topk_threshold``, ``l1_weights``), so a resumed run
continues exactly. The final SAE (the runner's output, ``save_inference_model``) is the plain
SAELens SAE it is equivalent to, with decoder norms folded into the encoder: ``topk`` -> "topk",
``batchtopk`` -> "jumprelu" at the learned threshold, ``relu`` -> "standard". The causal
settings (``lambda_kl``, ``kl_every``, verification) and the plugin's version stay in the saved
config's metadata (``training_architecture="causal"``, ``training_architecture_details``), so
any SAELens-based tool loads the final SAE without importing ``csae_plugin``; with the plugin
imported, a checkpoint folder loads (``SAE.load_from_disk``) as that same plain SAE.

The model is attached by :class:`csae_plugin.training.runner.CausalSAETrainingRunner`; with the
plain SAELens runner the SAE trains as its baseline and says once that terms 3-4 are off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardSAEConfig, StandardTrainingSAE
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

ARCHITECTURE = "causal"
ACTIVATIONS = ("relu", "topk", "batchtopk")
Activation = Literal["relu", "topk", "batchtopk"]
DEFAULT_LAMBDA_KL = {"fisher": 1000.0, "exact": 1.0}
"""``lambda_kl`` when the config leaves it unset, per ``kl_estimator``. ``fisher``: the weight
that met the CE-loss goal of ``evals/REPORT.md`` with the least reconstruction paid (chosen on
validation sequences of Gemma 3 270M, layer 6; the weight trades nats of output KL against the
SAE's MSE in its normalised training units, so another model or hook may want another).
``exact``: 1, as the exact term's earlier studies ran it."""

INFERENCE_CONFIGS: dict[str, type[SAEConfig]] = {
    "topk": TopKSAEConfig,
    "batchtopk": JumpReLUSAEConfig,
    "relu": StandardSAEConfig,
}
"""The plain SAELens inference architecture each activation is saved as."""

logger = logging.getLogger(__name__)


def plugin_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("csae-plugin")
    except PackageNotFoundError:
        return "unknown"


def validate_activation(activation: str, k: float, d_sae: int) -> None:
    """One-line ValueError for an unknown activation or a ``k`` it cannot use."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"causal SAE activation {activation!r} is not one of {', '.join(ACTIVATIONS)}; "
            "set activation='relu', 'topk' or 'batchtopk'"
        )
    if activation == "relu":
        return
    if not 0 < k <= d_sae:
        raise ValueError(
            f"causal SAE k={k} must satisfy 0 < k <= d_sae={d_sae}; pick a k in that range"
        )
    if activation == "topk" and float(k) != int(k):
        raise ValueError(
            f"causal SAE k={k} must be a whole number for activation='topk' "
            "(use activation='batchtopk' for an average k)"
        )


@dataclass
class CausalTrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of a causal SAE; each loss term can be switched off (for ablations).

    The fields of SAELens's TopK / BatchTopK / standard training configs keep their meaning and
    defaults (``aux_loss_coefficient``, ``rescale_acts_by_decoder_norm``, ``topk_threshold_lr``,
    ``l1_coefficient``, ``lp_norm``, ``l1_warm_up_steps``).

    The KL defaults (second-order form, weight 1000, every step) are, of the settings
    ``evals/REPORT.md`` measured, the one that cut TopK's CE-loss gap the most at 1.2x TopK's
    cost (it pays in explained variance, as output-aware SAEs do); the exact fine-tune phase
    (``kl_estimator="exact"``, ``kl_finetune_fraction``, ``kl_every=1``, ``kl_batch_size`` x
    context >= 4,096 tokens) is
    the term at the scale output-aware SAEs use, worth its cost where the model is cheap to run
    (a GPU; ``examples/train_gpu.py``).

    Args:
        activation: ``topk`` (k per token), ``batchtopk`` (k on average; saved as JumpReLU at
            the learned threshold) or ``relu`` (+ L1; saved as a standard SAE).
        k: active latents per token (``topk``) or on average (``batchtopk``); unused by relu.
        lambda_kl: weight of KL(p_clean || p_spliced) (term 3); 0 switches it off. Unset:
            :data:`DEFAULT_LAMBDA_KL` for ``kl_estimator`` (1000 with ``fisher``, 1 with
            ``exact``).
        kl_every: compute the KL term every this many steps (>= 1). Each exact KL step costs a
            pass through the model after the hook, and its gradient, estimated on a few
            sequences, is mostly noise that Adam turns into a random walk of the weights
            (``evals/REPORT.md``, "Why the KL term raised the held-out KL").
        kl_batch_size: token sequences per KL step.
        kl_positions: positions per KL sequence whose output distributions are compared,
            drawn at random among the scored ones each KL step (0: all). The reconstruction is
            still spliced in at every position; only the unembedding, which dominates a KL
            step's cost for large vocabularies, is restricted, so the term stays an unbiased
            estimate of the mean KL over positions (``evals/study/study.py`` measures what it
            costs).
        kl_estimator: ``fisher`` (default: its second-order form, 1/2 delta^T F delta per
            training token with the hook's Fisher metric F estimated once before training,
            :mod:`csae_plugin.training.fisher`: no model run per step, deterministic, but it
            drops interactions between positions) or ``exact`` (the spliced model's KL on
            ``kl_batch_size`` sequences every ``kl_every`` steps).
        kl_finetune_fraction: 0 runs the KL term every ``kl_every`` steps of the whole run; a
            fraction in (0, 1] runs it only over that last part of training, a KL + MSE
            fine-tune phase (Karvonen 2025, arXiv 2503.17272). Paired with many sequences per
            KL step, each step's gradient is signal rather than noise (``evals/REPORT.md``).
        kl_dtype: ``float32``, or ``bfloat16``: the KL step's pass through the model after the
            hook and its unembedding run in bfloat16 (log-softmax and KL in float32), faster on
            CPUs and GPUs with bfloat16 matrix units (``python -m evals.study.study --finetune``
            times both).
        fisher_sequences: token sequences F is estimated on (``kl_estimator="fisher"``).
        fisher_samples: sampled-label backward passes per sequence for F.
        verify_every: run causal verification every this many steps (term 4); 0 switches it off.
        verify_latents: latents checked per verification (a rotating subset).
        verify_seqs_per_latent: sequences per latent in a verification.
        verify_null_draws: null draws (default null) per sequence in a verification.
        verify_action: what happens to dead / inert latents: ``resample`` (re-initialise them)
            or ``reweight`` (``relu`` only: their L1 weight doubles, verified ones relax to 1).
    """

    activation: Activation = "topk"
    k: float = 32  # type: ignore[assignment]
    topk_threshold_lr: float = 0.01
    l1_coefficient: float = 1.0
    lp_norm: float = 1.0
    l1_warm_up_steps: int = 0
    lambda_kl: float | None = None  # type: ignore[assignment]
    kl_every: int = 1
    kl_batch_size: int = 4
    kl_positions: int = 0
    kl_estimator: Literal["exact", "fisher"] = "fisher"
    kl_finetune_fraction: float = 0.0
    kl_dtype: Literal["float32", "bfloat16"] = "float32"
    fisher_sequences: int = 32
    fisher_samples: int = 2
    verify_every: int = 0
    verify_latents: int = 64
    verify_seqs_per_latent: int = 4
    verify_null_draws: int = 2
    verify_action: Literal["resample", "reweight"] = "resample"

    def __post_init__(self) -> None:
        validate_activation(self.activation, self.k, self.d_sae)
        if self.activation == "topk":
            self.k = int(self.k)
        if self.kl_every < 1:
            raise ValueError(
                f"kl_every={self.kl_every} must be >= 1 (set lambda_kl=0 to turn KL off)"
            )
        if self.kl_batch_size < 1:
            raise ValueError(f"kl_batch_size={self.kl_batch_size} must be >= 1")
        if self.kl_positions < 0:
            raise ValueError(f"kl_positions={self.kl_positions} must be >= 0 (0: all positions)")
        if self.kl_estimator not in DEFAULT_LAMBDA_KL:
            raise ValueError(
                f"kl_estimator {self.kl_estimator!r} must be 'exact' or 'fisher' (second order)"
            )
        if self.lambda_kl is None:
            self.lambda_kl = DEFAULT_LAMBDA_KL[self.kl_estimator]
        if self.lambda_kl < 0:
            raise ValueError(f"lambda_kl={self.lambda_kl} must be >= 0")
        if not 0 <= self.kl_finetune_fraction <= 1:
            raise ValueError(
                f"kl_finetune_fraction={self.kl_finetune_fraction} must be in [0, 1] "
                "(0: the KL term over the whole run)"
            )
        if self.kl_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"kl_dtype {self.kl_dtype!r} must be 'float32' or 'bfloat16'")
        if self.fisher_sequences < 1 or self.fisher_samples < 1:
            raise ValueError(
                f"fisher_sequences={self.fisher_sequences} and fisher_samples="
                f"{self.fisher_samples} must be >= 1"
            )
        if self.verify_every < 0:
            raise ValueError(f"verify_every={self.verify_every} must be >= 0 (0 turns it off)")
        if self.verify_action not in ("resample", "reweight"):
            raise ValueError(
                f"verify_action {self.verify_action!r} must be 'resample' or 'reweight'"
            )
        if self.verify_action == "reweight" and self.activation != "relu":
            raise ValueError("verify_action='reweight' needs activation='relu' (it scales L1)")
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return INFERENCE_CONFIGS[self.activation]

    @override
    def _metadata_with_training_info(self) -> dict[str, Any]:
        metadata = super()._metadata_with_training_info()
        metadata["csae_plugin_version"] = plugin_version()
        return metadata


class CausalTerms(Protocol):
    """What the training SAE calls for terms 3-4; the runner attaches an implementation
    (:class:`csae_plugin.training.context.CausalTrainingContext`) holding the model."""

    history: list[dict[str, Any]]

    def in_kl_phase(self, step: int, finetune_fraction: float) -> bool: ...

    def kl_term(self, sae: CausalTrainingSAE) -> torch.Tensor: ...

    def fisher_term(
        self, sae: CausalTrainingSAE, sae_in: torch.Tensor, sae_out: torch.Tensor
    ) -> torch.Tensor: ...

    def verify(
        self, sae: CausalTrainingSAE, dead_neuron_mask: torch.Tensor | None, step: int | None
    ) -> dict[str, float]: ...


class CausalTrainingSAE(TrainingSAE[CausalTrainingSAEConfig]):
    """Training causal SAE: its SAELens baseline plus the KL and verification terms when a
    language model is attached (:meth:`attach`).

    ``CausalTrainingSAE(cfg)`` builds the variant for ``cfg.activation``:
    :class:`CausalTopKTrainingSAE`, :class:`CausalBatchTopKTrainingSAE` or
    :class:`CausalStandardTrainingSAE`, each this class mixed into the upstream class.
    """

    def __new__(cls, cfg: CausalTrainingSAEConfig | None = None, use_error_term: bool = False):
        # copy.deepcopy and pickle call __new__ with no arguments, on the variant class
        variant = VARIANTS[cfg.activation] if cls is CausalTrainingSAE and cfg else cls
        return super(CausalTrainingSAE, variant).__new__(variant)

    def __init__(self, cfg: CausalTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._context: CausalTerms | None = None
        self._warned_no_model = False

    def attach(self, context: CausalTerms | None) -> None:
        """Give the SAE what terms 3-4 need (model, tokens); kept off the module tree, so it
        is never saved with the SAE nor optimised."""
        self._context = context

    @property
    def causal_context(self) -> CausalTerms | None:
        return self._context

    def encode_as_saved(self, x: torch.Tensor) -> torch.Tensor:
        """Latents as the saved inference SAE computes them (BatchTopK: at its threshold)."""
        return self.encode(x)

    @override
    def get_coefficients(self) -> dict[str, Any]:
        return {**super().get_coefficients(), "kl": self.cfg.lambda_kl}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._maybe_verify(step_input)
        output = super().training_forward_pass(step_input)
        if self._context is not None and self._context.history:
            # the latest verification rides on every step, so SAELens's logger (which logs
            # every wandb_log_frequency steps) always sees it
            latest = self._context.history[-1]
            output.metrics.update({f"verify_{k}": v for k, v in latest.items() if k != "step"})
        return output

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        losses = dict(super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out))
        kl = self._maybe_kl(step_input, sae_out)
        if kl is not None:
            losses["kl_loss"] = kl
        return losses

    def _maybe_kl(self, step_input: TrainStepInput, sae_out: torch.Tensor) -> torch.Tensor | None:
        step = step_input.n_training_steps
        if self.cfg.lambda_kl == 0 or step % self.cfg.kl_every != 0:
            return None
        if self._context is None:
            self._warn_no_model()
            return None
        if not self._context.in_kl_phase(step, self.cfg.kl_finetune_fraction):
            return None
        if self.cfg.kl_estimator == "fisher":
            term = self._context.fisher_term(self, step_input.sae_in, sae_out)
        else:
            term = self._context.kl_term(self)
        return step_input.coefficients["kl"] * term

    def _maybe_verify(self, step_input: TrainStepInput) -> dict[str, float] | None:
        every = self.cfg.verify_every
        if every == 0 or step_input.n_training_steps == 0 or step_input.n_training_steps % every:
            return None
        if self._context is None:
            self._warn_no_model()
            return None
        return self._context.verify(
            self, dead_neuron_mask=step_input.dead_neuron_mask, step=step_input.n_training_steps
        )

    def _warn_no_model(self) -> None:
        if not self._warned_no_model:
            logger.warning(
                "causal SAE: no language model attached, so the KL and causal-verification terms "
                "are off; train with csae_plugin.CausalSAETrainingRunner to turn them on"
            )
            self._warned_no_model = True

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Also reload an inference-form causal SAE into training (0.2.0 wrote its checkpoints
        in that form): buffers it lacks keep their initial values."""
        super().process_state_dict_for_loading(state_dict)
        for name, buffer in self.named_buffers():
            state_dict.setdefault(name, buffer.clone())


class CausalTopKTrainingSAE(CausalTrainingSAE, TopKTrainingSAE):
    """Causal SAE with SAELens's TopK encoder and auxiliary loss; saved as "topk"."""


class CausalBatchTopKTrainingSAE(CausalTrainingSAE, BatchTopKTrainingSAE):
    """Causal SAE with SAELens's BatchTopK encoder and auxiliary loss; saved as "jumprelu"."""

    @override
    def encode_as_saved(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return hidden_pre * (hidden_pre > self.topk_threshold.to(hidden_pre.dtype))

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        if "threshold" in state_dict and "topk_threshold" not in state_dict:
            threshold = state_dict.pop("threshold")
            state_dict["topk_threshold"] = threshold.max().to(self.topk_threshold)
        super().process_state_dict_for_loading(state_dict)


class CausalStandardTrainingSAE(CausalTrainingSAE, StandardTrainingSAE):
    """Causal SAE with SAELens's ReLU encoder and decoder-norm-weighted L1; saved as "standard".

    ``l1_weights`` scales each latent's L1 (``verify_action="reweight"``); all ones leaves
    SAELens's loss unchanged.
    """

    def __init__(self, cfg: CausalTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "l1_weights", torch.ones(cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return super().calculate_aux_loss(
            step_input, feature_acts * self.l1_weights, hidden_pre, sae_out
        )

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop("l1_weights")
        # ReLU commutes with a positive scale: folding the decoder norms is exact
        fold_decoder_norms(state_dict)


VARIANTS: dict[str, type[CausalTrainingSAE]] = {
    "topk": CausalTopKTrainingSAE,
    "batchtopk": CausalBatchTopKTrainingSAE,
    "relu": CausalStandardTrainingSAE,
}


def fold_decoder_norms(state_dict: dict[str, Any]) -> None:
    """Give ``W_dec``'s rows unit norm, moving each norm into ``W_enc``'s column and ``b_enc``
    (in place): encode x decode is unchanged for TopK-on-rescaled, ReLU and JumpReLU SAEs whose
    pre-activations are in units of a unit-norm decoder row."""
    norms = state_dict["W_dec"].norm(dim=-1).clamp(min=1e-8)
    state_dict["W_dec"] = state_dict["W_dec"] / norms[:, None]
    state_dict["W_enc"] = state_dict["W_enc"] * norms[None, :]
    state_dict["b_enc"] = state_dict["b_enc"] * norms
