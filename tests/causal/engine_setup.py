"""The causal tests' own small world, for the tests beside this file: conftest's tiny model
with a third block, a vocabulary of 100 and BOS 0, token rows split into reference and eval
rows, and SAELens SAEs of four kinds whose latents fire on it."""

from __future__ import annotations

import functools

import torch
from conftest import make_tiny_model
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

from csae_plugin import causal as iv

D_MODEL = 32
D_VOCAB = 100
N_CTX = 16
D_SAE = 48
BOS = 0
POST = "blocks.0.hook_resid_post"
PRE = "blocks.1.hook_resid_pre"
MLP_OUT = "blocks.1.hook_mlp_out"
SAE_KINDS = ("standard", "topk", "jumprelu", "gated")


@functools.cache
def tiny_model(seed: int = 0) -> HookedTransformer:
    return make_tiny_model(
        seed, n_layers=3, d_mlp=None, d_vocab=D_VOCAB, n_ctx=32, default_prepend_bos=True
    )


@functools.cache
def tokens(n_seq: int = 160, seed: int = 0) -> torch.Tensor:
    """Random token rows with BOS at position 0: rows [0, 64) are reference, the rest eval."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randint(1, D_VOCAB, (n_seq, N_CTX), generator=gen)
    out[:, 0] = BOS
    return out


def reference_tokens() -> torch.Tensor:
    return tokens()[:64]


def eval_tokens() -> torch.Tensor:
    return tokens()[64:]


def make_sae(kind: str, hook: str, seed: int = 0, d_in: int = D_MODEL):
    """An SAELens SAE whose latents fire on the tiny model: W_enc = W_dec.T, negative biases.

    Decoder rows get uneven norms, so TopK's rescale_acts_by_decoder_norm makes the effective
    direction differ from W_dec[i].
    """
    meta = SAEMetadata(hook_name=hook)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta))
    elif kind == "topk":
        cfg = TopKSAEConfig(
            d_in=d_in, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True, metadata=meta
        )
        sae = TopKSAE(cfg)
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta))
    else:
        sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=meta))
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_enc.copy_(w_dec.T)
        sae.W_dec.copy_(w_dec * torch.empty(D_SAE, 1).uniform_(0.5, 2.0, generator=gen))
        if kind == "gated":
            sae.b_gate.fill_(-0.5)
            sae.b_mag.fill_(0.1)
        else:
            sae.b_enc.fill_(-0.5)
        if kind == "jumprelu":
            sae.threshold.fill_(0.1)
    return sae


@functools.cache
def sae_and_stats(kind: str, hook: str):
    sae = make_sae(kind, hook)
    stats = iv.reference_stats(tiny_model(), sae, reference_tokens(), bos_token_id=BOS)
    return sae, stats
