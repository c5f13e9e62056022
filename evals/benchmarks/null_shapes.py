"""Which random shapes each null family is exchangeable with, on a quadratic proxy of the effect.

    python -m evals.benchmarks.null_shapes     # Gemma 3 270M layer 6, ~2 min on 2 CPU cores

The exact engine costs minutes per dictionary; this asks the same question of many shapes in
seconds. To second order, a perturbation along unit direction u moves the output by
u^T F u (F the hook's Fisher metric, :func:`csae_plugin.evals.reference_saes.reference_fisher`,
from rows the covariance is not read from), so the proxy score of a direction is
log(u^T F u), and a latent's proxy test compares its direction with its K null directions the
way NCES does (the mean log difference, and a prediction t-test against the nulls' spread).
For each shape (random dictionaries of :func:`reference_directions`, plus shapes no test
contains) it reports, under the band null (0.3.0) and ``matched`` (0.4.0): the mean log
difference (0 for an exchangeable shape) with its standard error, the fraction of p-values below
0.05 and above 0.95 (5% each when calibrated), and how far each direction's participation ratio
sits below its band draws' (the quantity ``matched`` chooses its family by; below log 1/4 it
takes the neuron-permuted draws). The proxy ignores where a latent fires and the nonlinearity of
large changes; the exact engine's numbers are ``evals/study/nces_definition.py``'s.
Results: ``evals/results/null_shapes/summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from csae_plugin.causal.draws import draw_generator
from csae_plugin.causal.interventions import NEURON_NULL_RATIO, concentration, null_directions
from csae_plugin.causal.reference_stats import ReferenceStats
from csae_plugin.data import corpus_splits
from csae_plugin.evals.reference_saes import (
    RANDOM_SHAPES,
    REFERENCE_KINDS,
    hook_activations,
    reference_directions,
    reference_fisher,
)
from csae_plugin.models import load_model
from evals.common import HOOK, MODEL, RESULTS, machine, write_json

NULLS = {"band (0.3.0)": "matched_band", "matched (0.4.0)": "matched"}
EXTRA_SHAPES = ("sparse_on_high_variance", "neuron_weighted", "covariance_squared")
"""Shapes only this proxy builds: 8 coordinates drawn with probability proportional to their
variance; isotropic times fixed log-normal per-coordinate weights; u ~ N(0, Sigma^2)."""


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--directions", type=int, default=160, help="per shape")
    parser.add_argument("--null-draws", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--n-reference-sequences", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "null_shapes")
    return parser


def stats_of(acts: torch.Tensor) -> ReferenceStats:
    """The null's statistics of ``acts`` [N, d_in] (only the fields the nulls read)."""
    x = acts.double()
    cov = torch.cov(x.T)
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
    empty = torch.zeros(0)
    return ReferenceStats(
        empty, empty, empty, empty, x.mean(0).float(), eigvals.clamp(min=0), eigvecs,
        cov.diagonal().clone(), len(x),
    )  # fmt: skip


def extra_directions(kind: str, st: ReferenceStats, n: int, gen: torch.Generator) -> torch.Tensor:
    d_in = len(st.act_var)
    iso = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    if kind == "sparse_on_high_variance":
        out = torch.zeros(n, d_in, dtype=torch.float64)
        for row in out:
            where = torch.multinomial(st.act_var.double(), 8, generator=gen)
            row[where] = torch.randn(8, generator=gen, dtype=torch.float64)
        return out
    if kind == "neuron_weighted":
        weights = torch.randn(d_in, generator=torch.Generator().manual_seed(5)).double().exp()
        return iso * weights
    return (iso * st.cov_eigvals) @ st.cov_eigvecs.T  # covariance_squared


def shape_row(dirs: torch.Tensor, st: ReferenceStats, fisher: torch.Tensor, args) -> dict:
    def score(u: torch.Tensor) -> np.ndarray:
        u = u.double() / u.double().norm(dim=-1, keepdim=True)
        return torch.log(torch.einsum("...i,ij,...j->...", u, fisher, u)).numpy()

    ratio = np.log([concentration(st, d) for d in dirs])
    row = {
        "log_pr_ratio_quantiles_0_10_50_90": np.quantile(ratio, [0, 0.1, 0.5, 0.9]).tolist(),
        "frac_neuron_null": float((ratio < np.log(NEURON_NULL_RATIO)).mean()),
    }
    k = args.null_draws
    for label, null in NULLS.items():
        diffs, p = [], []
        for i, d in enumerate(dirs):
            gen = draw_generator(args.seed, 7, i)
            nulls = score(null_directions(st, k, gen, null, d))
            own = float(score(d))
            diffs.append(own - nulls.mean())
            t = (own - nulls.mean()) / (nulls.std(ddof=1) * np.sqrt(1 + 1 / k))
            p.append(sps.t.sf(t, k - 1))
        diffs, p = np.array(diffs), np.array(p)
        row[label] = {
            "mean_log_diff": float(diffs.mean()),
            "se": float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
            "frac_p_below_0.05": float((p < 0.05).mean()),
            "frac_p_above_0.95": float((p > 0.95).mean()),
        }
    return row


def markdown(rows: dict) -> str:
    lines = [
        "| shape | log PR ratio (min, q10, median, q90) | neuron-permuted | "
        + " | ".join(f"{n}: mean log diff +- se, p<0.05, p>0.95" for n in NULLS)
        + " |",
        "|---" * (3 + len(NULLS)) + "|",
    ]
    for shape, r in rows.items():
        q = ", ".join(f"{v:+.2f}" for v in r["log_pr_ratio_quantiles_0_10_50_90"])
        cells = [
            f"{r[n]['mean_log_diff']:+.3f} +- {r[n]['se']:.3f}, {r[n]['frac_p_below_0.05']:.2f}, "
            f"{r[n]['frac_p_above_0.95']:.2f}"
            for n in NULLS
        ]
        lines.append(f"| {shape} | {q} | {r['frac_neuron_null']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arg_parser().parse_args()
    torch.manual_seed(args.seed)
    model = load_model(MODEL)
    splits = corpus_splits(model.tokenizer, args.context, seed=args.seed)
    acts = hook_activations(model, HOOK, splits.train[: args.n_reference_sequences])
    fisher = reference_fisher(model, HOOK, splits.train[args.n_reference_sequences :]).double()
    fisher = (fisher + fisher.T) / 2
    st = stats_of(acts)
    gen = torch.Generator().manual_seed(args.seed + 1)
    shapes = [k for k in (*REFERENCE_KINDS, *RANDOM_SHAPES) if k.startswith("random")]
    rows = {}
    for kind in (*shapes, "pca", "identity", "planted_fisher", *EXTRA_SHAPES):
        if kind in EXTRA_SHAPES:
            dirs = extra_directions(kind, st, args.directions, gen)
        else:
            n = 16 if kind == "planted_fisher" else min(args.directions, acts.shape[1])
            dirs = reference_directions(kind, acts, n, args.seed + 1, fisher).double()
        rows[kind] = shape_row(dirs, st, fisher, args)
        print(kind, rows[kind], flush=True)
    write_json(
        args.out / "summary.json",
        {
            "produced_by": "python -m evals.benchmarks.null_shapes",
            "settings": vars(args),
            "machine": machine(),
            "shapes": rows,
        },
    )
    (args.out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
