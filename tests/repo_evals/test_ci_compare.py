"""The CI comparison (``evals/ci/compare.py``): its tolerance logic, and the real run.

The slow test reruns the ``ci`` sweep preset (causal vs TopK on Gemma 3 270M, a few minutes on
a CPU) and fails when a metric or the causal SAE's advantage moves beyond the tolerances
stated in the committed reference.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from evals.ci import compare as ci_compare


def reference_and_table() -> tuple[dict, pd.DataFrame]:
    rows = {
        "causal_1024_k32": dict(
            l0=32.0,
            explained_variance_centered=0.7,
            ce_loss_score=0.9,
            kl_div_score=0.88,
            nces_geomean=3.0,
            frac_verified=0.9,
        ),
        "topk_1024_k32": dict(
            l0=32.0,
            explained_variance_centered=0.72,
            ce_loss_score=0.91,
            kl_div_score=0.89,
            nces_geomean=2.5,
            frac_verified=0.6,
        ),
    }
    reference = {"table": rows, "causal_advantage": 0.3}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["architecture"] = ["causal", "topk"]
    return reference, table


def test_within_tolerance_passes_and_each_regression_is_named():
    reference, table = reference_and_table()
    assert ci_compare.compare(table, reference) == []
    worse = table.copy()
    worse.loc["topk_1024_k32", "ce_loss_score"] -= 0.2
    problems = ci_compare.compare(worse, reference)
    assert len(problems) == 1 and "topk_1024_k32.ce_loss_score" in problems[0]
    lost = table.copy()
    lost.loc["causal_1024_k32", "frac_verified"] = 0.55  # advantage 0.3 -> -0.05
    problems = ci_compare.compare(lost, reference)
    assert any("causal advantage" in p for p in problems)
    assert ci_compare.compare(table.drop(index="causal_1024_k32"), reference)


def test_reference_says_how_it_was_produced():
    reference = json.loads(ci_compare.REFERENCE.read_text())
    assert (
        reference["produced_by"] == ci_compare.PRODUCED_BY == "python -m evals.ci.compare --update"
    )
    assert set(reference["table"]) == {"causal_1024_k32", "topk_1024_k32"}
    for row in reference["table"].values():
        assert set(row) == set(ci_compare.METRICS)


@pytest.mark.slow
def test_ci_sweep_matches_the_committed_reference(tmp_path, capsys):
    code = ci_compare.main(["--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "ok (within tolerances)" in output


def test_a_shift_the_size_of_other_training_rows_is_caught():
    """The departure once seen when CI's sweep trained on other corpus rows (causal CE-loss
    score 0.850 vs 0.822, TopK NCES 1.11 vs 1.43) must fail the comparison."""
    reference, table = reference_and_table()
    shifted = table.copy()
    shifted.loc["causal_1024_k32", "ce_loss_score"] += 0.028
    shifted.loc["topk_1024_k32", "nces_geomean"] *= 1.11 / 1.43
    problems = ci_compare.compare(shifted, reference)
    assert len(problems) == 2, problems
