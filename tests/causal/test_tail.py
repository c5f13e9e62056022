"""The model's tail (csae_plugin.causal.tail): capture at a hook plus the tail forward is the
model's own forward, perturbations equal a hooked forward, padding is masked as
TransformerLens masks it, unsupported hooks and SAEs fail with one line, and the KL reduction
equals torch's."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, D_MODEL, D_VOCAB, HOOK, make_tiny_model, make_tokens
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from transformer_lens import HookedTransformer
from transformer_lens.utilities.tokenize_utils import get_attention_mask

from csae_plugin.causal import tail

N_LAYERS = 3
PAD = 0  # make_tokens draws ids from 2 up, so 0 marks padding only
KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
HOOKS = [f"blocks.{layer}.{kind}" for kind in KINDS for layer in (0, 1, N_LAYERS - 1)]


@functools.cache
def three_layer_model() -> HookedTransformer:
    """conftest's tiny model with a third block, so first, middle and last layers differ."""
    return make_tiny_model(n_layers=N_LAYERS)


def padded(padding: str) -> tuple[HookedTransformer, torch.Tensor]:
    """The model (with a pad-aware tokenizer stand-in for 'left'/'right') and 4 token rows,
    rows 1-3 padded by 3, 7 and 12 positions on that side."""
    model = three_layer_model()
    tokens = make_tokens(4, seed=3)
    tokenizer = None
    if padding != "none":
        tokenizer = SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS, padding_side=padding)
        for row, n_pad in zip((1, 2, 3), (3, 7, 12), strict=True):
            if padding == "left":
                tokens[row] = torch.cat([torch.full((n_pad,), PAD), tokens[row, : 16 - n_pad]])
            else:
                tokens[row, 16 - n_pad :] = PAD
    model.tokenizer = tokenizer
    return model, tokens


def tail_logits(model, plan, start_input, x, mask) -> torch.Tensor:
    h = tail.run_tail(model, plan, start_input, x, mask)
    return tail.logits(model, h.flatten(0, 1)).reshape(*h.shape[:2], -1)


def unperturbed_tail(padding: str, hook: str, masked: bool = True):
    """The model's logits and the tail's with x unchanged (attention mask given to the tail or
    not), on the ``padded`` rows: ``(not_pad, mask, expected, tail's)``."""
    model, tokens = padded(padding)
    try:
        plan = tail.plan_hook(model, hook, D_MODEL)
        not_pad, mask = tail.padding_masks(model, tokens)
        with torch.no_grad():
            expected = model(tokens)
            x, start_input = tail.capture(model, plan, tokens, mask)
            ours = tail_logits(model, plan, start_input, x, mask if masked else None)
    finally:
        model.tokenizer = None
    return not_pad, mask, expected, ours


# 1. capture + tail forward with x unchanged is the model's own forward, padded or not
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("hook", [*HOOKS, "hook_embed"])
def test_1_unperturbed_tail_reproduces_the_model(hook, padding):
    not_pad, mask, expected, ours = unperturbed_tail(padding, hook)
    assert (mask is not None) == (padding == "left")
    assert int((~not_pad).sum()) == (0 if padding == "none" else 3 + 7 + 12)
    torch.testing.assert_close(ours[not_pad], expected[not_pad], rtol=1e-5, atol=1e-5)


def test_1_left_padding_needs_the_mask():
    """Without the attention mask the tail lets real tokens attend to left padding (probing's
    old tail did): the logits at real positions then differ from the model's."""
    not_pad, _, expected, unmasked = unperturbed_tail("left", HOOK, masked=False)
    assert (unmasked - expected)[not_pad].abs().max() > 1e-2


