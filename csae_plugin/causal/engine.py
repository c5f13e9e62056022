"""Causal interventions on single SAE latents, and their effect on the model's output.

The engine behind NCES (``docs/nces.md``). For each evaluated latent it takes the
sequences in which the latent fires, changes only that latent (``zero``, ``mean``, ``resample``
or ``steer``) with the SAE's error term kept, and measures KL(p_clean || p_intervened) over the
positions from the first intervened one on. The null applies perturbations of the same size at
the same positions along random directions (:data:`NULLS`): by default ones with the latent's
own energy in each principal direction of the activations, randomised within.

Many intervened copies (latents x sequences x {real, K null}) run at once through only the tail
of the model after the hook (:mod:`csae_plugin.causal.tail`), and the KL is reduced one chunk
of positions at a time, so peak memory depends on ``batch_size`` and the vocabulary, never on
the number of latents.
:func:`csae_plugin.causal.naive.naive_latent_effect` is the slow reference (one full hooked forward per variant) the
engine is tested against number for number.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from csae_plugin.causal.inputs import EngineInputs, capture_rows, prepare_inputs
from csae_plugin.causal.interventions import (
    DEFAULT_NULL,
    check_intervention,
    check_nulls,
    decoder_directions,
    intervened_positions,
    latent_null_directions,
    resample_values,
)
from csae_plugin.causal.reference_stats import ReferenceStats
from csae_plugin.causal.tail import (
    empty_kv_cache,
    encode,
    log_probs,
    mean_kl,
    prefix_kv_cache,
    reuses_prefix,
    run_tail,
)

CLEAN_CACHE_BYTES = 512 * 2**20
"""CPU default budget for the clean logits kept per block of sequences (bounds sequences per
block): sized to stay near the CPU's caches."""

ROW_CHUNK_BYTES = 256 * 2**20
"""CPU default budget for one chunk of intervened logits [rows, d_vocab] (bounds rows per
unembedding)."""

GPU_MEMORY_FRACTION = 0.4
"""Default budget on a GPU: this fraction of its free memory when the run starts (at most
``GPU_MEMORY_CAP``), as 2/3 clean logits and 1/3 intervened logits, like the CPU defaults."""

GPU_MEMORY_CAP = 24 * 2**30


def memory_budget(device: torch.device | str, budget_bytes: int | None = None) -> tuple[int, int]:
    """(clean-block bytes, row-chunk bytes) for the engine's two large buffers.

    ``budget_bytes`` (their sum) if given; otherwise the CPU defaults, or on a GPU a share of
    its free memory, so blocks are GPU-sized there and cache-sized on a CPU.
    """
    device = torch.device(device)
    if budget_bytes is None:
        if device.type != "cuda":
            return CLEAN_CACHE_BYTES, ROW_CHUNK_BYTES
        free, _ = torch.cuda.mem_get_info(device)
        budget_bytes = int(min(free * GPU_MEMORY_FRACTION, GPU_MEMORY_CAP))
    if budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_bytes} bytes")
    return budget_bytes * 2 // 3, budget_bytes // 3


@dataclass
class LatentEffects:
    """Per-latent causal effects: [n_latents, seqs_per_latent] arrays padded with NaN (or -1).

    ``effect[l, j]`` is E_i(s) in nats for latent ``latents[l]`` on token row ``sequences[l, j]``;
    ``null_effects[l, j, n, k]`` the same for draw k of null ``nulls[n]``; ``null_per_draw``
    is the first null's [l, j, k] and ``null`` its mean over draws; ``n_positions[l, j]`` the
    number of intervened positions. A latent with ``n_sequences`` 0 never fired on the tokens
    (dead).
    """

    latents: np.ndarray
    effect: np.ndarray
    null_effects: np.ndarray
    sequences: np.ndarray
    n_positions: np.ndarray
    intervention: str
    null_draws: int
    alpha: float
    nulls: tuple[str, ...] = (DEFAULT_NULL,)

    @property
    def null_per_draw(self) -> np.ndarray:
        """The first null's effects per draw [n_latents, seqs_per_latent, K]."""
        return self.null_effects[:, :, 0, :]

    def for_null(self, null: str) -> LatentEffects:
        """These effects with ``null`` (one of ``nulls``) as the only null."""
        if null not in self.nulls:
            raise ValueError(f"null {null!r} was not run; these effects have {self.nulls}")
        n = self.nulls.index(null)
        return replace(self, null_effects=self.null_effects[:, :, n : n + 1], nulls=(null,))

    @property
    def null(self) -> np.ndarray:
        """Null effect per sequence, averaged over the K draws: E_i^null(s)."""
        return self.null_per_draw.mean(axis=-1)

    @property
    def n_sequences(self) -> np.ndarray:
        """Sequences evaluated per latent (0 = dead on these tokens)."""
        return (self.sequences >= 0).sum(axis=1)


