"""The batched intervention engine (``csae_plugin/causal/engine.py``): equal to the naive
reference, invariances, the random-decoder null, dead latents, memory that does not grow with the
number of latents, input errors, several nulls in one run, half-precision models and the tail
after a clean prefix."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from engine_setup import (
    BOS,
    D_MODEL,
    D_SAE,
    D_VOCAB,
    MLP_OUT,
    N_CTX,
    POST,
    PRE,
    SAE_KINDS,
    eval_tokens,
    make_sae,
    reference_tokens,
    sae_and_stats,
    tiny_model,
)
from scipy import stats as scipy_stats
from transformer_lens import HookedTransformer, HookedTransformerConfig

from csae_plugin import causal as iv
from csae_plugin.causal import engine, tail
from csae_plugin.causal.nces import effects_details


def naive_arrays(model, sae, effects, stats):
    """The naive reference on exactly the engine's latents, sequences and random draws."""
    return iv.naive_latent_effects(model, sae, eval_tokens(), effects, stats, bos_token_id=BOS)


def run_engine(sae, stats, latents, **kw):
    kw.setdefault("null_draws", 2)
    kw.setdefault("seqs_per_latent", 2)
    kw.setdefault("batch_size", 5)
    return iv.latent_effects(
        tiny_model(), sae, eval_tokens(), latents, stats, bos_token_id=BOS, progress=False, **kw
    )