# 2. a perturbation spliced at the hook gives the hooked forward's logits
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("hook", [*HOOKS, "hook_embed"])
def test_2_perturbed_tail_equals_a_hooked_forward(hook, padding):
    model, tokens = padded(padding)
    delta = torch.randn(*tokens.shape, D_MODEL, generator=torch.Generator().manual_seed(1))
    try:
        plan = tail.plan_hook(model, hook, D_MODEL)
        not_pad, mask = tail.padding_masks(model, tokens)
        with torch.no_grad():
            hooked = model.run_with_hooks(
                tokens, fwd_hooks=[(hook, lambda act, hook: act + delta.reshape(act.shape))]
            )
            x, start_input = tail.capture(model, plan, tokens, mask)
            ours = tail_logits(model, plan, start_input, x + delta, mask)
            clean = model(tokens)
    finally:
        model.tokenizer = None
    assert (hooked - clean)[not_pad].abs().max() > 1e-2  # the perturbation changes the output
    torch.testing.assert_close(ours[not_pad], hooked[not_pad], rtol=1e-5, atol=1e-5)


# 3. the plan: where each supported hook's tail starts
def test_3_plans_name_the_block_the_tail_starts_at():
    model = three_layer_model()
    expect = {
        "blocks.0.hook_resid_pre": ("resid", 0, 0),
        "blocks.1.hook_resid_post": ("resid", 1, 2),
        "blocks.2.hook_resid_post": ("resid", 2, N_LAYERS),  # tail: ln_final + unembedding
        "blocks.2.hook_mlp_out": ("block", 2, 2),
        "blocks.0.hook_attn_out": ("block", 0, 0),
        "blocks.1.hook_resid_mid": ("block", 1, 1),
        "blocks.1.mlp.hook_post": ("block", 1, 1),
        "hook_embed": ("full", None, 0),
    }
    for hook, (kind, layer, start) in expect.items():
        assert tail.plan_hook(model, hook) == tail.HookPlan(hook, layer, kind, start)
    assert tail.split_hook_name("blocks.12.attn.hook_z") == (12, "attn.hook_z")
    assert tail.split_hook_name("hook_embed") == (None, "hook_embed")
    assert tail.stop_after_hook("blocks.1.hook_mlp_out") == 2
    assert tail.stop_after_hook("hook_embed") is None


def test_3_last_resid_post_tail_is_the_final_norm():
    model = three_layer_model()
    plan = tail.plan_hook(model, "blocks.2.hook_resid_post")
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(tail.run_tail(model, plan, x, x), model.ln_final(x))


# 4. hooks and SAEs no tail can serve fail at once, with one line naming the fix
def one_line_error(call, *args) -> str:
    with pytest.raises(ValueError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def sae_reading(hook: str, d_in: int = D_MODEL, **metadata) -> StandardSAE:
    meta = SAEMetadata(hook_name=hook, **metadata)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8, metadata=meta))


def test_4_unsupported_hooks_raise_one_line_errors():
    model = three_layer_model()
    for hook in ("blocks.1.attn.hook_z", "blocks.0.attn.hook_q", "blocks.1.hook_q_input"):
        message = one_line_error(tail.plan_hook, model, hook)
        assert "per attention head" in message and "'blocks." in message
        assert "hook_attn_out" in message
    for hook in ("ln_final.hook_normalized", "unembed.hook_in", "blocks.0.ln1.hook_scale"):
        message = one_line_error(tail.plan_hook, model, hook)
        assert f"hook {hook!r} is not supported" in message and "hook_resid_post" in message
    message = one_line_error(tail.plan_hook, model, "blocks.9.hook_resid_post")
    assert message.startswith("hook 'blocks.9.hook_resid_post' is not in the model (3 layers")
    assert "e.g. 'blocks.1.hook_resid_post'" in message
    message = one_line_error(tail.plan_hook, model, "blocks.0.hook_resid_post", 16)
    assert "SAE d_in=16 does not match the model's activation size 32" in message
    message = one_line_error(tail.activation_shape, model, "blocks.0.hook_mlp_in")
    assert "never fires" in message


