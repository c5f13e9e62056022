"""The model's tail: from the SAE's hook to the logits, and KL(p_clean || p_patched).

Every causal measurement here changes the activation x at the SAE's hook and runs the rest of
the model. This module is the one home of that: which hooks a tail can start from and where
(:func:`parse_hook`, :func:`plan_hook`, :func:`plan_for_sae`), the input checks behind them
(the hook exists, :func:`check_hook_exists`; has the SAE's width; the SAE reconstructs the
activation it reads), the clean capture at the hook (:func:`capture`; at any hook,
:func:`activations_at`), the forward from there to the final normalised residual with
TransformerLens's attention mask (:func:`run_tail`), the logits (:func:`logits`) and the KL
reduction, in float32 and one chunk of positions at a time (:func:`kl_rows`, :func:`mean_kl`).
The intervention engine, the causal SAE's KL term, verification, probing and the evals all
call it; it imports nothing from the rest of the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap
from transformer_lens.utilities.tokenize_utils import get_attention_mask

RESID_HOOKS = ("hook_resid_pre", "hook_resid_post")
"""Block hooks on the residual stream: the tail starts at a block boundary."""

BLOCK_HOOKS = ("hook_resid_mid", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post")
"""Block hooks inside a block: the tail reruns that block with the activation replaced."""

EMBED_HOOKS = ("hook_embed", "hook_pos_embed")
"""Hooks before the blocks: the tail is a full forward with the activation replaced."""

_PER_HEAD_HOOKS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
_KL_SUBCHUNK_ROWS = 8  # rows per elementwise KL step: small enough to stay in CPU cache


@dataclass(frozen=True)
class HookPlan:
    """Where the tail starts for a supported hook.

    ``layer`` is the block the hook sits in (None: before the blocks). ``kind`` is ``"resid"``
    (x is the residual entering block ``start``; for the last block's resid_post ``start`` is
    ``n_layers`` and the tail is ``ln_final`` and the unembedding), ``"block"`` (x is inside
    block ``start``: the tail reruns it from its resid_pre with x replaced) or ``"full"`` (an
    embedding hook: a full forward from the tokens with x replaced).
    """

    hook_name: str
    layer: int | None
    kind: str
    start: int


def split_hook_name(hook_name: str) -> tuple[int | None, str]:
    """``(block, rest)`` of a hook name: ``blocks.6.hook_resid_post`` -> ``(6, "hook_resid_post")``;
    ``(None, hook_name)`` for hooks outside the blocks."""
    match = _BLOCK_HOOK.fullmatch(hook_name)
    if match is None:
        return None, hook_name
    return int(match.group(1)), match.group(2)


def block_hook_name(layer: int, suffix: str) -> str:
    """The name of hook ``suffix`` in block ``layer`` (the inverse of :func:`split_hook_name`)."""
    return f"blocks.{layer}.{suffix}"


def stop_after_hook(hook_name: str) -> int | None:
    """The ``stop_at_layer`` of the shortest forward that still runs ``hook_name``
    (None: a full forward, for hooks outside the blocks)."""
    layer, _ = split_hook_name(hook_name)
    return None if layer is None else layer + 1


def parse_hook(hook_name: str) -> HookPlan:
    """The :class:`HookPlan` for ``hook_name``; a one-line ``ValueError`` if no tail can start
    there (per-head hooks, hooks after the blocks, anything not in :data:`RESID_HOOKS`,
    :data:`BLOCK_HOOKS` or :data:`EMBED_HOOKS`). Needs no model: it reads the name only."""
    layer, suffix = split_hook_name(hook_name)
    if layer is None and hook_name in EMBED_HOOKS:
        return HookPlan(hook_name, None, "full", 0)
    if layer is not None and suffix in RESID_HOOKS:
        return HookPlan(hook_name, layer, "resid", layer + (suffix == "hook_resid_post"))
    if layer is not None and suffix in BLOCK_HOOKS:
        return HookPlan(hook_name, layer, "block", layer)
    if layer is not None and (suffix.startswith("attn.") or suffix in _PER_HEAD_HOOKS):
        raise ValueError(
            f"hook {hook_name!r} holds one vector per attention head, but an intervention "
            f"changes one vector per token; use an SAE on "
            f"{block_hook_name(layer, 'hook_attn_out')!r} (the heads' summed output) or on the "
            "residual stream"
        )
    raise ValueError(
        f"hook {hook_name!r} is not supported (no model tail starts there); use "
        f"blocks.N.{{{','.join(RESID_HOOKS + BLOCK_HOOKS)}}} or {' or '.join(EMBED_HOOKS)}"
    )


def check_hook_exists(model: HookedTransformer, hook_name: str) -> None:
    """Raise a one-line ``ValueError`` naming the model's layers and a hook of the same kind
    that it has (:func:`suggested_hook`) unless ``hook_name`` is one of its hook points."""
    if hook_name in model.hook_dict:
        return
    layers = model.cfg.n_layers
    raise ValueError(
        f"hook {hook_name!r} is not in the model ({layers} layers: blocks.0-{layers - 1} of "
        f"{model.cfg.model_name}); use a name from model.hook_dict, e.g. "
        f"{suggested_hook(model, hook_name)!r}"
    )


def suggested_hook(model: HookedTransformer, hook_name: str) -> str:
    """``hook_name``'s kind of hook at a layer a third of the way in (resid_post if the model
    has no such hook there)."""
    layer = model.cfg.n_layers // 3
    candidate = block_hook_name(layer, split_hook_name(hook_name)[1])
    return candidate if candidate in model.hook_dict else block_hook_name(layer, "hook_resid_post")


@torch.no_grad()
def activations_at(model: HookedTransformer, hook_name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The clean activation at any hook ``hook_name`` for ``tokens`` [b, T], as the model
    computes it [b, T, ...], from a forward that stops after the hook's block."""
    _, cache = model.run_with_cache(
        tokens.to(model.cfg.device),
        names_filter=[hook_name],
        stop_at_layer=stop_after_hook(hook_name),
        return_type=None,
    )
    return cache[hook_name]


