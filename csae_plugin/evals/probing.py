"""Causal consistency by targeted probing: do the latents that *predict* a concept *cause* it?

A concept is a class of next tokens read off the text itself (the next token is a digit, an
opening parenthesis, the first word of a sentence), so "the model's prediction of the concept"
is the model's log-probability mass on that class. For each concept:

1. **Probe** (training tokens): every latent gets a univariate score, the standardised mean
   difference (Cohen's d) of its activation f_i between positive and negative positions; the
   top ``top_m`` latents with a positive score are the concept's probe latents.
2. **Effect** (evaluation tokens): the probe latents are zeroed together at every non-BOS
   position with the SAE's error term kept (x' = x + D(f') - D(f)), and the drop of
   log sum_{v in concept} p(v) is averaged over the positive positions of each sequence.
3. **Null**: the same for ``random_draws`` sets of firing-rate-matched random latents (each
   probe latent replaced by one of its ``match_pool`` nearest non-probe latents in firing
   frequency on the probe tokens).

The consistency of an SAE on a concept is ``ratio = mean drop_probe / mean drop_random`` and
``difference = mean (drop_probe - drop_random)`` over sequences, with paired bootstrap CIs over
sequences; the per-SAE score is the geometric mean of the ratios over concepts, its CI from a
joint bootstrap of the evaluation sequences. Works for any SAELens SAE (``encode``/``decode``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from csae_plugin.causal.bootstrap import bootstrap_interval
from csae_plugin.causal.tail import (
    HookPlan,
    capture,
    encode,
    logits,
    padding_masks,
    plan_for_sae,
    run_tail,
)
from csae_plugin.evals.concepts import (
    Concept,
    concept_positions,
    default_concepts,
    scored_positions,
)

CONCEPT_COLUMNS = (
    "concept",
    "n_probe_positive",
    "n_eval_sequences",
    "n_eval_positive",
    "n_probe_latents",
    "drop_probe",
    "drop_random",
    "ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "difference",
    "difference_ci_low",
    "difference_ci_high",
    "consistent",
)
"""Columns of :attr:`ProbingResult.concepts`, one row per concept."""


@dataclass
class ProbeStats:
    """Probe scores of every latent for every concept, on the probe (training) tokens.

    ``scores[c, i]`` is Cohen's d of f_i between positive and negative positions of concept c
    (NaN without both); ``firing_freq[i]`` the fraction of non-BOS tokens where f_i > 0.
    """

    concepts: list[str]
    scores: np.ndarray
    firing_freq: np.ndarray
    n_positive: np.ndarray
    n_scored: int


def probe_stats(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    concepts: Sequence[Concept],
    *,
    batch_size: int = 8,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> ProbeStats:
    """Stream ``tokens`` [n, T] through the model and SAE once and score every latent."""
    plan = plan_for_sae(model, sae)
    bos = _bos(model, bos_token_id)
    d_sae, n_c = sae.cfg.d_sae, len(concepts)
    pos_sum = np.zeros((n_c, d_sae))
    pos_sq = np.zeros((n_c, d_sae))
    n_pos = np.zeros(n_c)
    all_sum = np.zeros(d_sae)
    all_sq = np.zeros(d_sae)
    fires = np.zeros(d_sae)
    n_scored = n_valid = 0
    with torch.no_grad():
        for batch in tqdm(tokens.split(batch_size), desc="probe", disable=not progress):
            batch = batch.to(model.cfg.device)
            x, _ = capture(model, plan, batch, padding_masks(model, batch)[1])
            f = encode(sae, x)
            valid = _not_bos(batch, bos)
            fires += (f[valid] > 0).sum(0).double().cpu().numpy()
            n_valid += int(valid.sum())
            scored = scored_positions(batch, bos)
            fs = f[scored].double().cpu()  # [positions, d_sae]
            labels = torch.stack([concept_positions(batch, c, bos)[scored] for c in concepts], 1)
            y = labels.double().cpu()
            pos_sum += (y.T @ fs).numpy()
            pos_sq += (y.T @ fs.square()).numpy()
            n_pos += y.sum(0).numpy()
            all_sum += fs.sum(0).numpy()
            all_sq += fs.square().sum(0).numpy()
            n_scored += fs.shape[0]
    if n_scored == 0:
        raise ValueError("no probe tokens: every position is BOS or last in its row")
    scores = _cohens_d(pos_sum, pos_sq, n_pos, all_sum, all_sq, n_scored)
    return ProbeStats(
        concepts=[c.name for c in concepts],
        scores=scores,
        firing_freq=fires / max(n_valid, 1),
        n_positive=n_pos.astype(np.int64),
        n_scored=n_scored,
    )


def select_latents(scores: np.ndarray, top_m: int) -> np.ndarray:
    """The ``top_m`` latents with the highest positive score (fewer if fewer are positive)."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-scores, kind="stable")
    return order[:top_m][scores[order[:top_m]] > 0]