# 1. the batched engine equals the naive reference
@pytest.mark.parametrize("intervention", iv.INTERVENTIONS)
@pytest.mark.parametrize("hook", [POST, PRE])
@pytest.mark.parametrize("kind", SAE_KINDS)
def test_1_engine_equals_naive_reference(kind, hook, intervention):
    sae, stats = sae_and_stats(kind, hook)
    effects = run_engine(sae, stats, [0, 5, 11], intervention=intervention, alpha=0.5)
    assert (effects.n_sequences == 2).all()
    effect, null = naive_arrays(tiny_model(), sae, effects, stats)
    np.testing.assert_allclose(effects.effect, effect, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(effects.null_per_draw, null, rtol=1e-4, atol=1e-9)
    assert np.nanmin(effects.effect) > 0 and np.nanmin(effects.null_per_draw) > 0


def test_1_engine_equals_naive_reference_inside_a_block():
    """A hook that is not the residual stream (hook_mlp_out) reruns its block, hooked."""
    sae, stats = sae_and_stats("standard", MLP_OUT)
    for intervention in ("zero", "steer"):
        effects = run_engine(sae, stats, [1, 2], intervention=intervention)
        effect, null = naive_arrays(tiny_model(), sae, effects, stats)
        np.testing.assert_allclose(effects.effect, effect, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(effects.null_per_draw, null, rtol=1e-4, atol=1e-9)


# 2. an intervention that changes nothing has zero effect
def test_2_inert_interventions_have_zero_effect():
    sae, stats = sae_and_stats("standard", POST)
    silent = make_sae("standard", POST)
    with torch.no_grad():
        silent.W_dec[3] = 0.0  # latent 3 still fires but writes nothing
    zero = run_engine(silent, stats, [3], intervention="zero")
    no_steer = run_engine(sae, stats, [3], intervention="steer", alpha=0.0)
    for effects in (zero, no_steer):
        assert effects.n_sequences[0] == 2
        assert np.nanmax(effects.effect) == 0.0 and np.nanmax(effects.null_per_draw) == 0.0
    assert np.isnan(effects_details(zero)["nces"][0])  # 0 / 0: undefined, never verified


# 3. rescaling a latent's encoder by 1/c and decoder by c leaves its NCES unchanged
@pytest.mark.parametrize("intervention", ["zero", "mean"])
def test_3_nces_is_invariant_to_latent_rescaling(intervention):
    sae, stats = sae_and_stats("standard", POST)
    scaled = make_sae("standard", POST)
    c = 7.0
    with torch.no_grad():
        scaled.W_enc[:, 4] /= c
        scaled.b_enc[4] /= c
        scaled.W_dec[4] *= c
    scaled_stats = iv.reference_stats(tiny_model(), scaled, reference_tokens(), bos_token_id=BOS)
    kw = {"intervention": intervention, "null_draws": 4, "seqs_per_latent": 4}
    base = effects_details(run_engine(sae, stats, [4], **kw))
    rescaled = effects_details(run_engine(scaled, scaled_stats, [4], **kw))
    assert base["nces"][0] > 0
    np.testing.assert_allclose(rescaled["nces"], base["nces"], rtol=1e-4)
    np.testing.assert_allclose(rescaled["effect_kl"], base["effect_kl"], rtol=1e-4)


# 4. decoder rows drawn from N(0, Sigma): NCES near 1, no more verified than the FDR allows
def test_4_random_covariance_decoder_is_not_verified():
    """Decoder rows ~ N(0, Sigma), independent of a random encoder: each latent's direction is
    exchangeable with its null draws, so NCES should scatter around 1. Measured here, log NCES
    spreads across latents with sd ~0.27, so the median of 48 latents has a standard error
    ~0.05 on the log scale: [0.8, 1.25] is about +-4.5 standard errors.
    Raw p-values must be calibrated: at most the 99.9% binomial quantile Binom(48, 0.05) = 8
    below 0.05. Under this global null BH makes any discovery with probability <= 0.05, so at
    most 1 verified latent is allowed. A per-sequence paired test fails both: on these effects
    Wilcoxon over sequences gives 13 p-values below 0.05 and 10 BH discoveries.
    """
    model = tiny_model()
    base = make_sae("standard", POST)
    cov = iv.reference_stats(model, base, reference_tokens(), bos_token_id=BOS).cov_factor
    gen = torch.Generator().manual_seed(1)
    sae = make_sae("standard", POST)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(D_SAE, D_MODEL, generator=gen, dtype=torch.float64) @ cov.T)
        enc = torch.randn(D_MODEL, D_SAE, generator=gen)
        sae.W_enc.copy_(enc / enc.norm(dim=0))
        sae.b_enc.fill_(-0.3)
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    n = D_SAE
    effects = run_engine(
        sae, stats, range(n), null_draws=8, seqs_per_latent=16, batch_size=48, seed=3
    )
    details = effects_details(effects, n_resamples=200)
    assert not details["dead"].any()
    assert 0.8 < details["nces"].median() < 1.25
    assert (details["p_value"] < 0.05).sum() <= scipy_stats.binom.ppf(0.999, n, 0.05)
    assert details["verified"].sum() <= 1


# 5. a latent that never fires is dead and never verified
def test_5_never_firing_latent_is_dead():
    sae = make_sae("standard", POST)
    with torch.no_grad():
        sae.b_enc[7] = -1e6
    stats = iv.reference_stats(tiny_model(), sae, reference_tokens(), bos_token_id=BOS)
    effects = run_engine(sae, stats, [6, 7])
    assert effects.n_sequences.tolist() == [2, 0]
    assert np.isnan(effects.effect[1]).all() and (effects.sequences[1] == -1).all()
    details = effects_details(effects)
    assert details["dead"].tolist() == [False, True]
    assert not details["verified"][1] and np.isnan(details["nces"][1])


# 7. peak memory does not grow with the number of latents
def test_7_largest_tensors_do_not_grow_with_latents(monkeypatch):
    """Every [rows, d_vocab] tensor is made by the tail's unembedding (``logits``) and every
    tail batch enters the last block, so recording those sees the largest intermediates.
    Doubling the latents must leave both maxima unchanged, within the chunk and batch sizes."""
    model = tiny_model()
    sae, stats = sae_and_stats("standard", POST)
    row_chunk = 40
    monkeypatch.setattr(engine, "ROW_CHUNK_BYTES", row_chunk * D_VOCAB * 4)
    seen = {"logits": 0, "block": 0}
    unembed = tail.logits

    def recording_unembed(model, h):
        logits = unembed(model, h)
        seen["logits"] = max(seen["logits"], logits.numel())
        return logits

    def block_hook(module, inputs):
        seen["block"] = max(seen["block"], inputs[0].numel())

    monkeypatch.setattr(tail, "logits", recording_unembed)
    handle = model.blocks[-1].register_forward_pre_hook(block_hook)
    maxima = []
    try:
        for n_latents in (8, 16):
            seen.update(logits=0, block=0)
            run_engine(sae, stats, range(n_latents), null_draws=3, seqs_per_latent=4, batch_size=8)
            maxima.append(dict(seen))
    finally:
        handle.remove()
    assert maxima[0] == maxima[1]
    assert maxima[1]["logits"] == row_chunk * D_VOCAB
    assert maxima[1]["block"] <= 8 * N_CTX * D_MODEL


def test_7_chunking_does_not_change_the_numbers(monkeypatch):
    sae, stats = sae_and_stats("topk", POST)
    whole = run_engine(sae, stats, [0, 1, 2], batch_size=64)
    monkeypatch.setattr(engine, "ROW_CHUNK_BYTES", 3 * D_VOCAB * 4)
    monkeypatch.setattr(engine, "CLEAN_CACHE_BYTES", N_CTX * D_VOCAB * 4)
    chunked = run_engine(sae, stats, [0, 1, 2], batch_size=3)
    np.testing.assert_allclose(chunked.effect, whole.effect, rtol=1e-5)
    np.testing.assert_allclose(chunked.null_per_draw, whole.null_per_draw, rtol=1e-5)


def test_7_memory_budget_is_a_setting(monkeypatch):
    """The budget bounds the logits held at once (2/3 clean block, 1/3 intervened chunk) and
    never changes the numbers; the CPU default is the cache-sized pair of constants."""
    assert engine.memory_budget("cpu") == (engine.CLEAN_CACHE_BYTES, engine.ROW_CHUNK_BYTES)
    assert engine.memory_budget("cpu", 3 * 2**20) == (2 * 2**20, 2**20)
    with pytest.raises(ValueError, match="memory budget must be positive"):
        engine.memory_budget("cpu", 0)
    sae, stats = sae_and_stats("standard", POST)
    whole = run_engine(sae, stats, [0, 1, 2], batch_size=64)
    seen = []
    unembed = tail.logits
    monkeypatch.setattr(tail, "logits", lambda m, h: seen.append(h.shape[0]) or unembed(m, h))
    budget = 3 * 4 * D_VOCAB * 4  # 8 clean rows' logits, 4 intervened rows at once
    small = run_engine(sae, stats, [0, 1, 2], batch_size=64, memory_budget_bytes=budget)
    assert max(seen) == 4
    np.testing.assert_allclose(small.effect, whole.effect, rtol=1e-5)
    np.testing.assert_allclose(small.null_per_draw, whole.null_per_draw, rtol=1e-5)


def test_7_kl_is_accurate_for_tiny_effects():
    """kl_rows keeps ~1e-12 accuracy where float32 log-softmax differences have ~1e-6 noise."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 262_144, generator=gen) * 3
    logits = clean + 1e-3 * torch.randn(4, 262_144, generator=gen) + 5.0  # shift: same dist.
    exact = torch.nn.functional.kl_div(
        logits.double().log_softmax(-1),
        clean.double().log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    assert exact.max() < 1e-5
    np.testing.assert_allclose(tail.kl_rows(clean, logits), exact, rtol=1e-4, atol=1e-12)
    # clean rows given as float32 log-probabilities (whose exp sums to 1 only within ~1e-6),
    # logits far from normalised as a real model's: still ~1e-10 absolute at KL ~5e-7
    clean_log_probs = clean.log_softmax(-1)
    got = tail.kl_rows(clean_log_probs, logits + 30.0, clean_normalised=True)
    np.testing.assert_allclose(got, exact, rtol=1e-3, atol=1e-12)


# 8. bad inputs raise one-line ValueErrors
def test_8_bad_inputs_raise_one_line_errors():
    model = tiny_model()
    sae, stats = sae_and_stats("standard", POST)
    toks = eval_tokens()

    def error(**kw) -> str:
        args = {"model": model, "sae": sae, "tokens": toks, "latents": [0], "stats": stats}
        args.update(kw)
        with pytest.raises(ValueError) as info:
            iv.latent_effects(**args, bos_token_id=BOS, progress=False)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "unknown intervention 'ablate'; choose one of zero, mean, resample, steer" in error(
        intervention="ablate"
    )
    assert "latent index 48 out of range" in error(latents=[1, 48])
    assert "latent index -1 out of range" in error(latents=[-1])
    assert "SAE d_in=16 does not match" in error(sae=make_sae("standard", POST, d_in=16))
    assert "hook 'blocks.9.hook_resid_post' is not in the model" in error(
        sae=make_sae("standard", "blocks.9.hook_resid_post")
    )
    assert "no tokens" in error(tokens=torch.zeros(0, N_CTX, dtype=torch.long))
    broken = HookedTransformer(tiny_model().cfg)
    with torch.no_grad():
        broken.blocks[0].mlp.W_in.fill_(float("nan"))
    assert f"model produced NaN activations at {POST}" in error(model=broken)


# 9. several nulls in one run
def test_9_several_nulls_in_one_run_equal_separate_runs():
    """Each null of a joint run gives exactly the numbers of a run with that null alone (its
    own random stream), and the real effect is computed once for all."""
    sae, stats = sae_and_stats("topk", POST)
    joint = run_engine(sae, stats, [0, 5, 11], null="matched,isotropic,covariance", null_draws=3)
    assert joint.nulls == ("matched", "isotropic", "covariance")
    assert joint.null_effects.shape == (3, 2, 3, 3)
    for null in joint.nulls:
        alone = run_engine(sae, stats, [0, 5, 11], null=null, null_draws=3)
        np.testing.assert_allclose(joint.effect, alone.effect, rtol=1e-5)
        np.testing.assert_allclose(
            joint.for_null(null).null_per_draw, alone.null_per_draw, rtol=1e-5, atol=1e-12
        )
    assert not np.allclose(
        joint.for_null("matched").null_per_draw, joint.for_null("isotropic").null_per_draw
    )
    with pytest.raises(ValueError, match="unknown null 'gaussian'"):
        run_engine(sae, stats, [0], null="gaussian")


# 10. a half-precision model: perturbations added in float32, KL from float32 logits
def test_10_bfloat16_model_gives_the_float32_effects_within_tolerance():
    """The same weights in bfloat16 against float32: bfloat16 keeps 8 bits of mantissa, so the
    model's own rounding moves single small per-sequence KLs by up to ~26% here, a latent's
    mean effect by ~2% and its NCES by ~7%. Stated tolerances: 30%, 5% and 15%."""
    model32 = tiny_model()
    cfg = model32.cfg.to_dict() | {"dtype": torch.bfloat16}
    model16 = HookedTransformer(HookedTransformerConfig(**cfg))
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    model16.eval()
    sae = make_sae("standard", POST)
    latents = [0, 5, 11, 20]
    kw = dict(bos_token_id=BOS, progress=False, null_draws=3, seqs_per_latent=3, batch_size=8)
    results = {}
    for name, model in (("fp32", model32), ("bf16", model16)):
        stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
        effects = iv.latent_effects(model, sae, eval_tokens(), latents, stats, **kw)
        results[name] = (effects, effects_details(effects, n_resamples=50))
    (e32, d32), (e16, d16) = results["fp32"], results["bf16"]
    np.testing.assert_array_equal(e32.sequences, e16.sequences)
    np.testing.assert_allclose(e16.effect, e32.effect, rtol=0.3)  # measured: up to 0.26
    np.testing.assert_allclose(d16["effect_kl"], d32["effect_kl"], rtol=0.05)  # 0.019
    np.testing.assert_allclose(d16["nces"], d32["nces"], rtol=0.15)  # 0.068
    assert e16.effect.dtype == np.float64 and np.nanmin(e16.effect) > 0


# 11. the tail after a clean prefix: rotary, grouped-query, sliding-window attention
@functools.cache
def tiny_gemma3() -> HookedTransformer:
    """A random 3-layer model of Gemma 3's architecture (rotary with local and global bases,
    one key-value head, query/key norms, a sliding window shorter than the context)."""
    return make_tiny_model(
        n_layers=3,
        n_key_value_heads=1,
        d_vocab=D_VOCAB,
        n_ctx=32,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        rotary_base=10_000,
        rotary_base_local=100,
        use_qk_norm=True,
        use_normalization_before_and_after=True,
        gated_mlp=True,
        final_rms=True,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global", "local"],
        original_architecture="Gemma3ForCausalLM",
        default_prepend_bos=True,
    )


@pytest.mark.parametrize("hook", [POST, MLP_OUT])
def test_11_tail_after_clean_prefix_equals_naive_on_gemma3_architecture(hook, monkeypatch):
    model = tiny_gemma3()
    sae = make_sae("topk", hook)
    stats = iv.reference_stats(model, sae, reference_tokens(), bos_token_id=BOS)
    starts = []
    prefix = tail.prefix_kv_cache

    def recording_prefix(cache, rows, length):
        starts.append(length)
        return prefix(cache, rows, length)

    monkeypatch.setattr(engine, "prefix_kv_cache", recording_prefix)
    effects = iv.latent_effects(
        model,
        sae,
        eval_tokens(),
        [0, 5, 11, 20],
        stats,
        null_draws=2,
        seqs_per_latent=2,
        batch_size=3,
        bos_token_id=BOS,
        progress=False,
    )
    assert max(starts) > 1  # the prefix was reused, past the first scored position
    effect, null = naive_arrays(model, sae, effects, stats)
    np.testing.assert_allclose(effects.effect, effect, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(effects.null_per_draw, null, rtol=1e-4, atol=1e-9)
