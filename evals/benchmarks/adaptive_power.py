"""NCES power by simulation: fixed designs against the adaptive second round, on measured
variance components.

    python -m evals.benchmarks.adaptive_power            # ~5 min on 2 busy cores
    python -m evals.benchmarks.adaptive_power --reps 50  # a quick look

No model runs. Each latent's log effects follow the two-way model the study measured
(``evals.study.nces_definition.variance_components``, on the raw effects in
``evals/results/nces_definition/effects``, each dictionary under the ``matched`` null): L_a =
a_a + mean over S sequences of e_as, with a direction term a_k ~ N(0, direction_var) per null
direction and sequence noise e ~ N(0, noise_var) per direction and sequence (the sequence term
shared by all directions cancels in every comparison). A null latent's own direction is one
more random direction; a real one's is log(ratio) above the null's mean. A dictionary has 256
latents, a tenth real at ``ratio``; its p-values are the eval's (``prediction_p_values``:
moderated prediction t-test), its verdict BH at 0.05 with NCES > 1, as the eval scores them.

Per design and dictionary: the power for a latent 2x its nulls, the average copies per latent
(sequences x (1 + draws), today 16 x 9 = 144), the smallest ratio verified with 80% power
(common random numbers, bisection) and, on all-null dictionaries, the false-verification rate
(per latent and per dictionary), the adaptive design's against the fixed design it extends on
the same draws. Results: ``evals/results/adaptive_power/summary.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from csae_plugin.causal.adaptive import continues
from csae_plugin.causal.nces import prediction_p_values
from evals.common import RESULTS, machine, write_json
from evals.study.nces_definition import variance_components

EFFECTS = RESULTS / "nces_definition" / "effects"
OUT = RESULTS / "adaptive_power"
N_LATENTS = 256
N_REAL = 26  # a tenth
FDR = 0.05
POWER = 0.8
GOAL_RATIO = 2.0
TODAY = (16, 8)


@dataclass(frozen=True)
class Design:
    """Round 1 at ``seqs`` x ``draws``; with ``futility``, latents whose round-1 p-value (one
    null) is at most it continue to ``seqs2`` sequences and ``draws2`` null draws in all."""

    name: str
    seqs: int
    draws: int
    futility: float | None = None
    seqs2: int | None = None
    draws2: int | None = None

    @property
    def full(self) -> tuple[int, int]:
        """(sequences, draws) of a latent that continues (or of every latent, fixed)."""
        if self.futility is None:
            return self.seqs, self.draws
        return self.seqs2, self.draws2


def fixed(seqs: int, draws: int) -> Design:
    return Design(f"fixed {seqs}x{draws}", seqs, draws)


def adaptive(futility: float, seqs2: int, draws2: int) -> Design:
    return Design(
        f"adaptive p>{futility:g} stops, else {seqs2}x{draws2}", *TODAY, futility, seqs2, draws2
    )


DESIGNS = (
    fixed(16, 8),
    fixed(32, 8),
    fixed(16, 16),
    fixed(32, 16),
    fixed(64, 32),
    fixed(256, 256),  # ~ the limit
)
SEARCH = tuple(
    adaptive(futility, s2, k2)
    for futility in (0.05, 0.1, 0.2)
    for s2, k2 in (
        (16, 32),
        (16, 64),
        (32, 16),
        (32, 32),
        (48, 8),
        (48, 16),
        (64, 8),
        (64, 12),
        (64, 16),
        (96, 8),
        (128, 8),
    )
)
"""Adaptive candidates: round 1 at today's 16 x 8, then (sequences, draws) in all."""