def matched_random_latents(
    firing_freq: np.ndarray,
    chosen: np.ndarray,
    draws: int,
    *,
    pool: int = 5,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """``draws`` sets of random latents [draws, len(chosen)], matched to ``chosen`` one to one.

    For each chosen latent, one latent is drawn uniformly from the ``pool`` non-chosen latents
    nearest to it in firing frequency (ties by index), never repeating within a set.
    """
    freq = np.asarray(firing_freq, dtype=np.float64)
    chosen = np.asarray(chosen, dtype=np.int64)
    candidates = np.setdiff1d(np.arange(len(freq)), chosen)
    if len(candidates) < len(chosen):
        raise ValueError(
            f"cannot match {len(chosen)} latents with {len(candidates)} other latents; "
            "use a smaller top_m"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((draws, len(chosen)), dtype=np.int64)
    for r in range(draws):
        taken: set[int] = set()
        for j, latent in enumerate(chosen):
            free = candidates[~np.isin(candidates, list(taken))]
            nearest = free[np.argsort(np.abs(freq[free] - freq[latent]), kind="stable")[:pool]]
            out[r, j] = rng.choice(nearest)
            taken.add(int(out[r, j]))
    return out


def ablation_drops(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    concept: Concept,
    latent_sets: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Drop of the concept's log mass per sequence for each set of zeroed latents [sets, n].

    Entry ``[k, s]`` is the mean over the positive positions of row s of
    log p_clean(concept) - log p_ablated(concept), with the latents ``latent_sets[k]`` zeroed
    at every non-BOS position and the SAE error kept; NaN for rows without positives. Rows
    are cut after their last positive position (later tokens cannot change it).
    """
    plan = plan_for_sae(model, sae)
    bos = _bos(model, bos_token_id)
    positive = concept_positions(tokens, concept, bos).cpu()
    ids = torch.tensor(
        sorted(i for i in concept.token_ids if i < model.cfg.d_vocab), device=model.cfg.device
    )
    drops = np.full((len(latent_sets), tokens.shape[0]), np.nan)
    rows = positive.any(1).nonzero().squeeze(1)
    last = torch.tensor([int(positive[r].nonzero().max()) + 1 for r in rows], dtype=torch.long)
    order = rows[torch.argsort(last, stable=True)]
    n_var = len(latent_sets) + 1  # variant 0 is the clean forward, through the same code
    per_group = max(1, batch_size // n_var)
    with torch.no_grad():
        for group in tqdm(order.split(per_group), desc=concept.name, disable=not progress):
            length = int(positive[group].nonzero()[:, 1].max()) + 1
            batch = tokens[group, :length].to(model.cfg.device)
            pos = positive[group, :length].to(model.cfg.device)
            mass = _ablated_log_mass(model, sae, plan, batch, pos, latent_sets, ids, bos)
            counts = pos.sum(1).cpu()
            for k in range(1, n_var):
                diff = torch.zeros(len(group), dtype=torch.float64)
                per_pos = (mass[0] - mass[k]).double().cpu()
                diff.index_add_(0, pos.nonzero()[:, 0].cpu(), per_pos)
                drops[k - 1, group.numpy()] = (diff / counts).numpy()
    return drops


@dataclass
class ProbingResult:
    """Everything a probing run measured for one SAE.

    ``concepts``: one row per concept (:data:`CONCEPT_COLUMNS`). ``latents``: the probe latents
    and their matched random latents. ``summary``: the per-SAE score (``ratio_geomean`` with
    CI, ``difference_mean`` with CI) and the settings. ``drop_probe`` [concepts, n_eval] and
    ``drop_random`` [concepts, draws, n_eval] hold the per-sequence drops (NaN where a sequence
    has no positive position).
    """

    concepts: pd.DataFrame
    latents: pd.DataFrame
    summary: dict[str, float | int | str]
    drop_probe: np.ndarray
    drop_random: np.ndarray
    probe: ProbeStats = field(repr=False)


def probing_consistency(
    model: HookedTransformer,
    sae: SAE,
    probe_tokens: torch.Tensor,
    eval_tokens: torch.Tensor,
    concepts: Sequence[Concept] | None = None,
    *,
    top_m: int = 8,
    random_draws: int = 8,
    match_pool: int = 5,
    batch_size: int = 16,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> ProbingResult:
    """Probe latents on ``probe_tokens`` (training split), ablate them on ``eval_tokens``.

    ``concepts`` defaults to :func:`default_concepts` of the model's tokenizer.
    ``batch_size`` counts sequence copies per forward (clean + probe + random variants).
    """
    if top_m < 1 or random_draws < 1 or match_pool < 1:
        raise ValueError(
            f"top_m={top_m}, random_draws={random_draws} and match_pool={match_pool} "
            "must all be >= 1"
        )
    if concepts is None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: pass concepts explicitly")
        concepts = default_concepts(model.tokenizer)
    concepts = list(concepts)
    bos = _bos(model, bos_token_id)
    probe = probe_stats(
        model,
        sae,
        probe_tokens,
        concepts,
        batch_size=batch_size,
        bos_token_id=bos,
        progress=progress,
    )
    n_eval = eval_tokens.shape[0]
    drop_probe = np.full((len(concepts), n_eval), np.nan)
    drop_random = np.full((len(concepts), random_draws, n_eval), np.nan)
    latent_rows = []
    for c, concept in enumerate(concepts):
        chosen = select_latents(probe.scores[c], top_m)
        if len(chosen) == 0:
            continue
        randoms = matched_random_latents(
            probe.firing_freq, chosen, random_draws, pool=match_pool, seed=[seed, c]
        )
        sets = [chosen, *randoms]
        drops = ablation_drops(
            model,
            sae,
            eval_tokens,
            concept,
            sets,
            batch_size=batch_size,
            bos_token_id=bos,
            progress=progress,
        )
        drop_probe[c], drop_random[c] = drops[0], drops[1:]
        for rank, latent in enumerate(chosen):
            latent_rows.append(
                {
                    "concept": concept.name,
                    "rank": rank,
                    "latent": int(latent),
                    "score": float(probe.scores[c, latent]),
                    "firing_freq": float(probe.firing_freq[latent]),
                    "random_latents": randoms[:, rank].tolist(),
                    "random_firing_freq": probe.firing_freq[randoms[:, rank]].tolist(),
                }
            )
    eval_positive = [
        int(concept_positions(eval_tokens, concept, bos).sum()) for concept in concepts
    ]
    table = consistency_table(
        [c.name for c in concepts],
        drop_probe,
        drop_random,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        seed=seed,
    )
    table["n_probe_positive"] = probe.n_positive
    table["n_eval_positive"] = eval_positive
    table["n_probe_latents"] = [sum(r["concept"] == c.name for r in latent_rows) for c in concepts]
    summary = {
        **aggregate_consistency(drop_probe, drop_random, confidence_level, n_resamples, seed),
        "top_m": top_m,
        "random_draws": random_draws,
        "match_pool": match_pool,
        "n_probe_sequences": int(probe_tokens.shape[0]),
        "n_eval_sequences": int(n_eval),
        "context_size": int(eval_tokens.shape[1]),
        "probe_score": "cohens_d",
        "seed": seed,
    }
    return ProbingResult(
        concepts=table[list(CONCEPT_COLUMNS)],
        latents=pd.DataFrame(latent_rows),
        summary=summary,
        drop_probe=drop_probe,
        drop_random=drop_random,
        probe=probe,
    )


def consistency_table(
    names: Sequence[str],
    drop_probe: np.ndarray,
    drop_random: np.ndarray,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-concept ratio and difference of mean drops, with paired bootstrap CIs over sequences.

    ``drop_probe`` is [concepts, n] and ``drop_random`` [concepts, draws, n] (NaN where a
    sequence has no positive). See :func:`drop_ratio` for when the ratio is infinite or
    undefined; its CI is a percentile bootstrap (NaN for an undefined ratio; undefined
    resamples count as -inf, i.e. no consistency), the difference's a BCa bootstrap (scipy).
    ``consistent``: the ratio's CI lies above 1.
    """
    rows = []
    for c, name in enumerate(names):
        keep = ~np.isnan(drop_probe[c])
        p, r = drop_probe[c][keep], drop_random[c][:, keep].mean(0)
        ratio = drop_ratio(p.mean(), r.mean()) if len(p) else np.nan
        ratio_ci = (np.nan, np.nan)
        if len(p) >= 2 and not np.isnan(ratio):
            idx = _resample_indices(len(p), n_resamples, seed)
            ratio_ci = _percentile_ci(
                drop_ratio(p[idx].mean(-1), r[idx].mean(-1)), confidence_level
            )
        diff_ci = bootstrap_interval((p, r), _mean_difference, confidence_level, n_resamples, seed)
        empty = len(p) == 0
        rows.append(
            {
                "concept": name,
                "n_eval_sequences": int(keep.sum()),
                "drop_probe": np.nan if empty else float(p.mean()),
                "drop_random": np.nan if empty else float(r.mean()),
                "ratio": float(ratio),
                "ratio_ci_low": ratio_ci[0],
                "ratio_ci_high": ratio_ci[1],
                "difference": np.nan if empty else float(_mean_difference(p, r)),
                "difference_ci_low": diff_ci[0],
                "difference_ci_high": diff_ci[1],
                "consistent": bool(ratio_ci[0] > 1),
            }
        )
    return pd.DataFrame(rows)


def drop_ratio(drop_probe: np.ndarray | float, drop_random: np.ndarray | float) -> np.ndarray:
    """mean drop_probe / mean drop_random, elementwise.

    +inf where random ablations do not lower the mass on average but the probe's do; NaN
    where neither does (the ratio says nothing there).
    """
    p, r = np.asarray(drop_probe, dtype=np.float64), np.asarray(drop_random, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, p / r, np.where(p > 0, np.inf, np.nan))


def ratio_geomean(ratios: np.ndarray) -> np.ndarray:
    """Geometric mean over concepts (axis 0) of ratios, each clipped at 0.

    A concept whose ratio is negative or undefined (its probe latents do not lower the mass)
    counts as 0, which makes the geometric mean 0: every concept must pass.
    """
    clipped = np.nan_to_num(np.asarray(ratios, dtype=np.float64), nan=0.0, posinf=np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.maximum(clipped, 0.0))
        return np.where((logs == -np.inf).any(0), 0.0, np.exp(logs.mean(0)))


def aggregate_consistency(
    drop_probe: np.ndarray,
    drop_random: np.ndarray,
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Per-SAE score: :func:`ratio_geomean` over concepts, and the mean of the differences.

    CIs (percentile) come from one bootstrap of the evaluation sequences shared by all
    concepts (the same resampled rows for every concept).
    """
    probe = np.asarray(drop_probe, dtype=np.float64)  # [concepts, n]
    random = np.asarray(drop_random, dtype=np.float64).mean(1)

    def scores(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p, r = np.nanmean(probe[:, idx], -1), np.nanmean(random[:, idx], -1)
        return ratio_geomean(drop_ratio(p, r)), (p - r).mean(0)

    n = probe.shape[1]
    geomean, difference = scores(np.arange(n))
    out: dict[str, float] = {"ratio_geomean": float(geomean), "difference_mean": float(difference)}
    low_high = {"ratio_geomean": (np.nan, np.nan), "difference_mean": (np.nan, np.nan)}
    if n >= 2:
        boot_geomean, boot_difference = scores(_resample_indices(n, n_resamples, seed))
        low_high["ratio_geomean"] = _percentile_ci(boot_geomean, confidence_level)
        low_high["difference_mean"] = _percentile_ci(boot_difference, confidence_level, nan=None)
    for name, (low, high) in low_high.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    out["n_concepts"] = int(probe.shape[0])
    return out


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of ``n`` sequence indices [n_resamples, n]."""
    return np.random.default_rng(seed).integers(n, size=(n_resamples, n))


def _percentile_ci(
    samples: np.ndarray, confidence_level: float, nan: float | None = -np.inf
) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` (no interpolation, so +-inf are kept).

    NaN samples count as ``nan`` (default -inf), or are dropped when ``nan`` is None.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = (
        samples[~np.isnan(samples)] if nan is None else np.where(np.isnan(samples), nan, samples)
    )
    if len(samples) == 0:
        return np.nan, np.nan
    alpha = (1 - confidence_level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha], method="inverted_cdf")
    return float(low), float(high)


def _mean_difference(p: np.ndarray, r: np.ndarray, axis: int = -1) -> np.ndarray:
    return (p - r).mean(axis=axis)


def _cohens_d(
    pos_sum: np.ndarray,
    pos_sq: np.ndarray,
    n_pos: np.ndarray,
    all_sum: np.ndarray,
    all_sq: np.ndarray,
    n_all: int,
) -> np.ndarray:
    """(mean_pos - mean_neg) / pooled std per [concept, latent]; +-inf for zero spread."""
    n1 = n_pos[:, None]
    n0 = n_all - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean1 = pos_sum / n1
        mean0 = (all_sum - pos_sum) / n0
        ss1 = np.maximum(pos_sq - n1 * mean1**2, 0.0)
        ss0 = np.maximum((all_sq - pos_sq) - n0 * mean0**2, 0.0)
        pooled = np.sqrt((ss1 + ss0) / (n_all - 2))
        diff = mean1 - mean0
        d = np.where(diff == 0, 0.0, diff / pooled)
    return np.where((n1 > 0) & (n0 > 0), d, np.nan)


def _bos(model: HookedTransformer, bos_token_id: int | None) -> int | None:
    if bos_token_id is not None or model.tokenizer is None:
        return bos_token_id
    return model.tokenizer.bos_token_id


def _not_bos(tokens: torch.Tensor, bos: int | None) -> torch.Tensor:
    return torch.ones_like(tokens, dtype=torch.bool) if bos is None else tokens != bos


def _ablated_log_mass(
    model: HookedTransformer,
    sae: SAE,
    plan: HookPlan,
    tokens: torch.Tensor,
    positive: torch.Tensor,
    latent_sets: Sequence[np.ndarray],
    ids: torch.Tensor,
    bos: int | None,
) -> torch.Tensor:
    """log p(concept) at the positive positions [1 + sets, n_positive]; row 0 is clean."""
    _, mask = padding_masks(model, tokens)
    x, start_input = capture(model, plan, tokens, mask)
    f = encode(sae, x)
    rec = sae.decode(f)
    valid = _not_bos(tokens, bos)
    spliced = [x]
    for latents in latent_sets:
        f_new = f.clone()
        index = torch.as_tensor(np.asarray(latents, dtype=np.int64), device=f.device)
        f_new[..., index] = torch.where(valid[..., None], 0.0, f_new[..., index])
        delta = (sae.decode(f_new) - rec).reshape(x.shape)
        spliced.append(x + delta.to(x.dtype))
    n = len(spliced)
    starts = start_input.repeat(n, *([1] * (start_input.ndim - 1)))
    h = run_tail(
        model, plan, starts, torch.cat(spliced), None if mask is None else mask.repeat(n, 1)
    )
    out = logits(model, h[positive.repeat(n, 1)])
    mass = out[:, ids].logsumexp(-1) - out.logsumexp(-1)
    return mass.reshape(n, -1)