@torch.no_grad()
def activation_shape(model: HookedTransformer, hook_name: str) -> tuple[int, ...]:
    """Shape of one token's activation at ``hook_name``, from a 2-token forward that stops
    after the hook's block (no unembedding)."""
    check_hook_exists(model, hook_name)
    seen: list[tuple[int, ...]] = []
    model.run_with_hooks(
        torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device),
        return_type=None,
        stop_at_layer=stop_after_hook(hook_name),
        fwd_hooks=[(hook_name, lambda act, hook: seen.append(tuple(act.shape[2:])))],
    )
    if not seen:
        raise ValueError(
            f"hook {hook_name!r} never fires in this model's forward pass (its config does not "
            "use it); pick another hook, e.g. one of its blocks' hook_resid_post"
        )
    return seen[0]


def check_model_matches_sae(model: HookedTransformer, hook_name: str, d_in: int) -> tuple[int, ...]:
    """Raise a one-line ``ValueError`` if the hook is unknown or its width is not the SAE's
    ``d_in``; returns the activation's per-token shape."""
    shape = activation_shape(model, hook_name)
    width = int(np.prod(shape))
    if width != d_in:
        raise ValueError(
            f"SAE d_in={d_in} does not match the model's activation size {width} at "
            f"{hook_name!r}; use an SAE trained on this model and hook, or set d_in to match"
        )
    return shape


def plan_hook(model: HookedTransformer, hook_name: str, d_in: int | None = None) -> HookPlan:
    """The :class:`HookPlan` for ``hook_name`` after checking the model has that hook, a tail
    can start there and (if given) its activations have width ``d_in``."""
    check_hook_exists(model, hook_name)
    plan = parse_hook(hook_name)
    if d_in is not None:
        check_model_matches_sae(model, hook_name, d_in)
    return plan


def plan_for_sae(model: HookedTransformer, sae: SAE) -> HookPlan:
    """The :class:`HookPlan` for the hook a SAELens SAE reads, after the checks of
    :func:`plan_hook` and that its decode reconstructs that hook's whole activation
    (a one-line ``ValueError`` for a missing hook name, a transcoder or a per-head SAE)."""
    cfg = sae.cfg
    hook_name = cfg.metadata.hook_name
    if hook_name is None:
        raise ValueError(
            "sae.cfg.metadata.hook_name is not set; set it to the model hook the SAE reads"
        )
    architecture = cfg.architecture() if hasattr(cfg, "architecture") else type(sae).__name__
    hook_out = getattr(cfg.metadata, "hook_name_out", None) or getattr(cfg, "hook_name_out", None)
    if "transcoder" in architecture.lower() or (hook_out is not None and hook_out != hook_name):
        writes = f"writes {hook_out!r}" if hook_out else "writes another hook"
        raise ValueError(
            f"the SAE is a transcoder ({architecture!r}: reads {hook_name!r}, {writes}), so its "
            "decode is not a reconstruction of the activation it reads; use an SAE whose "
            f"decode reconstructs {hook_name!r}"
        )
    head = getattr(cfg.metadata, "hook_head_index", None)
    if head is not None:
        raise ValueError(
            f"the SAE reads only head {head} of {hook_name!r}; per-head SAEs are not supported: "
            "use an SAE on the whole hook (e.g. the block's hook_attn_out)"
        )
    return plan_hook(model, hook_name, cfg.d_in)


