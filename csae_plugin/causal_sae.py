"""The "causal" SAE architecture: config, inference SAE and training SAE in the SAELens style.

A causal SAE is an ordinary linear SAE (ReLU + L1, TopK or BatchTopK encoder) whose training
adds two terms that need the language model (see ``shared/design/csae.md``):

3. downstream faithfulness, ``lambda_kl * KL(p_clean || p_spliced)`` every ``kl_every`` steps;
4. causal verification every ``verify_every`` steps (NCES on held-out sequences), after which
   dead or causally inert latents are resampled (or, with ``relu``, pay a higher L1 weight).

The model is attached by :class:`csae_plugin.runner.CausalSAETrainingRunner`; with the plain
SAELens runner the SAE trains with terms 1-2 only and says so once.

Latent values are measured in units of a unit-norm decoder direction (``hidden_pre`` is scaled by
``||W_dec[i]||`` and decoding divides by it, as SAELens's ``rescale_acts_by_decoder_norm``), so
folding decoder norms or an activation scaling factor never changes which latents fire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import TopK, calculate_topk_aux_acts
from torch import nn
from typing_extensions import override

if TYPE_CHECKING:
    from csae_plugin.training_terms import CausalTrainingContext

ARCHITECTURE = "causal"
ACTIVATIONS = ("relu", "topk", "batchtopk")
Activation = Literal["relu", "topk", "batchtopk"]

logger = logging.getLogger(__name__)


def _validate_activation(activation: str, k: float, d_sae: int) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"causal SAE activation {activation!r} is not one of {', '.join(ACTIVATIONS)}; "
            "set activation='relu', 'topk' or 'batchtopk'"
        )
    if activation != "relu" and not 0 < k <= d_sae:
        raise ValueError(
            f"causal SAE k={k} must satisfy 0 < k <= d_sae={d_sae}; pick a k in that range"
        )


@dataclass
class CausalSAEConfig(SAEConfig):
    """Inference config of a causal SAE.

    Args:
        activation: encoder activation, ``relu``, ``topk`` (k per token) or ``batchtopk``
            (k on average; at inference a JumpReLU at the learned threshold).
        k: number of active latents for ``topk`` / ``batchtopk``; unused by ``relu``.
    """

    activation: Activation = "topk"
    k: float = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_activation(self.activation, self.k, self.d_sae)

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


def _activation_fn(activation: str, k: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if activation == "topk":
        return TopK(int(k))
    if activation == "batchtopk":
        return BatchTopK(k)
    return nn.ReLU()


def _init_causal_weights(sae: SAE[Any]) -> None:
    sae.b_enc = nn.Parameter(torch.zeros(sae.cfg.d_sae, dtype=sae.dtype, device=sae.device))


def _hidden_pre(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """Pre-activations in units of each latent's unit-norm decoder direction."""
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae_in @ sae.W_enc + sae.b_enc
    return sae.hook_sae_acts_pre(hidden_pre * sae.W_dec.norm(dim=-1))


def _decode(sae: SAE[Any], feature_acts: torch.Tensor) -> torch.Tensor:
    sae_out = (feature_acts / sae.W_dec.norm(dim=-1)) @ sae.W_dec + sae.b_dec
    sae_out = sae.hook_sae_recons(sae_out)
    sae_out = sae.run_time_activation_norm_fn_out(sae_out)
    return sae.reshape_fn_out(sae_out, sae.d_head)


class CausalSAE(SAE[CausalSAEConfig]):
    """Inference causal SAE: a linear SAE with a ReLU, TopK or (Batch)TopK-threshold encoder.

    Loads like any SAELens SAE (``SAE.load_from_disk``) once ``csae_plugin`` is imported.
    """

    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_causal_weights(self)
        if self.cfg.activation == "batchtopk":
            self.threshold = nn.Parameter(
                torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
            )

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.cfg.activation == "batchtopk":
            return lambda x: x * (x > self.threshold)
        return _activation_fn(self.cfg.activation, self.cfg.k)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_acts_post(self.activation_fn(_hidden_pre(self, x)))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _decode(self, feature_acts)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.activation == "batchtopk":
            self.threshold.data /= scaling_factor


