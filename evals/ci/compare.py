"""CI comparison: rerun the small sweep and compare it with the committed reference.

    python -m evals.ci.compare            # run the "ci" sweep preset, compare, exit 1 on regression
    python -m evals.ci.compare --update   # run it and rewrite the reference (evals/ci/reference_ci.json)

The reference records how it was produced (command, machine, settings). Tolerances are stated
in ``TOLERANCES``: per-SAE metrics may move within them (other CPUs give slightly different
floating point and thread scheduling), and the causal SAE's advantage in fraction of verified
latents over TopK may not shrink by more than ``ADVANTAGE_DROP``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from csae_plugin.evals import gate
from evals.ci import sweep
from evals.common import write_json

REFERENCE = Path(__file__).with_name("reference_ci.json")
PRODUCED_BY = "python -m evals.ci.compare --update"
TOLERANCES = gate.DEFAULT_TOLERANCES
"""The tolerances of ``sae_bench compare --fail-on-regression`` (``csae_plugin.evals.gate``,
which says what they are sized from), applied two-sided: a rerun must reproduce the reference,
so a metric that moves beyond them either way is a regression."""
METRICS = tuple(TOLERANCES)
ADVANTAGE_DROP = 0.15
"""How much causal frac_verified minus TopK frac_verified may fall below the reference's."""


def advantage(table: pd.DataFrame) -> float:
    by_arch = table.set_index("architecture")["frac_verified"]
    return float(by_arch["causal"] - by_arch["topk"])


def compare(table: pd.DataFrame, reference: dict) -> list[str]:
    """Regressions of ``table`` against ``reference`` (empty when everything is within tolerance):
    the CI gate's failed checks, two-sided, and the causal advantage's drop."""
    baseline = pd.DataFrame.from_dict(reference["table"], orient="index")
    checks = gate.gate(baseline, table, TOLERANCES, two_sided=True)
    problems = [
        f"{c.sae}.{c.metric}: {c.candidate} vs reference {c.baseline} ({c.result}, tolerance "
        f"{c.tolerance})"
        for c in checks
        if c.failed
    ]
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
            "produced_by": PRODUCED_BY,
            "machine": meta["machine"],
            "settings": meta["settings"],
            "minutes": meta["minutes"],
            "tolerances": {k: [v.kind, v.value] for k, v in TOLERANCES.items()},
            "advantage_drop": ADVANTAGE_DROP,
            "causal_advantage": advantage(table),
            "table": {
                name: {m: float(table.loc[name, m]) for m in METRICS} for name in table.index
            },
        }
        write_json(REFERENCE, reference)
        print(f"reference written to {REFERENCE}")
        return 0
    problems = compare(table, json.loads(REFERENCE.read_text()))
    for problem in problems:
        print(f"REGRESSION {problem}")
    print("ci comparison:", "FAILED" if problems else "ok (within tolerances)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