def test_4_transcoders_and_per_head_saes_raise_one_line_errors():
    model = three_layer_model()
    hook, out = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"
    like = sae_reading(hook, hook_name_out=out)
    message = one_line_error(tail.plan_for_sae, model, like)
    assert f"transcoder ('standard': reads {hook!r}, writes {out!r})" in message
    cfg = TranscoderConfig(d_in=D_MODEL, d_sae=8, d_out=D_MODEL, apply_b_dec_to_input=False)
    cfg.metadata = SAEMetadata(hook_name=hook)
    message = one_line_error(tail.plan_for_sae, model, Transcoder(cfg))
    assert "transcoder ('transcoder'" in message and "writes another hook" in message
    message = one_line_error(tail.plan_for_sae, model, sae_reading(hook, hook_head_index=2))
    assert "only head 2" in message
    message = one_line_error(tail.plan_for_sae, model, sae_reading(None))
    assert "hook_name is not set" in message
    assert tail.plan_for_sae(model, sae_reading(hook)).kind == "block"


# 5. padding masks are the ones TransformerLens uses
def test_5_padding_masks_follow_the_tokenizer():
    for padding in ("left", "right"):
        model, tokens = padded(padding)
        try:
            not_pad, mask = tail.padding_masks(model, tokens)
            tl_mask = get_attention_mask(model.tokenizer, tokens, False)
        finally:
            model.tokenizer = None
        assert torch.equal(not_pad, tokens != PAD)
        assert torch.equal(not_pad, tl_mask.bool())
        assert mask is None if padding == "right" else torch.equal(mask, tl_mask)


# 6. the KL reduction: 0 for identical logits, torch's kl_div otherwise
def test_6_kl_of_identical_logits_is_zero():
    logits = torch.randn(20, D_VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(tail.kl_rows(logits, logits.clone()), torch.zeros(20))
    assert tail.kl_rows(logits, logits + 3.0).max() < 1e-10  # same distribution, up to rounding


def test_6_kl_matches_torch_kl_div_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(20, D_VOCAB, generator=gen) * 3
    other = torch.randn(20, D_VOCAB, generator=gen) * 3
    exact = F.kl_div(
        other.double().log_softmax(-1),
        clean.double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(tail.kl_rows(clean, other).double(), exact, rtol=1e-5, atol=1e-7)
    index = torch.randint(20, (30,), generator=gen)
    many = torch.randn(30, D_VOCAB, generator=gen)
    exact_indexed = F.kl_div(
        many.double().log_softmax(-1),
        clean[index].double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(
        tail.kl_rows(clean, many, clean_index=index).double(), exact_indexed, rtol=1e-5, atol=1e-7
    )


def test_6_mean_kl_averages_scored_positions_in_chunks():
    """mean_kl of copies against clean log-probabilities (streamed, 3 rows per chunk) equals
    the mean of torch's kl_div over each copy's scored positions."""
    model = three_layer_model()
    gen = torch.Generator().manual_seed(0)
    clean_h = torch.randn(2, 6, D_MODEL, generator=gen)
    copies_h = clean_h[[0, 0, 1]] + 0.5 * torch.randn(3, 6, D_MODEL, generator=gen)
    scored = torch.rand(3, 6, generator=gen) > 0.3
    with torch.no_grad():
        clean_lp = tail.log_probs(model, clean_h.flatten(0, 1), row_chunk=3)
        ours = tail.mean_kl(
            model, clean_lp, torch.arange(12).reshape(2, 6)[[0, 0, 1]], copies_h, scored, 3
        )
        p = tail.logits(model, clean_h.flatten(0, 1)).double().log_softmax(-1).reshape(2, 6, -1)
        q = tail.logits(model, copies_h.flatten(0, 1)).double().log_softmax(-1).reshape(3, 6, -1)
    torch.testing.assert_close(clean_lp, p.float().flatten(0, 1), rtol=1e-5, atol=1e-6)
    kl = F.kl_div(q, p[[0, 0, 1]], log_target=True, reduction="none").sum(-1)
    expected = (kl * scored).sum(1) / scored.sum(1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-8)