def padding_masks(
    model: HookedTransformer, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(not_pad, attention_mask)`` for ``tokens`` [n, T]: which positions are real tokens,
    and the attention mask TransformerLens would use for them (None: no mask, as for a model
    without pad token or with right padding)."""
    tokenizer = model.tokenizer
    not_pad = torch.ones_like(tokens, dtype=torch.bool)
    attention_mask = None
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        mask = get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)
        not_pad = mask.bool()
        if tokenizer.padding_side == "left":  # as HookedTransformer.input_to_embed does
            attention_mask = mask
    return not_pad, attention_mask


def capture(
    model: HookedTransformer,
    plan: HookPlan,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean x at the hook [b, T, d_in] and the tail's input for ``tokens`` [b, T].

    The tail's input is the residual entering block ``plan.start`` (``resid`` and ``block``
    plans) or the tokens (``full``); hand it to :func:`run_tail` with the same mask.
    """
    if plan.kind == "resid":
        resid = model(tokens, stop_at_layer=plan.start, attention_mask=attention_mask)
        x = resid
    else:
        seen: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: Any) -> None:
            seen[hook.name] = act

        names = [plan.hook_name]
        if plan.kind == "block":
            names.append(block_hook_name(plan.start, "hook_resid_pre"))
        model.run_with_hooks(
            tokens,
            return_type=None,
            stop_at_layer=stop_after_hook(plan.hook_name),
            attention_mask=attention_mask,
            fwd_hooks=[(name, grab) for name in names],
        )
        x = seen[plan.hook_name]
        resid = seen[names[-1]] if plan.kind == "block" else tokens
    return x.reshape(*x.shape[:2], -1), resid


def run_tail(
    model: HookedTransformer,
    plan: HookPlan,
    start_input: torch.Tensor,
    spliced: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_kv_cache: TransformerLensKeyValueCache | None = None,
) -> torch.Tensor:
    """Final normalised residual [C, T, d_model] with x replaced by ``spliced`` [C, T, d_in].

    ``start_input`` is :func:`capture`'s tail input for the same rows; differentiable in
    ``spliced``. With ``spliced`` the clean x it reproduces the model's own forward.
    ``past_kv_cache`` (TransformerLens's) holds the tail layers' keys and values of earlier
    positions: the inputs are then the positions after them (:func:`prefix_kv_cache`), or, with
    an empty unfrozen cache (:func:`empty_kv_cache`), the run fills it.
    """
    n_layers = model.cfg.n_layers
    spliced = spliced.to(model.cfg.dtype)
    if plan.kind == "resid":
        resid = model(
            spliced,
            start_at_layer=plan.start,
            stop_at_layer=n_layers,
            attention_mask=attention_mask,
            past_kv_cache=past_kv_cache,
        )
        return model.ln_final(resid) if model.cfg.normalization_type is not None else resid

    def replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return spliced.reshape(act.shape)

    start = plan.start if plan.kind == "block" else None  # "full": from the tokens
    with model.hooks(fwd_hooks=[(plan.hook_name, replace)]):
        resid = model(
            start_input,
            start_at_layer=start,
            stop_at_layer=n_layers,
            attention_mask=attention_mask,
            past_kv_cache=past_kv_cache,
        )
        return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def reuses_prefix(plan: HookPlan, attention_mask: torch.Tensor | None) -> bool:
    """Whether a tail from ``plan`` can start after a clean prefix held in a key-value cache:
    a block or residual hook, without a padding mask (positions then carry no offsets)."""
    return attention_mask is None and plan.kind in ("resid", "block")


def empty_kv_cache(model: HookedTransformer, batch: int, device: torch.device | str):
    """An empty, unfrozen key-value cache for ``batch`` rows, for :func:`run_tail` to fill."""
    return TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)


def prefix_kv_cache(
    cache: TransformerLensKeyValueCache, rows: torch.Tensor, length: int
) -> TransformerLensKeyValueCache:
    """A frozen cache holding the first ``length`` positions of ``cache``'s ``rows``: a tail
    run on it reads positions ``length`` on and attends to the cached prefix."""
    entries = [
        TransformerLensKeyValueCacheEntry(
            entry.past_keys[rows, :length], entry.past_values[rows, :length], frozen=True
        )
        for entry in cache.entries
    ]
    mask = torch.ones(len(rows), length, dtype=torch.int, device=rows.device)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


