"""Causal interventions on single SAE latents, and their effect on the model's output.

The engine behind NCES (``shared/design/nces.md``). For each evaluated latent it takes the
sequences in which the latent fires, changes only that latent (``zero``, ``mean``, ``resample``
or ``steer``) with the SAE's error term kept, and measures KL(p_clean || p_intervened) over the
positions from the first intervened one on. The null applies perturbations of the same size at
the same positions along random directions (:data:`NULLS`): by default ones with the latent's
own energy in each principal direction of the activations, randomised within.

Many intervened copies (latents x sequences x {real, K null}) run at once through only the tail
of the model after the hook (:mod:`csae_plugin.causal.tail`), and the KL is reduced one chunk
of positions at a time, so peak memory depends on ``batch_size`` and the vocabulary, never on
the number of latents.
:func:`naive_latent_effect` is the slow reference (one full hooked forward per variant) the
engine is tested against number for number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from csae_plugin.causal.tail import (
    HookPlan,
    capture,
    encode,
    log_probs,
    mean_kl,
    padding_masks,
    plan_for_sae,
    run_tail,
)

INTERVENTIONS = ("zero", "mean", "resample", "steer")
"""Ways to change one latent: to 0, to its reference mean, to a reference value, or add to it."""

NULLS = ("matched", "covariance", "isotropic")
"""Random-direction nulls. With Sigma = V diag(lambda) V^T the activations' covariance and d the
latent's decoder direction, u is z ~ N(0, I) mapped by V (|V^T d| * z) (``matched``: the
latent's own energy in each principal direction, signs and mixing within randomised),
V (sqrt(lambda) * z) (``covariance``: u ~ N(0, Sigma)) or z itself (``isotropic``), then
normalised. ``matched`` is the default: it is the one under which random dictionaries of every
shape tried score NCES ~1 and fail verification (README, "what exactly is measured")."""

DEFAULT_NULL = "matched"

CLEAN_CACHE_BYTES = 512 * 2**20
"""Budget for the clean logits kept per block of sequences (bounds sequences per block)."""

ROW_CHUNK_BYTES = 256 * 2**20
"""Budget for one chunk of intervened logits [rows, d_vocab] (bounds rows per unembedding)."""

_RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")


@dataclass
class ReferenceStats:
    """Activation statistics on reference tokens (BOS and padding excluded).

    Per latent: ``mean_act`` (mean of f_i, zeros included; the ``mean`` intervention),
    ``max_act`` (the ``steer`` scale), ``firing_freq``, and ``resample_pool`` [pool, d_sae],
    the latent values at uniformly drawn reference tokens (the ``resample`` intervention).
    For the null: ``act_mean`` and the eigendecomposition of the covariance Sigma of x at the
    hook, ``cov_eigvals`` [d_in] (clamped at 0) and ``cov_eigvecs`` [d_in, d_in] (columns).
    """

    mean_act: torch.Tensor
    max_act: torch.Tensor
    firing_freq: torch.Tensor
    resample_pool: torch.Tensor
    act_mean: torch.Tensor
    cov_eigvals: torch.Tensor
    cov_eigvecs: torch.Tensor
    n_tokens: int

    @property
    def cov_factor(self) -> torch.Tensor:
        """A square root L of Sigma (``L @ L.T == Sigma``) [d_in, d_in]."""
        return self.cov_eigvecs * self.cov_eigvals.sqrt()

    @property
    def mean_active_act(self) -> torch.Tensor:
        """Mean of f_i over the tokens where latent i fires (0 for latents that never fire)."""
        safe = self.firing_freq.clamp(min=1e-30)
        return torch.where(self.firing_freq > 0, self.mean_act / safe, 0.0)


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


@dataclass(frozen=True)
class _Setup:
    model: HookedTransformer
    sae: SAE
    plan: HookPlan
    tokens: torch.Tensor
    valid: torch.Tensor  # [n_seq, T] bool: may be intervened and scored (not BOS, not padding)
    attention_mask: torch.Tensor | None  # what TransformerLens would use for these tokens


@torch.no_grad()
def reference_stats(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    pool_size: int = 512,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = False,
) -> ReferenceStats:
    """Stream ``tokens`` [n, T] through the model and SAE once and collect :class:`ReferenceStats`.

    Memory holds one batch of activations at a time. The resample pool draws ``pool_size``
    reference tokens uniformly with replacement, seeded by ``seed``.
    """
    setup = _setup(model, sae, tokens, bos_token_id)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    n_valid = int(setup.valid.sum())
    if n_valid == 0:
        raise ValueError("no reference tokens: every position is BOS or padding")
    flat_valid = setup.valid.flatten().nonzero().squeeze(1).cpu()  # indexes the CPU pool
    gen = draw_generator(seed, 2)
    pool_tokens = flat_valid[torch.randint(n_valid, (pool_size,), generator=gen)]

    sum_f = torch.zeros(d_sae, dtype=torch.float64)
    max_f = torch.zeros(d_sae, dtype=torch.float64)
    count_f = torch.zeros(d_sae, dtype=torch.float64)
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    sum_xx = torch.zeros(d_in, d_in, dtype=torch.float64)
    pool = torch.zeros(pool_size, d_sae, dtype=torch.float32)
    n_seq, n_ctx = tokens.shape
    starts = range(0, n_seq, batch_size)
    for start in tqdm(starts, desc="reference stats", disable=not progress):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        x, _ = _capture(setup, rows)
        f = encode(sae, x).float()
        valid = setup.valid[rows].to(x.device)
        fv = f[valid].double().cpu()
        xv = x[valid].double().cpu()
        sum_f += fv.sum(0)
        count_f += (fv > 0).sum(0)
        if fv.shape[0]:
            max_f = torch.maximum(max_f, fv.max(0).values)
        sum_x += xv.sum(0)
        sum_xx += xv.T @ xv
        in_batch = (pool_tokens >= start * n_ctx) & (pool_tokens < (start + len(rows)) * n_ctx)
        local = pool_tokens[in_batch] - start * n_ctx
        pool[in_batch] = f.reshape(-1, d_sae)[local.to(f.device)].float().cpu()

    act_mean = sum_x / n_valid
    cov = (sum_xx - n_valid * torch.outer(act_mean, act_mean)) / max(n_valid - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    return ReferenceStats(
        mean_act=(sum_f / n_valid).float(),
        max_act=max_f.float(),
        firing_freq=(count_f / n_valid).float(),
        resample_pool=pool,
        act_mean=act_mean.float(),
        cov_eigvals=eigvals.clamp(min=0),
        cov_eigvecs=eigvecs,
        n_tokens=n_valid,
    )


def draw_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``: independent streams per latent/sequence."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def null_directions(
    stats: ReferenceStats,
    n: int,
    generator: torch.Generator,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` unit random directions of kind ``null`` (:data:`NULLS`) [n, d_in].

    ``direction`` (the latent's decoder direction, any norm) is needed by ``matched``.
    """
    _check_null(null)
    basis = stats.cov_eigvecs.double().cpu()
    z = torch.randn(n, basis.shape[1], generator=generator, dtype=torch.float64)
    if null == "isotropic":
        u = z
    else:
        if null == "covariance":
            scale = stats.cov_eigvals.double().cpu().sqrt()
        elif direction is None:
            raise ValueError("the 'matched' null needs the latent's decoder direction")
        else:
            scale = (direction.double().cpu().reshape(-1) @ basis).abs()
        u = (z * scale) @ basis.T
    return (u / u.norm(dim=1, keepdim=True).clamp(min=1e-30)).float()


