"""Loading SAE folders with architecture "causal" for inference: 0.1.0 folders and checkpoints.

0.1.0 saved a causal SAE under its own inference architecture: pre-activations
``(x @ W_enc + b_enc) * ||W_dec[i]||``, a TopK / threshold / ReLU activation, and decoding
``(f / ||W_dec[i]||) @ W_dec + b_dec``. That is exactly SAELens's TopK / JumpReLU / standard
SAE once the decoder norms are folded into the encoder, so such a folder now loads (with the
plugin imported) as that plain SAE, with the same encode and decode.

A checkpoint (``CausalTrainingSAE.save_model``: the training config and weights) loads as the
plain SAE ``save_inference_model`` would have saved from it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAE, SAEConfig
from typing_extensions import override

from csae_plugin.saes.causal import (
    ARCHITECTURE,
    INFERENCE_CONFIGS,
    Activation,
    CausalTrainingSAE,
    CausalTrainingSAEConfig,
    fold_decoder_norms,
)


@dataclass
class CausalSAEConfig(SAEConfig):
    """The config of a "causal" folder: a 0.1.0 folder (``activation``, ``k``), whose plain
    equivalent is :meth:`plain_config`, or a checkpoint, whose top level also holds
    ``lambda_kl`` and ``rescale_acts_by_decoder_norm`` (:meth:`training_config`)."""

    activation: Activation = "topk"
    k: float = 32
    rescale_acts_by_decoder_norm: bool = True
    lambda_kl: float | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def training_config(self) -> CausalTrainingSAEConfig | None:
        """A checkpoint's training config (its other fields are in the metadata's
        ``training_architecture_details``); ``None`` for a 0.1.0 folder."""
        if self.lambda_kl is None:
            return None
        names = {f.name for f in fields(CausalTrainingSAEConfig)}
        details = self.metadata.get("training_architecture_details") or {}
        values = {key: value for key, value in details.items() if key in names}
        values |= {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
        return CausalTrainingSAEConfig(**values)

    def plain_config(self) -> SAEConfig:
        """The equivalent SAELens inference config, with the causal provenance in metadata."""
        base = {f.name: getattr(self, f.name) for f in fields(SAEConfig)}
        config_cls = INFERENCE_CONFIGS[self.activation]
        if self.activation == "topk":
            base.update(k=int(self.k), rescale_acts_by_decoder_norm=True)
        cfg = config_cls(**base)
        cfg.metadata.training_architecture = ARCHITECTURE
        cfg.metadata.training_architecture_details = {"activation": self.activation, "k": self.k}
        cfg.metadata.csae_plugin_version = cfg.metadata.get("csae_plugin_version", "0.1.0")
        return cfg


class CausalSAE(SAE[CausalSAEConfig]):
    """Never an instance: ``CausalSAE(cfg)`` returns the equivalent plain SAELens SAE, whose
    state-dict loading folds the 0.1.0 decoder norms into the encoder, or, for a checkpoint's
    training config, turns the training weights into the inference ones."""

    def __new__(cls, cfg: CausalSAEConfig, use_error_term: bool = False) -> SAE[Any]:  # type: ignore[misc]
        training = cfg.training_config()
        if training is not None:
            return _checkpoint_as_inference_sae(training, use_error_term)
        plain = cfg.plain_config()
        sae = get_sae_class(plain.architecture())[0](plain, use_error_term)
        sae.register_load_state_dict_pre_hook(_fold_decoder_norms)
        return sae


def _fold_decoder_norms(module: SAE[Any], state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    if prefix or "W_dec" not in state_dict:
        return
    fold_decoder_norms(state_dict)
    if "threshold" not in state_dict and hasattr(module, "threshold"):
        state_dict["threshold"] = torch.zeros_like(state_dict["b_enc"])


def _checkpoint_as_inference_sae(cfg: CausalTrainingSAEConfig, use_error_term: bool) -> SAE[Any]:
    """The plain SAE a checkpoint's training SAE saves as; loading it the training weights
    converts them exactly as ``save_inference_model`` does."""
    training = CausalTrainingSAE(cfg)
    plain_cfg = SAEConfig.from_dict(cfg.get_inference_sae_cfg_dict())
    sae = get_sae_class(plain_cfg.architecture())[0](plain_cfg, use_error_term)

    def to_inference(module: SAE[Any], state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        if prefix or "W_dec" not in state_dict:
            return
        training.load_state_dict(dict(state_dict), assign=True)
        converted = training.state_dict()
        training.process_state_dict_for_saving_inference(converted)
        state_dict.clear()
        state_dict.update(converted)

    sae.register_load_state_dict_pre_hook(to_inference)
    return sae