@dataclass
class CausalTrainingSAEConfig(TrainingSAEConfig):
    """Training config of a causal SAE; each loss term can be switched off (for ablations).

    Args:
        activation: ``relu`` (+ L1), ``topk`` or ``batchtopk``.
        k: active latents per token (``topk``) or on average (``batchtopk``).
        l1_coefficient: L1 weight (``relu`` only); per latent it is scaled by the causal
            re-weighting of term 4 when ``verify_action="reweight"``.
        l1_warm_up_steps: linear warm-up of the L1 coefficient.
        aux_loss_coefficient: weight of the TopK auxiliary loss that revives dead latents.
        topk_threshold_lr: EMA rate of the BatchTopK inference threshold.
        lambda_kl: weight of KL(p_clean || p_spliced) (term 3); 0 switches it off.
        kl_every: compute the KL term every this many steps (>= 1). Each KL step costs a pass
            through the model after the hook; in the project's study (``evals/REPORT.md``, Gemma
            3 270M, 40 steps) every 10 steps lowered the KL-div score while every step did not.
        kl_batch_size: token sequences per KL step.
        verify_every: run causal verification every this many steps (term 4); 0 switches it off.
        verify_latents: latents checked per verification (a rotating subset).
        verify_seqs_per_latent: sequences per latent in a verification.
        verify_null_draws: null draws (default null) per sequence in a verification.
        verify_action: what happens to dead / inert latents: ``resample`` (re-initialise them)
            or ``reweight`` (``relu`` only: their L1 weight doubles, verified ones relax to 1).
    """

    activation: Activation = "topk"
    k: float = 32
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    aux_loss_coefficient: float = 1 / 32
    topk_threshold_lr: float = 0.01
    lambda_kl: float = 1.0
    kl_every: int = 10
    kl_batch_size: int = 4
    verify_every: int = 0
    verify_latents: int = 64
    verify_seqs_per_latent: int = 4
    verify_null_draws: int = 2
    verify_action: Literal["resample", "reweight"] = "resample"

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_activation(self.activation, self.k, self.d_sae)
        if self.kl_every < 1:
            raise ValueError(
                f"kl_every={self.kl_every} must be >= 1 (set lambda_kl=0 to turn KL off)"
            )
        if self.kl_batch_size < 1:
            raise ValueError(f"kl_batch_size={self.kl_batch_size} must be >= 1")
        if self.lambda_kl < 0:
            raise ValueError(f"lambda_kl={self.lambda_kl} must be >= 0")
        if self.verify_every < 0:
            raise ValueError(f"verify_every={self.verify_every} must be >= 0 (0 turns it off)")
        if self.verify_action not in ("resample", "reweight"):
            raise ValueError(
                f"verify_action {self.verify_action!r} must be 'resample' or 'reweight'"
            )
        if self.verify_action == "reweight" and self.activation != "relu":
            raise ValueError("verify_action='reweight' needs activation='relu' (it scales L1)")

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class CausalTrainingSAE(TrainingSAE[CausalTrainingSAEConfig]):
    """Training causal SAE: MSE + sparsity, plus the KL and verification terms when a language
    model is attached (:meth:`attach`)."""

    b_enc: nn.Parameter

    def __init__(self, cfg: CausalTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer(
            "topk_threshold", torch.zeros((), dtype=self.dtype, device=self.device)
        )
        self.register_buffer(
            "l1_weights", torch.ones(cfg.d_sae, dtype=self.dtype, device=self.device)
        )
        self._context: CausalTrainingContext | None = None
        self._warned_no_model = False

    def attach(self, context: CausalTrainingContext | None) -> None:
        """Give the SAE what terms 3-4 need (model, tokens); kept off the module tree, so it
        is never saved with the SAE nor optimised."""
        self._context = context

    @property
    def causal_context(self) -> CausalTrainingContext | None:
        return self._context

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_causal_weights(self)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return _activation_fn(self.cfg.activation, self.cfg.k)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        coefficients: dict[str, float | TrainCoefficientConfig] = {"kl": self.cfg.lambda_kl}
        if self.cfg.activation == "relu":
            coefficients["l1"] = TrainCoefficientConfig(
                value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps
            )
        return coefficients

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = _hidden_pre(self, x)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return _decode(self, feature_acts)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._maybe_verify(step_input)
        output = super().training_forward_pass(step_input)
        if self.cfg.activation == "batchtopk":
            self._update_topk_threshold(output.feature_acts)
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
        losses: dict[str, torch.Tensor] = {}
        if self.cfg.activation == "relu":
            sparsity = (feature_acts * self.l1_weights).sum(dim=-1)
            losses["l1_loss"] = step_input.coefficients["l1"] * sparsity.mean()
        else:
            losses["auxiliary_reconstruction_loss"] = self._topk_aux_loss(
                step_input, hidden_pre, sae_out
            )
        kl = self._maybe_kl(step_input)
        if kl is not None:
            losses["kl_loss"] = kl
        return losses

    def _topk_aux_loss(
        self, step_input: TrainStepInput, hidden_pre: torch.Tensor, sae_out: torch.Tensor
    ) -> torch.Tensor:
        """TopK auxiliary loss (Gao et al. 2024): dead latents reconstruct the residual."""
        mask = step_input.dead_neuron_mask
        if mask is None or (num_dead := int(mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual = (step_input.sae_in - sae_out).detach()
        k_aux = min(step_input.sae_in.shape[-1] // 2, num_dead)
        scale = min(num_dead / (step_input.sae_in.shape[-1] // 2), 1.0)
        aux_acts = calculate_topk_aux_acts(
            k_aux=k_aux, hidden_pre=hidden_pre, dead_neuron_mask=mask
        )
        recons = (aux_acts / self.W_dec.norm(dim=-1)) @ self.W_dec
        aux_loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * aux_loss

    def _maybe_kl(self, step_input: TrainStepInput) -> torch.Tensor | None:
        if self.cfg.lambda_kl == 0 or step_input.n_training_steps % self.cfg.kl_every != 0:
            return None
        if self._context is None:
            self._warn_no_model()
            return None
        return step_input.coefficients["kl"] * self._context.kl_term(self)

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

    @torch.no_grad()
    def _update_topk_threshold(self, feature_acts: torch.Tensor) -> None:
        positive = feature_acts > 0
        if positive.any():
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold.mul_(1 - lr).add_(lr * feature_acts[positive].min())

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.topk_threshold /= scaling_factor

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        threshold = state_dict.pop("topk_threshold")
        state_dict.pop("l1_weights")
        if self.cfg.activation == "batchtopk":
            state_dict["threshold"] = torch.ones_like(self.b_enc) * threshold

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        state_dict.setdefault("topk_threshold", self.topk_threshold.clone())
        state_dict.setdefault("l1_weights", self.l1_weights.clone())
