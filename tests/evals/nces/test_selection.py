"""Latent selection (``csae_plugin/evals/nces/selection.py``): the sample stratified by the
second-order screen, ``auto``'s resolution, and ``screen:N`` through the eval."""

from __future__ import annotations

import numpy as np
from conftest import standard_sae
from eval_setup import run, tiny_config

from csae_plugin.evals.nces.selection import resolve_latents, stratified_by_screen


def test_stratified_sample_spans_the_screen_and_gives_every_latent_the_same_chance():
    scores = np.r_[np.linspace(0.1, 5, 90), [np.nan] * 10]  # 10 never fired on the screen
    rng = np.random.default_rng(0)
    scores = scores[rng.permutation(100)]
    picked = stratified_by_screen(scores, 10, seed=3)
    assert len(set(picked)) == 10 and list(picked) == sorted(picked)
    ranks = np.argsort(np.argsort(np.where(np.isnan(scores), np.inf, scores)))
    assert sorted(ranks[picked] // 10) == list(range(10))  # one per decile of the ranking
    counts = np.zeros(100)
    for seed in range(400):
        counts[stratified_by_screen(scores, 10, seed)] += 1
    assert counts.min() > 15 and counts.max() < 70  # each latent ~40 times in 400 draws
    assert resolve_latents("auto", 512) == "all"
    assert resolve_latents("auto", 513) == "screen:256"
    assert resolve_latents([3, 4], 4096) == [3, 4]


def test_screen_latents_run_the_exact_test_on_a_sample_and_report_the_screen(tmp_path):
    results = run(tmp_path, standard_sae(), tiny_config(latents="screen:8", screen_sequences=6))
    result = results["tiny/release_custom_sae"]
    assert len(result["eval_result_details"]) == 8
    screen = result["eval_result_unstructured"]["screen"]
    assert len(screen["effect"]) == len(screen["nces"]) == 64
    assert "not NCES" in screen["definition"]
    scored = [row["latent"] for row in result["eval_result_details"]]
    nces = np.array([np.nan if v is None else v for v in screen["nces"]])
    ranks = np.argsort(np.argsort(np.where(np.isnan(nces), np.inf, nces)))
    assert sorted(ranks[scored] // 8) == list(range(8))  # one per eighth of the screen's ranking