def latent_effects(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    latents: Sequence[int] | torch.Tensor | np.ndarray,
    stats: ReferenceStats,
    *,
    intervention: str = "zero",
    null_draws: int = 8,
    seqs_per_latent: int = 16,
    alpha: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = True,
    null: str | Sequence[str] = DEFAULT_NULL,
    memory_budget_bytes: int | None = None,
    first_sequence: int = 0,
    draw_round: int = 0,
    real: bool = True,
) -> LatentEffects:
    """Effects E_i(s) and null effects of intervening on each of ``latents``, batched.

    Each latent is evaluated on the first ``seqs_per_latent`` rows of ``tokens`` in which it
    fires (at a non-BOS, non-pad position); pass shuffled tokens for a random sample.
    ``batch_size`` is the number of sequence copies per tail forward. ``alpha`` scales the
    ``steer`` intervention (f' = f + alpha * max_act). ``bos_token_id`` defaults to the model
    tokenizer's; position 0 holding it is never intervened nor scored. ``null`` names one or
    more of :data:`NULLS` (a sequence or 'matched,covariance'): each gets ``null_draws``
    copies per sequence, sharing the real copy. ``memory_budget_bytes`` bounds the clean and
    intervened logits held at once (:func:`memory_budget`; default: CPU-cache-sized on a CPU,
    a share of free memory on a GPU); peak memory does not grow with the number of latents.

    For a second round (:mod:`csae_plugin.causal.adaptive`): ``first_sequence`` skips each
    latent's first rows where it fires (those already scored), ``draw_round`` r >= 1 draws
    further independent null directions (:func:`latent_null_directions`), and ``real=False``
    leaves the latent's own copies out (``effect`` stays NaN).
    """
    check_intervention(intervention)
    nulls = check_nulls(null)
    setup = prepare_inputs(model, sae, tokens, bos_token_id)
    latent_ids = _check_latents(latents, sae.cfg.d_sae)
    if null_draws < 1 or seqs_per_latent < 1 or batch_size < 1 or first_sequence < 0:
        raise ValueError(
            f"null_draws={null_draws}, seqs_per_latent={seqs_per_latent} and "
            f"batch_size={batch_size} must all be >= 1 (first_sequence={first_sequence} >= 0)"
        )
    n_lat = len(latent_ids)
    effects = LatentEffects(
        latents=latent_ids.numpy(),
        effect=np.full((n_lat, seqs_per_latent), np.nan),
        null_effects=np.full((n_lat, seqs_per_latent, len(nulls), null_draws), np.nan),
        sequences=np.full((n_lat, seqs_per_latent), -1, dtype=np.int64),
        n_positions=np.zeros((n_lat, seqs_per_latent), dtype=np.int64),
        intervention=intervention,
        null_draws=null_draws,
        alpha=alpha,
        nulls=nulls,
    )
    with torch.no_grad():
        rows = _select_sequences(setup, latent_ids, first_sequence + seqs_per_latent, batch_size)
        effects.sequences[:] = rows[:, first_sequence:]
        bar = tqdm(total=n_lat, desc=f"NCES {intervention}", unit="latent", disable=not progress)
        budget = memory_budget(setup.tokens.device, memory_budget_bytes)
        _run_effects(setup, stats, effects, batch_size, seed, bar, budget, draw_round, real)
        bar.close()
    return effects


def _check_latents(latents: Sequence[int] | torch.Tensor | np.ndarray, d_sae: int) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(latents, dtype=np.int64)).reshape(-1)
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if len(bad):
        raise ValueError(
            f"latent index {int(bad[0])} out of range: the SAE has d_sae={d_sae} latents"
        )
    return ids