def latent_null_directions(
    stats: ReferenceStats,
    latent: int,
    null_draws: int,
    seed: int,
    null: str = DEFAULT_NULL,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The engine's null directions of kind ``null`` for ``latent`` [null_draws, d_in].

    One set per latent and null, shared by all its sequences (each null from its own stream,
    ``draw_generator(seed, 0, latent[, NULLS.index(null)])``), so the null also measures how
    much random directions differ from each other.
    """
    _check_null(null)
    keys = (latent,) if null == "covariance" else (latent, NULLS.index(null))
    return null_directions(stats, null_draws, draw_generator(seed, 0, *keys), null, direction)


def resample_values(
    stats: ReferenceStats, latent: int, sequence: int, n_ctx: int, seed: int
) -> torch.Tensor:
    """The engine's ``resample`` targets for ``latent`` on token row ``sequence`` [n_ctx].

    Each position gets the latent's value at its own uniformly drawn pool token
    (from ``draw_generator(seed, 1, latent, sequence)``).
    """
    gen = draw_generator(seed, 1, latent, sequence)
    idx = torch.randint(stats.resample_pool.shape[0], (n_ctx,), generator=gen)
    return stats.resample_pool[idx, latent]


def decoder_directions(sae: SAE, latents: torch.Tensor) -> torch.Tensor:
    """Effective decoder directions d_i = decode(e_i) - decode(0), flattened to [n, d_in].

    Differs from ``W_dec[i]`` when decoding rescales (e.g. TopK's
    ``rescale_acts_by_decoder_norm``), so perturbations are always exactly what decode adds.
    """
    one_hot = torch.zeros(len(latents) + 1, sae.cfg.d_sae, dtype=sae.dtype, device=sae.W_dec.device)
    one_hot[torch.arange(len(latents), device=one_hot.device), latents.to(one_hot.device)] = 1.0
    out = sae.decode(one_hot).reshape(len(latents) + 1, -1)
    return (out[:-1] - out[-1:]).float()


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
) -> LatentEffects:
    """Effects E_i(s) and null effects of intervening on each of ``latents``, batched.

    Each latent is evaluated on the first ``seqs_per_latent`` rows of ``tokens`` in which it
    fires (at a non-BOS, non-pad position); pass shuffled tokens for a random sample.
    ``batch_size`` is the number of sequence copies per tail forward. ``alpha`` scales the
    ``steer`` intervention (f' = f + alpha * max_act). ``bos_token_id`` defaults to the model
    tokenizer's; position 0 holding it is never intervened nor scored. ``null`` names one or
    more of :data:`NULLS` (a sequence or 'matched,covariance'): each gets ``null_draws``
    copies per sequence, sharing the real copy.
    """
    _check_intervention(intervention)
    nulls = check_nulls(null)
    setup = _setup(model, sae, tokens, bos_token_id)
    latent_ids = _check_latents(latents, sae.cfg.d_sae)
    if null_draws < 1 or seqs_per_latent < 1 or batch_size < 1:
        raise ValueError(
            f"null_draws={null_draws}, seqs_per_latent={seqs_per_latent} and "
            f"batch_size={batch_size} must all be >= 1"
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
        effects.sequences[:] = _select_sequences(setup, latent_ids, seqs_per_latent, batch_size)
        bar = tqdm(total=n_lat, desc=f"NCES {intervention}", unit="latent", disable=not progress)
        _run_effects(setup, stats, effects, batch_size, seed, bar)
        bar.close()
    return effects


def naive_latent_effect(
    model: HookedTransformer,
    sae: SAE,
    sequence: torch.Tensor,
    latent: int,
    stats: ReferenceStats,
    *,
    intervention: str = "zero",
    alpha: float = 1.0,
    null_dirs: torch.Tensor | None = None,
    resample_values: torch.Tensor | None = None,
    bos_token_id: int | None = None,
) -> tuple[float, np.ndarray]:
    """Reference: E_i(s) and the null effects for one latent on one sequence [T], the slow way.

    One full forward per variant with a hook splicing D(f') + (x - D(f)) (null: x plus the same
    per-position norm along each row of ``null_dirs``), KL from float64 log-softmax over the
    full vocabulary. Returns ``(effect, null_effects[K])``; NaN if the latent never fires.
    """
    _check_intervention(intervention)
    tokens = sequence.reshape(1, -1).to(model.cfg.device)
    setup = _setup(model, sae, tokens, bos_token_id)
    hook = setup.plan.hook_name
    valid = setup.valid[0]
    null_dirs = torch.zeros(0, sae.cfg.d_in) if null_dirs is None else null_dirs
    with torch.no_grad():
        seen: dict[str, torch.Tensor] = {}

        def grab(act: torch.Tensor, hook: object) -> None:
            seen["x"] = act.detach().clone()

        clean = model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])[0]
        clean_lp = clean.double().log_softmax(-1)
        x = seen["x"]
        f = sae.encode(x)
        f = (f.to_dense() if f.is_sparse else f)[0]  # [T, d_sae]
        f_i = f[:, latent]
        if intervention == "steer":
            positions = valid.clone()
            target = f_i + alpha * stats.max_act[latent]
        else:
            positions = valid & (f_i > 0)
            if intervention == "zero":
                target = torch.zeros_like(f_i)
            elif intervention == "mean":
                target = torch.full_like(f_i, float(stats.mean_act[latent]))
            else:
                if resample_values is None:
                    raise ValueError("intervention 'resample' needs resample_values")
                target = resample_values.to(f_i)
        if not positions.any():
            return float("nan"), np.full(len(null_dirs), np.nan)
        t0 = int(positions.nonzero()[0])
        scored = valid.clone()
        scored[:t0] = False
        f_new = f.clone()
        f_new[positions, latent] = target[positions]
        coeff = torch.where(positions, f_new[:, latent] - f_i, 0.0)
        direction = decoder_directions(sae, torch.tensor([latent]))[0]

        def effect_of(splice: Callable[[torch.Tensor], torch.Tensor]) -> float:
            def hook_fn(act: torch.Tensor, hook: object) -> torch.Tensor:
                return splice(act)

            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, hook_fn)])[0]
            lq = logits.double().log_softmax(-1)
            kl = (clean_lp.exp() * (clean_lp - lq)).sum(-1)
            return float(kl[scored].mean())

        def real(act: torch.Tensor) -> torch.Tensor:
            rec = sae.decode(f.unsqueeze(0)).reshape(act.shape)
            return sae.decode(f_new.unsqueeze(0)).reshape(act.shape) + (act - rec)

        def along(u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            delta = coeff[:, None] * direction.norm() * u.to(coeff)[None, :]
            return lambda act: act + delta.reshape(act.shape).to(act)

        effect = effect_of(real)
        nulls = np.array([effect_of(along(u)) for u in null_dirs])
    return effect, nulls


def _setup(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, bos_token_id: int | None
) -> _Setup:
    """Validate the inputs (one-line ValueErrors) and work out masks and the tail plan."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"no tokens: expected a non-empty [n_seq, context] tensor, got {shape}")
    if sae.cfg.normalize_activations in _RUNTIME_NORMS:
        raise ValueError(
            f"SAE normalize_activations={sae.cfg.normalize_activations!r} makes decode depend on "
            "each token's norm, so a latent has no fixed decoder direction; fold it or use 'none'"
        )
    plan = plan_for_sae(model, sae)
    tokens = tokens.to(model.cfg.device)
    bos = bos_token_id
    if bos is None and model.tokenizer is not None:
        bos = model.tokenizer.bos_token_id
    not_pad, attention_mask = padding_masks(model, tokens)
    valid = not_pad.clone()
    if bos is not None:
        valid[:, 0] &= tokens[:, 0] != bos
    return _Setup(model, sae, plan, tokens, valid, attention_mask)


def _check_null(null: str) -> None:
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")


def check_nulls(nulls: str | Sequence[str]) -> tuple[str, ...]:
    """``nulls`` as a tuple of distinct known null names ('matched,covariance' also accepted)."""
    names = nulls.split(",") if isinstance(nulls, str) else list(nulls)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"no null given; choose one or more of {', '.join(NULLS)}")
    for name in names:
        _check_null(name)
    return tuple(dict.fromkeys(names))


def _check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(
            f"unknown intervention {intervention!r}; choose one of {', '.join(INTERVENTIONS)}"
        )


def _check_latents(latents: Sequence[int] | torch.Tensor | np.ndarray, d_sae: int) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(latents, dtype=np.int64)).reshape(-1)
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if len(bad):
        raise ValueError(
            f"latent index {int(bad[0])} out of range: the SAE has d_sae={d_sae} latents"
        )
    return ids