def simulate(
    design: Design,
    direction_var: float,
    noise_var: float,
    log_ratio: float,
    normals: dict[str, np.ndarray],
    n_real: int = N_REAL,
) -> dict[str, float]:
    """One design on ``reps`` dictionaries (``normals``: the common random numbers)."""
    s1, k1 = design.seqs, design.draws
    s_all, k_all = design.full
    a = normals["a"][:, :, : 1 + k_all] * np.sqrt(direction_var)
    e1 = normals["e1"][:, :, : 1 + k_all] * np.sqrt(noise_var / s1)
    e2 = normals["e2"][:, :, : 1 + k_all] * np.sqrt(noise_var / max(s_all - s1, 1))
    full = a + (s1 * e1 + (s_all - s1) * e2) / s_all
    round1 = (a + e1)[:, :, : 1 + k1]
    full[:, :n_real, 0] += log_ratio - a[:, :n_real, 0]  # a real latent's direction is fixed
    round1[:, :n_real, 0] += log_ratio - a[:, :n_real, 0]
    found, false, any_false, copies, extra = [], [], [], [], []
    for r in range(len(a)):
        p_full = _p(full[r])
        if design.futility is None:
            verdict, n_full = _verified(full[r], p_full), N_LATENTS
        else:
            p1 = _p(round1[r])
            more = continues(p1, design.futility)
            p = p1.copy()
            p[more] = _p(full[r][more])
            verdict, n_full = _verified(full[r], p, round1[r], more), int(more.sum())
            # a rejection the fixed full design (same draws, every latent continuing) lacks
            extra.append(bool((verdict & ~_verified(full[r], p_full)).any()))
        found.append(verdict[:n_real].mean() if n_real else np.nan)
        false.append(verdict[n_real:].mean())
        any_false.append(verdict[n_real:].any())
        copies.append(
            (n_full * s_all * (1 + k_all) + (N_LATENTS - n_full) * s1 * (1 + k1)) / N_LATENTS
        )
    return {
        "power": float(np.mean(found)),
        "false_verified": float(np.mean(false)),
        "dictionaries_with_false": float(np.mean(any_false)),
        "copies_per_latent": float(np.mean(copies)),
        "more_than_full_design": float(np.mean(extra)) if extra else 0.0,
    }


def _p(scores: np.ndarray) -> np.ndarray:
    return prediction_p_values(scores)


def _verified(
    full: np.ndarray,
    p: np.ndarray,
    round1: np.ndarray | None = None,
    more: np.ndarray | None = None,
) -> np.ndarray:
    """BH at FDR and NCES > 1 (a stopped latent's NCES from its round-1 scores)."""
    log_nces = full[:, 0] - full[:, 1:].mean(1)
    if round1 is not None:
        log_nces = np.where(more, log_nces, round1[:, 0] - round1[:, 1:].mean(1))
    q = stats.false_discovery_control(np.nan_to_num(p, nan=1.0))
    return (q < FDR) & (log_nces > 0)


