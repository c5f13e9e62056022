"""Loading SAE folders that csae-plugin 0.1.0 saved with architecture "causal".

0.1.0 saved a causal SAE under its own inference architecture: pre-activations
``(x @ W_enc + b_enc) * ||W_dec[i]||``, a TopK / threshold / ReLU activation, and decoding
``(f / ||W_dec[i]||) @ W_dec + b_dec``. That is exactly SAELens's TopK / JumpReLU / standard
SAE once the decoder norms are folded into the encoder, so such a folder now loads (with the
plugin imported) as that plain SAE, with the same encode and decode.
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
    fold_decoder_norms,
)


@dataclass
class CausalSAEConfig(SAEConfig):
    """The config of a 0.1.0 causal SAE folder (``activation``, ``k``); loading one builds the
    equivalent plain SAELens SAE (:meth:`plain_config`)."""

    activation: Activation = "topk"
    k: float = 32

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

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
    state-dict loading folds the 0.1.0 decoder norms into the encoder."""

    def __new__(cls, cfg: CausalSAEConfig, use_error_term: bool = False) -> SAE[Any]:  # type: ignore[misc]
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
