"""Targeted probing: concept labels, the probe, ablation drops, matched random latents, and
reproducibility, on the tiny offline model."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BOS, D_MODEL, HOOK, make_tiny_model, make_tokens
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from csae_plugin.evals import probing as pr

CUE, TARGET = 7, 9  # TARGET always follows CUE, so "next token is TARGET" is visible at CUE
D_SAE = 24
PLANTED = 5  # reads hook_embed and fires exactly at CUE tokens
NINE = pr.Concept("nine", frozenset({TARGET}))


class FakeTokenizer:
    """Just what :func:`default_concepts` reads from a Hugging Face tokenizer."""

    def __init__(self, vocabulary: list[str]):
        self.vocabulary = vocabulary
        self.all_special_ids = [0, 1]

    def __len__(self) -> int:
        return len(self.vocabulary)

    def batch_decode(self, ids: list[list[int]], **kw: object) -> list[str]:
        return ["".join(self.vocabulary[i] for i in row) for row in ids]


@functools.cache
def cued_tokens(n_seq: int = 64, seed: int = 0) -> torch.Tensor:
    """Random rows with two CUE, TARGET pairs each; CUE and TARGET occur nowhere else."""
    tokens = make_tokens(n_seq, seed)
    tokens[(tokens == CUE) | (tokens == TARGET)] = 8
    gen = torch.Generator().manual_seed(seed + 1)
    for row in range(n_seq):
        for t in torch.randint(1, tokens.shape[1] - 1, (2,), generator=gen).tolist():
            tokens[row, t], tokens[row, t + 1] = CUE, TARGET
    return tokens


@functools.cache
def tiny_model():
    return make_tiny_model()


def make_sae(hook: str = HOOK, seed: int = 0) -> StandardSAE:
    """A StandardSAE whose random latents fire on about half of the tokens."""
    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook))
    sae = StandardSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, D_SAE, generator=gen))
        sae.W_dec.copy_(sae.W_enc.T / 4)
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    return sae


def planted_sae() -> StandardSAE:
    """Reads the token embedding; latent PLANTED fires (value 1) exactly at CUE tokens."""
    model = tiny_model()
    sae = make_sae("hook_embed")
    w_e = model.W_E.detach()
    direction = w_e[CUE] / w_e[CUE].norm() ** 2
    others = torch.cat([w_e[:CUE], w_e[CUE + 1 :]]) @ direction
    with torch.no_grad():
        sae.W_enc[:, PLANTED] = direction
        sae.b_enc[PLANTED] = -float(others.max() + 1) / 2
    return sae


def test_1_labels_on_a_hand_made_sequence():
    vocabulary = ["<pad>", "<bos>", ".", "  ", "The", " The", "io", "Bytes", "(", " (", "1"]
    vocabulary += ["2", "x", " x", ")", ","]
    tok = FakeTokenizer(vocabulary)
    concepts = {c.name: c for c in pr.default_concepts(tok)}
    index = {text: i for i, text in enumerate(vocabulary)}
    text = "<bos>|1|io|.|Bytes|(|x|,|x|)|.|  |The| (|1|2|.| The".split("|")
    tokens = torch.tensor([[index[t] for t in text]])
    expected = {
        "digit": [13, 14],  # not 0: position 0 is BOS, never labelled
        "code_paren": [4],  # "Bytes" -> "(" ; the spaced " (" at 13 is prose
        "sentence_start": [11, 16],  # ".  The" and ". The"; "io.Bytes" is not a sentence
        "close_paren": [8],
        "comma": [6],
        "attribute": [3],  # "io." -> "Bytes"; ".  " and ". The" are not attributes
    }
    for name, positions in expected.items():
        got = pr.concept_positions(tokens, concepts[name], bos_token_id=index["<bos>"])
        assert got[0].nonzero().squeeze(1).tolist() == positions, name
    assert not pr.scored_positions(tokens, index["<bos>"])[0, [0, -1]].any()


def test_2_probe_score_is_cohens_d():
    model, sae, tokens = tiny_model(), make_sae(), cued_tokens()[:16]
    stats = pr.probe_stats(model, sae, tokens, [NINE], bos_token_id=BOS)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    f = sae.encode(cache[HOOK]).detach().double()
    scored = pr.scored_positions(tokens, BOS)
    labels = pr.concept_positions(tokens, NINE, BOS)[scored].numpy()
    fs = f[scored].numpy()
    pos, neg = fs[labels], fs[~labels]
    pooled = np.sqrt(
        ((len(pos) - 1) * pos.var(0, ddof=1) + (len(neg) - 1) * neg.var(0, ddof=1)) / (len(fs) - 2)
    )
    np.testing.assert_allclose(stats.scores[0], (pos.mean(0) - neg.mean(0)) / pooled, rtol=1e-6)
    fires = (f[tokens != BOS] > 0).double().mean(0).numpy()
    np.testing.assert_allclose(stats.firing_freq, fires)


def test_3_probe_picks_the_planted_latent():
    model, sae, tokens = tiny_model(), planted_sae(), cued_tokens()[:32]
    stats = pr.probe_stats(model, sae, tokens, [NINE], bos_token_id=BOS)
    f = sae.encode(model.W_E[tokens]).detach()
    assert torch.equal(f[..., PLANTED] > 0, tokens == CUE)  # fires exactly at positives
    assert pr.select_latents(stats.scores[0], 3)[0] == PLANTED


@pytest.mark.parametrize("inert", ["zero_decoder", "never_fires"])
def test_4_ablating_latents_that_change_nothing_drops_nothing(inert):
    model, sae, tokens = tiny_model(), make_sae(), cued_tokens()[32:]
    latents = np.array([2, 3, 11])
    with torch.no_grad():
        if inert == "zero_decoder":
            sae.W_dec[latents] = 0.0
        else:
            sae.b_enc[latents] = -1e6
    active = np.array([0, 1, 4])
    drops = pr.ablation_drops(model, sae, tokens, NINE, [latents, active], bos_token_id=BOS)
    assert np.isfinite(drops).all()  # every row has a positive position
    np.testing.assert_allclose(drops[0], 0.0, atol=1e-6)
    assert np.abs(drops[1]).max() > 1e-3  # the same machinery sees real ablations


def test_5_drops_equal_a_naive_hooked_forward():
    model, sae, tokens = tiny_model(), make_sae(), cued_tokens()[32:40]
    latents = np.array([0, 4, 9])
    drops = pr.ablation_drops(model, sae, tokens, NINE, [latents], batch_size=4, bos_token_id=BOS)

    def splice(act: torch.Tensor, hook: object) -> torch.Tensor:
        f = sae.encode(act)
        f_new = f.clone()
        f_new[:, 1:, latents] = 0.0
        return act + sae.decode(f_new) - sae.decode(f)

    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)[..., TARGET]
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice)])
        ablated = ablated.log_softmax(-1)[..., TARGET]
    positive = pr.concept_positions(tokens, NINE, BOS)
    naive = [float((clean - ablated)[r][positive[r]].mean()) for r in range(len(tokens))]
    np.testing.assert_allclose(drops[0], naive, atol=1e-5)


def test_6_matched_random_latents_are_close_in_frequency_and_never_chosen():
    rng = np.random.default_rng(0)
    freq = rng.uniform(0, 0.2, 200)
    chosen = np.array([3, 50, 51, 120, 199])
    pool = 4
    random = pr.matched_random_latents(freq, chosen, 16, pool=pool, seed=1)
    assert random.shape == (16, len(chosen))
    assert not np.isin(random, chosen).any()
    assert all(len(set(row)) == len(chosen) for row in random)  # distinct within a draw
    others = np.setdiff1d(np.arange(200), chosen)
    for j, latent in enumerate(chosen):
        gaps = np.sort(np.abs(freq[others] - freq[latent]))
        bound = gaps[pool - 1 + j]  # the pool nearest, widened by the j latents taken before
        assert (np.abs(freq[random[:, j]] - freq[latent]) <= bound).all()
    assert len(np.unique(random)) > len(chosen)  # actually random, not always the nearest


def test_7_same_seed_gives_the_same_numbers():
    model, sae, tokens = tiny_model(), planted_sae(), cued_tokens()
    even = pr.Concept("even", frozenset(range(2, 64, 2)))

    def run(seed: int) -> pr.ProbingResult:
        return pr.probing_consistency(
            model,
            sae,
            tokens[:32],
            tokens[32:],
            [NINE, even],
            top_m=3,
            random_draws=3,
            n_resamples=200,
            seed=seed,
            bos_token_id=BOS,
            progress=False,
        )

    first, again, other = run(0), run(0), run(1)
    pd.testing.assert_frame_equal(first.concepts, again.concepts)
    pd.testing.assert_frame_equal(first.latents, again.latents)
    np.testing.assert_equal(first.summary, again.summary)
    np.testing.assert_array_equal(first.drop_random, again.drop_random)
    assert list(first.concepts.columns) == list(pr.CONCEPT_COLUMNS)
    assert not first.latents["random_latents"].equals(other.latents["random_latents"])


def test_8_ratio_conventions():
    ratio = pr.drop_ratio(np.array([2.0, 1.0, -1.0, -1.0]), np.array([0.5, 0.0, 0.5, -0.5]))
    np.testing.assert_array_equal(ratio, [4.0, np.inf, -2.0, np.nan])
    geomean = pr.ratio_geomean(np.array([[4.0, 4.0, np.inf], [1.0, -2.0, 2.0]]))
    np.testing.assert_array_equal(geomean, [2.0, 0.0, np.inf])  # a failing concept gives 0