def _select_sequences(
    setup: EngineInputs, latents: torch.Tensor, per_latent: int, batch_size: int
) -> np.ndarray:
    """For each latent, the first ``per_latent`` token rows where it fires (-1 padded)."""
    chosen = np.full((len(latents), per_latent), -1, dtype=np.int64)
    count = np.zeros(len(latents), dtype=np.int64)
    n_seq = setup.tokens.shape[0]
    for start in range(0, n_seq, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        x, _ = capture_rows(setup, rows)
        f = encode(setup.sae, x).float()
        valid = setup.valid[rows].to(f.device)
        fires = ((f > 0) & valid[..., None]).any(dim=1)[:, latents.to(f.device)].cpu().numpy()
        for b, row in enumerate(rows.tolist()):
            need = fires[b] & (count < per_latent)
            chosen[need, count[need]] = row
            count[need] += 1
        if (count >= per_latent).all():
            break
    return chosen


def _run_effects(
    setup: EngineInputs,
    stats: ReferenceStats,
    effects: LatentEffects,
    batch_size: int,
    seed: int,
    bar: tqdm,
    budget: tuple[int, int],
    draw_round: int = 0,
    real: bool = True,
) -> None:
    """Fill ``effects.effect``/``null_per_draw``/``n_positions``, one block of sequences at a time."""
    lat_idx, slot = np.nonzero(effects.sequences >= 0)
    seq = effects.sequences[lat_idx, slot]
    order = np.argsort(seq, kind="stable")
    lat_idx, slot, seq = lat_idx[order], slot[order], seq[order]
    remaining = effects.n_sequences.copy()
    bar.update(int((remaining == 0).sum()))
    n_ctx = setup.tokens.shape[1]
    d_vocab = setup.model.cfg.d_vocab
    clean_bytes, chunk_bytes = budget
    per_block = int(np.clip(clean_bytes // (n_ctx * d_vocab * 4), 1, max(batch_size, 1)))
    row_chunk = max(1, chunk_bytes // (d_vocab * 4))
    unique = np.unique(seq)
    for b0 in range(0, len(unique), per_block):
        block = unique[b0 : b0 + per_block]
        in_block = (seq >= block[0]) & (seq <= block[-1])
        local = np.searchsorted(block, seq[in_block])
        latents = effects.latents[lat_idx[in_block]]
        per_row = [latents[local == r] for r in range(len(block))]
        clean = _CleanBlock.build(
            setup, torch.as_tensor(block), per_row, effects.intervention, row_chunk
        )
        pairs = list(zip(lat_idx[in_block], slot[in_block], local, strict=True))
        _run_pairs(
            setup, stats, effects, clean, pairs, batch_size, seed, row_chunk, draw_round, real
        )
        del clean  # before the next block is built: one block in memory at a time
        for li in lat_idx[in_block]:
            remaining[li] -= 1
            if remaining[li] == 0:
                bar.update(1)


@dataclass
class _CleanBlock:
    """Clean quantities for a block of token rows: x, tail input, f, masks, the clean
    log-probabilities at the positions some copy will score (``index`` maps [row, t] to a row
    of ``logprobs``, -1 where not kept) and, where the tail can start after a clean prefix, the
    tail layers' keys and values of every position (``kv``)."""

    rows: torch.Tensor
    x: torch.Tensor  # [b, T, d_in]
    start_input: torch.Tensor
    f: torch.Tensor  # [b, T, d_sae]
    valid: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor | None
    logprobs: torch.Tensor  # [n_kept, V] float32
    index: torch.Tensor  # [b, T] long
    kv: TransformerLensKeyValueCache | None

    @classmethod
    def build(
        cls,
        setup: EngineInputs,
        rows: torch.Tensor,
        latents_per_row: list[np.ndarray],
        intervention: str,
        row_chunk: int,
    ) -> _CleanBlock:
        x, start_input = capture_rows(setup, rows)
        f = encode(setup.sae, x).float()
        valid = setup.valid[rows].to(x.device)
        mask = None if setup.attention_mask is None else setup.attention_mask[rows]
        b, n_ctx, _ = x.shape
        first = torch.full((b,), n_ctx, device=x.device)
        for r, latents in enumerate(latents_per_row):
            hit = intervened_positions(intervention, f[r][:, latents], valid[r][:, None]).any(1)
            first[r] = torch.where(hit.any(), hit.int().argmax(), n_ctx)
        kept = valid & (torch.arange(n_ctx, device=x.device)[None, :] >= first[:, None])
        kv = empty_kv_cache(setup.model, b, x.device) if reuses_prefix(setup.plan, mask) else None
        h = run_tail(setup.model, setup.plan, start_input, x, mask, kv)[kept]
        index = torch.full((b, n_ctx), -1, dtype=torch.long, device=x.device)
        index[kept] = torch.arange(h.shape[0], device=x.device)
        logprobs = log_probs(setup.model, h, row_chunk)
        return cls(rows, x, start_input, f, valid, mask, logprobs, index, kv)


def _run_pairs(
    setup: EngineInputs,
    stats: ReferenceStats,
    effects: LatentEffects,
    clean: _CleanBlock,
    pairs: list[tuple[int, int, int]],
    batch_size: int,
    seed: int,
    row_chunk: int,
    draw_round: int = 0,
    real: bool = True,
) -> None:
    """Evaluate (latent, slot, local row) pairs: 1 real + K copies per null each, in batches
    (without the real copy if not ``real``; null draws of ``draw_round``).

    Pairs run in order of their first intervened position, so the copies of a batch share a
    long clean prefix: the tail then runs only from the batch's earliest such position, on the
    clean keys and values before it (the positions before it are the clean forward's).
    """
    n_ctx = clean.x.shape[1]
    coeff, first = _pair_coefficients(stats, effects, clean, pairs, seed)
    directions = _pair_directions(setup, stats, effects, pairs, seed, draw_round)
    n_var = directions.shape[1]
    order = np.argsort(first, kind="stable")
    copies = [(p, v) for p in order for v in range(0 if real else 1, n_var)]
    for c0 in range(0, len(copies), batch_size):
        batch = copies[c0 : c0 + batch_size]
        batch_pairs = [p for p, _ in batch]
        pair_idx = torch.as_tensor(batch_pairs, device=coeff.device)
        var_idx = torch.as_tensor([v for _, v in batch], device=coeff.device)
        rows = clean.x.new_tensor([pairs[p][2] for p in batch_pairs], dtype=torch.long)
        t0 = torch.as_tensor(first[batch_pairs], device=clean.x.device)
        dirs = directions[pair_idx, var_idx]
        c = coeff[pair_idx]
        start = int(first[batch_pairs].min()) if clean.kv is not None else 0
        kl = torch.zeros(len(batch), dtype=torch.float64)
        if start < n_ctx:
            delta = c[:, start:, None] * dirs[:, None, :]
            spliced = clean.x[rows, start:] + delta
            mask = None if clean.attention_mask is None else clean.attention_mask[rows]
            prefix = prefix_kv_cache(clean.kv, rows, start) if start > 0 else None
            h = run_tail(
                setup.model, setup.plan, clean.start_input[rows, start:], spliced, mask, prefix
            )
            positions = torch.arange(start, n_ctx, device=h.device)
            scored = clean.valid[rows, start:] & (positions[None, :] >= t0[:, None])
            index = clean.index[rows, start:]
            kl = mean_kl(setup.model, clean.logprobs, index, h, scored, row_chunk)
            kl[(delta == 0).flatten(1).all(1).cpu()] = 0.0  # nothing changed: the clean forward
        for (p, v), value in zip(batch, kl.tolist(), strict=True):
            li, j, _ = pairs[p]
            if v == 0:
                effects.effect[li, j] = value
            else:
                n, k = divmod(v - 1, effects.null_draws)
                effects.null_effects[li, j, n, k] = value


def _pair_directions(
    setup: EngineInputs,
    stats: ReferenceStats,
    effects: LatentEffects,
    pairs: list[tuple[int, int, int]],
    seed: int,
    draw_round: int = 0,
) -> torch.Tensor:
    """Per pair, its copies' directions [P, 1 + n_nulls K, d_in]: variant 0 (real) is d_i,
    null variant 1 + n K + k is ||d_i|| u_k of null n, so every position keeps the real
    perturbation's norm and sign."""
    latents = sorted({li for li, _, _ in pairs})
    lat_ids = torch.as_tensor(effects.latents[latents])
    d = decoder_directions(setup.sae, lat_ids)
    per_latent = {}
    for k, li in enumerate(latents):
        nulls = [
            latent_null_directions(
                stats, int(lat_ids[k]), effects.null_draws, seed, name, d[k], draw_round
            )
            for name in effects.nulls
        ]
        per_latent[li] = torch.cat([d[k : k + 1], d[k].norm() * torch.cat(nulls).to(d)])
    device = setup.tokens.device
    return torch.stack([per_latent[li] for li, _, _ in pairs]).to(device)


def _pair_coefficients(
    stats: ReferenceStats,
    effects: LatentEffects,
    clean: _CleanBlock,
    pairs: list[tuple[int, int, int]],
    seed: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """Per pair: f'_t - f_t [P, T] (0 where not intervened) and its first intervened position
    (T if none), with ``effects.n_positions`` filled; one transfer to the host for all pairs.

    Intervened: the active non-special positions; for ``steer`` every non-special position.
    """
    lat_idx = np.array([li for li, _, _ in pairs])
    latents = torch.as_tensor(effects.latents[lat_idx], device=clean.f.device)
    rows = torch.as_tensor([row for _, _, row in pairs], device=clean.f.device)
    n_ctx = clean.f.shape[1]
    f = clean.f[
        rows[:, None], torch.arange(n_ctx, device=clean.f.device)[None, :], latents[:, None]
    ]
    kind = effects.intervention
    positions = intervened_positions(kind, f, clean.valid[rows])
    if kind == "zero":
        target = torch.zeros_like(f)
    elif kind == "mean":
        target = stats.mean_act.to(f)[latents][:, None].expand_as(f)
    elif kind == "resample":
        target = torch.stack(
            [
                resample_values(stats, int(effects.latents[li]), int(clean.rows[row]), n_ctx, seed)
                for li, _, row in pairs
            ]
        ).to(f)
    else:
        target = f + effects.alpha * stats.max_act.to(f)[latents][:, None]
    coeff = torch.where(positions, target - f, 0.0)
    counts = positions.sum(1)
    first = torch.where(counts > 0, positions.int().argmax(1), n_ctx)
    host = torch.stack([counts, first]).cpu().numpy()
    for (li, j, _), n in zip(pairs, host[0], strict=True):
        effects.n_positions[li, j] = n
    return coeff, host[1]


def estimate_seconds(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    n_latents: int,
    seqs_per_latent: int,
    copies_per_sequence: int,
    batch_size: int = 32,
    bos_token_id: int | None = None,
) -> float:
    """A rough time for :func:`latent_effects` on ``n_latents``, from timing one tail forward
    and unembedding of ``batch_size`` copies of a token row here, now (an upper estimate: it
    counts every position, where the engine skips those before the first intervened one).

    The timing is kept per model, hook, context and copies, so scoring several SAEs in one
    process times the tail once.
    """
    copies = max(1, min(batch_size, 8))
    hook = sae.cfg.metadata.hook_name
    key = (id(model), str(model.cfg.device), str(model.cfg.dtype), hook, tokens.shape[1], copies)
    if key not in _SECONDS_PER_COPY:
        _SECONDS_PER_COPY[key] = _time_one_copy(model, sae, tokens, copies, bos_token_id)
    return _SECONDS_PER_COPY[key] * n_latents * seqs_per_latent * copies_per_sequence


_SECONDS_PER_COPY: dict[tuple[object, ...], float] = {}


def _time_one_copy(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    copies: int,
    bos_token_id: int | None,
) -> float:
    setup = prepare_inputs(model, sae, tokens[:1], bos_token_id)
    with torch.no_grad():
        x, start_input = capture_rows(setup, torch.tensor([0]))
        started = time.perf_counter()
        h = run_tail(
            model,
            setup.plan,
            start_input.expand(copies, *start_input.shape[1:]),
            x.expand(copies, *x.shape[1:]),
            None if setup.attention_mask is None else setup.attention_mask[:1].expand(copies, -1),
        )
        log_probs(
            model, h.reshape(-1, h.shape[-1]), max(1, ROW_CHUNK_BYTES // (model.cfg.d_vocab * 4))
        )
    return (time.perf_counter() - started) / copies