def logits(model: HookedTransformer, h: torch.Tensor) -> torch.Tensor:
    """Logits [rows, d_vocab] of final normalised residual rows [rows, d_model], in float32.

    ``h @ W_U + b_U`` directly: TransformerLens's Unembed copies ``W_U.T`` on every call
    (671 MB for Gemma 3), which would cost more than the product itself here.
    """
    unembed = model.unembed
    out = torch.addmm(unembed.b_U, h, unembed.W_U)
    return apply_softcap(out, model.cfg.output_logits_soft_cap).float()


def log_probs(model: HookedTransformer, h: torch.Tensor, row_chunk: int) -> torch.Tensor:
    """Log-probabilities [rows, d_vocab] (float32) of final normalised residual rows, computed
    ``row_chunk`` rows at a time (so only one chunk of logits exists besides the result)."""
    out = torch.empty(h.shape[0], model.cfg.d_vocab, device=h.device)
    for r in range(0, h.shape[0], row_chunk):
        out[r : r + row_chunk] = logits(model, h[r : r + row_chunk]).log_softmax(-1)
    return out


def kl_rows(
    clean_logits: torch.Tensor,
    logits: torch.Tensor,
    clean_index: torch.Tensor | None = None,
    clean_normalised: bool = False,
) -> torch.Tensor:
    """KL(p || q) per row in nats from logits of p (clean) and q [rows, V], accurate at ~1e-12.

    ``clean_logits`` may equally be log-probabilities (logits shifted per row): the result
    does not change, and their log-sum-exp is then ~0.

    With dz = z_p - z_q centred by its p-mean (r = dz - E_p[dz]), KL = log E_p[exp(-r)]
    = log1p(E_p[phi(r)]), where phi(r) = r + expm1(-r) >= 0. Every term is non-negative,
    so float32 arithmetic keeps its relative precision even for KL ~ 1e-9, where the usual
    sum p (log p - log q) in float32 has absolute noise ~1e-6 on a large vocabulary.
    The tiny negative results rounding can give are clamped to 0 (KL >= 0 exactly).
    ``clean_index`` picks the clean row for each row of ``logits`` (default: the same row);
    ``clean_normalised`` says the clean rows are log-probabilities (saves their log-sum-exp;
    their exp is still renormalised, as the formula needs sum p = 1 to float precision).
    """
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], _KL_SUBCHUNK_ROWS):
        rows = slice(i, i + _KL_SUBCHUNK_ROWS)
        zp = clean_logits[rows] if clean_index is None else clean_logits[clean_index[rows]]
        zq = logits[rows]
        if clean_normalised:  # renormalised: a float32 log-softmax's exp sums to 1 +- ~1e-6
            p = zp.exp()
            p.div_(p.sum(-1, keepdim=True))
        else:
            p = zp.sub(torch.logsumexp(zp, -1, keepdim=True)).exp_()
        dz = torch.sub(zp, zq)
        torch.sub(torch.linalg.vecdot(p, dz).unsqueeze(-1), dz, out=dz)  # -r, in one pass
        phi = torch.expm1(dz).sub_(dz)
        out[rows] = torch.log1p(torch.linalg.vecdot(p, phi))
    return out.clamp_(min=0.0)


def mean_kl(
    model: HookedTransformer,
    clean_log_probs: torch.Tensor,
    clean_index: torch.Tensor,
    h: torch.Tensor,
    scored: torch.Tensor,
    row_chunk: int,
) -> torch.Tensor:
    """Mean over each copy's scored positions of KL(p_clean || p_copy) [C] (float64, on CPU).

    ``h`` [C, T, d_model] are the copies' final normalised residuals, ``scored`` [C, T] the
    positions to average over and ``clean_index`` [C, T] the row of ``clean_log_probs`` (see
    :func:`log_probs`) holding each position's clean distribution. The copies' logits exist
    ``row_chunk`` positions at a time.
    """
    copy_idx, pos_idx = scored.nonzero(as_tuple=True)
    total = torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
    for r in range(0, len(copy_idx), row_chunk):
        c, t = copy_idx[r : r + row_chunk], pos_idx[r : r + row_chunk]
        kl = kl_rows(clean_log_probs, logits(model, h[c, t]), clean_index[c, t], True)
        total.index_add_(0, c, kl.double())
    return (total / scored.sum(1).clamp(min=1)).cpu()


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's latents f(x) [..., d_sae], dense, in the SAE's dtype, for x [..., d_in]."""
    f = sae.encode(x.to(sae.dtype))
    return f.to_dense() if f.is_sparse else f


def special_token_mask(tokens: torch.Tensor, special_ids: torch.Tensor | None) -> torch.Tensor:
    """True at positions that are scored: not BOS/EOS/padding."""
    if special_ids is None or special_ids.numel() == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, special_ids.to(tokens.device))
