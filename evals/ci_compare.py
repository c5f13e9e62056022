"""CI comparison: rerun the small sweep and compare it with the committed reference.

    python evals/ci_compare.py            # run the "ci" sweep preset, compare, exit 1 on regression
    python evals/ci_compare.py --update   # run it and rewrite the reference (evals/results/reference_ci.json)

The reference records how it was produced (command, machine, settings). Tolerances are stated
in ``TOLERANCES``: per-SAE metrics may move within them (other CPUs give slightly different
floating point and thread scheduling), and the causal SAE's advantage in fraction of verified
latents over TopK may not shrink by more than ``ADVANTAGE_DROP``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import sweep  # noqa: E402

REFERENCE = Path(__file__).parent / "results" / "reference_ci.json"
METRICS = (
    "l0",
    "explained_variance",
    "ce_loss_score",
    "kl_div_score",
    "nces_geomean",
    "frac_verified",
)
TOLERANCES = {
    "l0": ("relative", 0.10),
    "explained_variance": ("absolute", 0.05),
    "ce_loss_score": ("absolute", 0.05),
    "kl_div_score": ("absolute", 0.05),
    "nces_geomean": ("relative", 0.30),
    "frac_verified": ("absolute", 0.30),
}
"""Seed-sized, and measured to be needed. In one process two runs are bit-identical (same seed:
SAE weights and result JSON, ``evals/results/reproducibility_gemma-3-270m.json``;
``tests/test_reproducible.py``). ``evals/ci_spread.py`` reran this sweep under two emulated CPUs
(torch AVX2 / no-SIMD kernels, MKL limited to AVX2 / SSE4.2): both within 4e-4 of the reference
on the scores, 3.4% on NCES. But on 2026-11-28 the sweep itself, run natively on this machine
(in a fresh clone's CI and in the development checkout, three runs, identical to each other),
gave causal CE-loss / KL-div scores 0.850 / 0.821 against the reference's 0.822 / 0.794, TopK's
0.894 / 0.862 against 0.883 / 0.848 and TopK's NCES geomean 1.11 against 1.43, while TopK
trained and scored alone reproduced the reference to the last digit: what moves them is
unexplained (not the CPU emulations measured), so the tolerances stay at this size."""
ADVANTAGE_DROP = 0.30
"""How much causal frac_verified minus TopK frac_verified may fall below the reference's."""


def advantage(table: pd.DataFrame) -> float:
    by_arch = table.set_index("architecture")["frac_verified"]
    return float(by_arch["causal"] - by_arch["topk"])


def compare(table: pd.DataFrame, reference: dict) -> list[str]:
    """Regressions of ``table`` against ``reference`` (empty when everything is within tolerance)."""
    problems = []
    ref_rows = reference["table"]
    for name, row in ref_rows.items():
        if name not in table.index:
            problems.append(f"{name}: missing from this run")
            continue
        for metric in METRICS:
            kind, tol = TOLERANCES[metric]
            ref, now = row[metric], float(table.loc[name, metric])
            limit = tol * abs(ref) if kind == "relative" else tol
            if not abs(now - ref) <= limit:
                problems.append(
                    f"{name}.{metric}: {now:.4g} vs reference {ref:.4g} (tolerance {limit:.3g})"
                )
    if not {"causal", "topk"} <= set(table["architecture"]):
        return [*problems, "causal advantage: this run lacks the causal or the topk SAE"]
    ref_adv, now_adv = reference["causal_advantage"], advantage(table)
    if now_adv < ref_adv - ADVANTAGE_DROP:
        problems.append(
            f"causal advantage in frac_verified fell to {now_adv:.3f} from {ref_adv:.3f} "
            f"(allowed drop {ADVANTAGE_DROP})"
        )
    return problems


def run_ci_sweep(out: Path) -> tuple[pd.DataFrame, dict]:
    table = sweep.run("ci", out)
    meta = json.loads((out / "table.json").read_text())
    return table, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the reference")
    parser.add_argument("--out", type=Path, default=None, help="keep the run's files here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        table, meta = run_ci_sweep(out)
    print(table[list(METRICS)].to_string(float_format=lambda v: f"{v:.4g}"))
    if args.update:
        reference = {
            "produced_by": "python evals/ci_compare.py --update",
            "machine": meta["machine"],
            "settings": meta["settings"],
            "minutes": meta["minutes"],
            "tolerances": {k: list(v) for k, v in TOLERANCES.items()},
            "advantage_drop": ADVANTAGE_DROP,
            "causal_advantage": advantage(table),
            "table": {
                name: {m: float(table.loc[name, m]) for m in METRICS} for name in table.index
            },
        }
        REFERENCE.write_text(json.dumps(reference, indent=2) + "\n")
        print(f"reference written to {REFERENCE}")
        return 0
    problems = compare(table, json.loads(REFERENCE.read_text()))
    for problem in problems:
        print(f"REGRESSION {problem}")
    print("ci comparison:", "FAILED" if problems else "ok (within tolerances)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