def normals(reps: int, max_draws: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (reps, N_LATENTS, 1 + max_draws)
    return {name: rng.standard_normal(shape) for name in ("a", "e1", "e2")}


def min_ratio(design: Design, direction_var: float, noise_var: float, crn: dict) -> float:
    """Smallest ratio with power >= 80% (bisection on log ratio, common random numbers)."""
    lo, hi = 0.0, np.log(64.0)
    if simulate(design, direction_var, noise_var, hi, crn)["power"] < POWER:
        return float("inf")
    for _ in range(12):
        mid = (lo + hi) / 2
        if simulate(design, direction_var, noise_var, mid, crn)["power"] >= POWER:
            hi = mid
        else:
            lo = mid
    return float(np.exp(hi))


def components() -> dict[str, dict[str, float]]:
    """Mean direction and noise variance per measured dictionary (``matched`` null)."""
    out = {}
    for path in sorted(EFFECTS.glob("*.npz")):
        data = np.load(path)
        direction_var, noise_var = variance_components(
            data["effect"], data["null_effects"][:, :, 0]
        )
        out[path.stem] = {
            "direction_var": float(np.nanmean(direction_var)),
            "noise_var": float(np.nanmean(noise_var)),
            "latents": int(np.isfinite(direction_var).sum()),
        }
    return out


def limit_ratio(direction_var: float) -> float:
    """Unlimited sequences and draws: the ratio whose t reaches BH's threshold when the real
    latents are all found (p = FDR x tenth)."""
    return float(np.exp(stats.norm.isf(FDR * N_REAL / N_LATENTS) * np.sqrt(direction_var)))


def search(comps: dict, reference: str, reps: int, seed: int) -> list[dict]:
    """Every adaptive candidate on ``reference``'s components: power at 2x and copies."""
    comp = comps[reference]
    crn = normals(reps, max(d.full[1] for d in SEARCH), seed)
    rows = []
    for design in SEARCH:
        at2 = simulate(design, comp["direction_var"], comp["noise_var"], np.log(GOAL_RATIO), crn)
        rows.append({"design": asdict(design), "name": design.name, **at2})
        print(
            f"[search] {design.name}: power {at2['power']:.3f}, copies {at2['copies_per_latent']:.0f}",
            flush=True,
        )
    return rows


def best(rows: list[dict], budget: float) -> Design:
    """The candidate with the most power at 2x within ``budget`` copies per latent."""
    within = [r for r in rows if r["copies_per_latent"] <= budget]
    return Design(**max(within, key=lambda r: r["power"])["design"])


def evaluate(designs: list[Design], comps: dict, reps: int, seed: int) -> list[dict]:
    rows = []
    for name, comp in comps.items():
        sa, se = comp["direction_var"], comp["noise_var"]
        for design in designs:
            crn = normals(reps, design.full[1], seed)
            at2 = simulate(design, sa, se, np.log(GOAL_RATIO), crn)
            null = simulate(design, sa, se, 0.0, crn, n_real=0)
            row = {
                "dictionary": name,
                "design": design.name,
                "direction_var": sa,
                "noise_var": se,
                "power_2x": at2["power"],
                "copies_per_latent": at2["copies_per_latent"],
                "copies_vs_today": at2["copies_per_latent"] / (TODAY[0] * (1 + TODAY[1])),
                "fdr_2x": at2["false_verified"]
                * (N_LATENTS - N_REAL)
                / max(at2["false_verified"] * (N_LATENTS - N_REAL) + at2["power"] * N_REAL, 1e-12),
                "min_ratio_80": min_ratio(design, sa, se, crn),
                "limit_ratio": limit_ratio(sa),
                "null_false_verified": null["false_verified"],
                "null_dictionaries_with_false": null["dictionaries_with_false"],
                "null_more_than_full_design": null["more_than_full_design"],
                "null_copies_per_latent": null["copies_per_latent"],
            }
            rows.append(row)
            print(
                f"[power] {name} | {design.name}: power(2x) {row['power_2x']:.3f}, copies "
                f"{row['copies_per_latent']:.0f}, min ratio {row['min_ratio_80']:.2f}, null false "
                f"{row['null_false_verified']:.4f}",
                flush=True,
            )
    return rows


def markdown(summary: dict) -> str:
    lines = [
        "# NCES power by simulation (evals/benchmarks/adaptive_power.py)",
        "",
        f"256 latents, {N_REAL} of them real at the ratio, BH at {FDR}, {summary['settings']['reps']} "
        "simulated dictionaries per cell; variance components measured on Gemma 3 270M "
        "(`evals/results/nces_definition/effects`, matched null). Copies = sequences x "
        "(1 + null draws) per latent, today 16 x 9 = 144.",
        "",
        f"Chosen adaptive design (most power at 2x within 2x today's copies on "
        f"`{summary['reference']}`): **{summary['chosen']['name']}**.",
        "",
        "| dictionary | direction var | noise var | design | power at 2x | copies/latent (x today) "
        "| smallest ratio, 80% power | limit | null: false verified per latent | null: dictionaries "
        "with any | null: beyond the full design |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['dictionary']} | {r['direction_var']:.3f} | {r['noise_var']:.3f} | {r['design']} "
            f"| {r['power_2x']:.3f} | {r['copies_per_latent']:.0f} ({r['copies_vs_today']:.2f}) "
            f"| {r['min_ratio_80']:.2f} | {r['limit_ratio']:.2f} | {r['null_false_verified']:.4f} "
            f"| {r['null_dictionaries_with_false']:.3f} | {r['null_more_than_full_design']:.3f} |"
        )
    lines += [
        "",
        "Adaptive candidates on the reference dictionary (power at 2x, copies/latent):",
        "",
    ]
    lines += [
        f"- {r['name']}: {r['power']:.3f}, {r['copies_per_latent']:.0f}" for r in summary["search"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200, help="dictionaries per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="random_isotropic_independent")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    started = time.perf_counter()
    comps = components()
    rows = search(comps, args.reference, args.reps, args.seed)
    chosen = best(rows, 2 * TODAY[0] * (1 + TODAY[1]))
    table = evaluate([*DESIGNS, fixed(*chosen.full), chosen], comps, args.reps, args.seed)
    summary = {
        "produced_by": "python -m evals.benchmarks.adaptive_power",
        "settings": {k: str(v) for k, v in vars(args).items()}
        | {"latents": N_LATENTS, "real": N_REAL, "fdr": FDR, "power": POWER},
        "machine": machine(),
        "seconds": time.perf_counter() - started,
        "components": comps,
        "reference": args.reference,
        "search": rows,
        "chosen": asdict(chosen) | {"name": chosen.name},
        "rows": table,
    }
    write_json(args.out / "summary.json", summary)
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