def _capture(setup: _Setup, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean x at the hook [b, T, d_in] and the tail's input for token ``rows``, checked finite."""
    mask = None if setup.attention_mask is None else setup.attention_mask[rows]
    x, start_input = capture(setup.model, setup.plan, setup.tokens[rows], mask)
    if not torch.isfinite(x).all():
        raise ValueError(
            f"model produced NaN activations at {setup.plan.hook_name} (token rows "
            f"{int(rows[0])}-{int(rows[-1])}); check the model's weights and dtype"
        )
    return x, start_input


def _select_sequences(
    setup: _Setup, latents: torch.Tensor, per_latent: int, batch_size: int
) -> np.ndarray:
    """For each latent, the first ``per_latent`` token rows where it fires (-1 padded)."""
    chosen = np.full((len(latents), per_latent), -1, dtype=np.int64)
    count = np.zeros(len(latents), dtype=np.int64)
    n_seq = setup.tokens.shape[0]
    for start in range(0, n_seq, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_seq))
        x, _ = _capture(setup, rows)
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
    setup: _Setup,
    stats: ReferenceStats,
    effects: LatentEffects,
    batch_size: int,
    seed: int,
    bar: tqdm,
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
    per_block = int(np.clip(CLEAN_CACHE_BYTES // (n_ctx * d_vocab * 4), 1, batch_size))
    unique = np.unique(seq)
    for b0 in range(0, len(unique), per_block):
        block = unique[b0 : b0 + per_block]
        in_block = (seq >= block[0]) & (seq <= block[-1])
        local = np.searchsorted(block, seq[in_block])
        latents = effects.latents[lat_idx[in_block]]
        per_row = [latents[local == r] for r in range(len(block))]
        clean = _CleanBlock.build(setup, torch.as_tensor(block), per_row, effects.intervention)
        pairs = list(zip(lat_idx[in_block], slot[in_block], local, strict=True))
        _run_pairs(setup, stats, effects, clean, pairs, batch_size, seed)
        del clean  # before the next block is built: one block in memory at a time
        for li in lat_idx[in_block]:
            remaining[li] -= 1
            if remaining[li] == 0:
                bar.update(1)


def _intervened(intervention: str, f_i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions an intervention changes: active non-special ones (``steer``: all non-special)."""
    return valid.expand_as(f_i) if intervention == "steer" else valid & (f_i > 0)


@dataclass
class _CleanBlock:
    """Clean quantities for a block of token rows: x, tail input, f, masks, and the clean
    log-probabilities at the positions some copy will score (``index`` maps [row, t] to a row
    of ``logprobs``, -1 where not kept)."""

    rows: torch.Tensor
    x: torch.Tensor  # [b, T, d_in]
    start_input: torch.Tensor
    f: torch.Tensor  # [b, T, d_sae]
    valid: torch.Tensor  # [b, T]
    attention_mask: torch.Tensor | None
    logprobs: torch.Tensor  # [n_kept, V] float32
    index: torch.Tensor  # [b, T] long

    @classmethod
    def build(
        cls,
        setup: _Setup,
        rows: torch.Tensor,
        latents_per_row: list[np.ndarray],
        intervention: str,
    ) -> _CleanBlock:
        x, start_input = _capture(setup, rows)
        f = encode(setup.sae, x).float()
        valid = setup.valid[rows].to(x.device)
        mask = None if setup.attention_mask is None else setup.attention_mask[rows]
        b, n_ctx, _ = x.shape
        first = torch.full((b,), n_ctx, device=x.device)
        for r, latents in enumerate(latents_per_row):
            hit = _intervened(intervention, f[r][:, latents], valid[r][:, None]).any(1)
            if hit.any():
                first[r] = hit.nonzero()[0, 0]
        kept = valid & (torch.arange(n_ctx, device=x.device)[None, :] >= first[:, None])
        h = run_tail(setup.model, setup.plan, start_input, x, mask)[kept]
        index = torch.full((b, n_ctx), -1, dtype=torch.long, device=x.device)
        index[kept] = torch.arange(h.shape[0], device=x.device)
        logprobs = log_probs(setup.model, h, _row_chunk(setup))
        return cls(rows, x, start_input, f, valid, mask, logprobs, index)


def _row_chunk(setup: _Setup) -> int:
    return max(1, ROW_CHUNK_BYTES // (setup.model.cfg.d_vocab * 4))


def _run_pairs(
    setup: _Setup,
    stats: ReferenceStats,
    effects: LatentEffects,
    clean: _CleanBlock,
    pairs: list[tuple[int, int, int]],
    batch_size: int,
    seed: int,
) -> None:
    """Evaluate (latent, slot, local row) pairs: 1 real + K copies per null each, in batches."""
    n_var = 1 + len(effects.nulls) * effects.null_draws
    copies = [(p, v) for p in range(len(pairs)) for v in range(n_var)]
    for c0 in range(0, len(copies), batch_size):
        batch = copies[c0 : c0 + batch_size]
        coeff, dirs, t0 = _batch_perturbations(setup, stats, effects, clean, pairs, batch, seed)
        rows = clean.x.new_tensor([pairs[p][2] for p, _ in batch], dtype=torch.long)
        delta = coeff[:, :, None] * dirs[:, None, :]
        spliced = clean.x[rows] + delta
        mask = None if clean.attention_mask is None else clean.attention_mask[rows]
        h = run_tail(setup.model, setup.plan, clean.start_input[rows], spliced, mask)
        positions = torch.arange(h.shape[1], device=h.device)
        scored = clean.valid[rows] & (positions[None, :] >= t0[:, None])
        kl = mean_kl(setup.model, clean.logprobs, clean.index[rows], h, scored, _row_chunk(setup))
        kl[(delta == 0).flatten(1).all(1).cpu()] = 0.0  # nothing changed: the clean forward
        for (p, v), value in zip(batch, kl.tolist(), strict=True):
            li, j, _ = pairs[p]
            if v == 0:
                effects.effect[li, j] = value
            else:
                n, k = divmod(v - 1, effects.null_draws)
                effects.null_effects[li, j, n, k] = value


def _batch_perturbations(
    setup: _Setup,
    stats: ReferenceStats,
    effects: LatentEffects,
    clean: _CleanBlock,
    pairs: list[tuple[int, int, int]],
    batch: list[tuple[int, int]],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per copy: coefficients f' - f [C, T], direction [C, d_in], first intervened position [C].

    Variant 0 (real) moves along d_i; null variant 1 + n K + k along ||d_i|| u_k of null n, so
    every position keeps the real perturbation's norm and sign.
    """
    device = clean.x.device
    pair_ids = sorted({p for p, _ in batch})
    latents = sorted({pairs[p][0] for p in pair_ids})
    lat_ids = torch.as_tensor(effects.latents[latents])
    d = decoder_directions(setup.sae, lat_ids).to(device)
    directions = {}
    for k, li in enumerate(latents):
        nulls = [
            latent_null_directions(stats, int(lat_ids[k]), effects.null_draws, seed, name, d[k])
            for name in effects.nulls
        ]
        directions[li] = torch.cat([d[k : k + 1], d[k].norm() * torch.cat(nulls).to(device)])
    per_pair = {}
    for p in pair_ids:
        li, j, row = pairs[p]
        coeff, positions = _coefficients(stats, effects, clean, int(effects.latents[li]), row, seed)
        effects.n_positions[li, j] = int(positions.sum())
        first = positions.nonzero()
        per_pair[p] = (coeff, int(first[0]) if len(first) else positions.shape[0])
    coeffs = torch.stack([per_pair[p][0] for p, _ in batch])
    dirs = torch.stack([directions[pairs[p][0]][v] for p, v in batch])
    t0 = torch.tensor([per_pair[p][1] for p, _ in batch], device=device)
    return coeffs, dirs, t0


def _coefficients(
    stats: ReferenceStats,
    effects: LatentEffects,
    clean: _CleanBlock,
    latent: int,
    row: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """f'_t - f_t on local ``row`` (0 where not intervened) [T], and the intervened positions.

    Intervened: the active non-special positions; for ``steer`` every non-special position.
    """
    f_i = clean.f[row, :, latent]
    kind = effects.intervention
    positions = _intervened(kind, f_i, clean.valid[row])
    if kind == "zero":
        target = torch.zeros_like(f_i)
    elif kind == "mean":
        target = torch.full_like(f_i, float(stats.mean_act[latent]))
    elif kind == "resample":
        sequence = int(clean.rows[row])
        target = resample_values(stats, latent, sequence, f_i.shape[0], seed).to(f_i)
    else:
        target = f_i + effects.alpha * float(stats.max_act[latent])
    return torch.where(positions, target - f_i, 0.0), positions
