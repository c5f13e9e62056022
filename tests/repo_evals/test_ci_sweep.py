"""Pieces of the comparison sweep (``evals/ci/sweep.py``) that read results: the stricter-bar
table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.ci import sweep


def write_nces(folder: Path, name: str, latents: list[dict]) -> None:
    details = [
        {"latent": i, "dead": False, "verified": True, "ci_low": None, **latent}
        for i, latent in enumerate(latents)
    ]
    (folder / "nces").mkdir(parents=True, exist_ok=True)
    path = folder / "nces" / f"local_{name}_eval_results.json"
    path.write_text(json.dumps({"eval_result_details": details}))


def test_verification_bars_count_live_latents_above_each_bar(tmp_path):
    write_nces(
        tmp_path,
        "a_k32",
        [
            {"ci_low": 1.5},
            {"ci_low": 2.5},
            {"ci_low": 4.5},
            {"ci_low": None},  # one sequence: no CI, above no bar
            {"dead": True, "verified": False},  # dead: not counted at all
            {"ci_low": 0.5, "verified": False},
        ],
    )
    bars = sweep.verification_bars(tmp_path)
    row = bars.loc["a_k32"]
    assert row["n_live"] == 5
    assert row["frac_verified"] == pytest.approx(4 / 5)
    assert row["frac_ci_low_above_2"] == pytest.approx(2 / 5)
    assert row["frac_ci_low_above_3"] == pytest.approx(1 / 5)
    assert row["frac_ci_low_above_4"] == pytest.approx(1 / 5)


def test_null_table_has_one_column_set_per_null_run(tmp_path):
    def category(null, geomean, verified):
        return {
            "null": null,
            "nces_geomean": geomean,
            "nces_geomean_ci_low": geomean * 0.9,
            "nces_geomean_ci_high": geomean * 1.1,
            "frac_verified": verified,
            "mean_effect_kl": 1e-3,
        }

    folder = tmp_path / "eval_results" / "nces"
    folder.mkdir(parents=True)
    metrics = {
        "nces": category("matched", 1.2, 0.1),
        "nces_matched": category("matched", 1.2, 0.1),
        "nces_covariance": category("covariance", 5.0, 1.0),
        "nces_isotropic": {"null": None},  # not run
    }
    details = [{"dead": False}, {"dead": False}, {"dead": True}]
    result = {"eval_result_metrics": metrics, "eval_result_details": details}
    (folder / "local_reference_pca_eval_results.json").write_text(json.dumps(result))
    table = sweep.null_table(tmp_path)
    row = table.loc["reference_pca"]
    assert row["n_live"] == 2 and row["geomean_covariance"] == 5.0
    assert row["ci_matched"] == "[1.08, 1.32]" and row["frac_verified_matched"] == 0.1
    assert "geomean_isotropic" not in table
    assert (tmp_path / "nulls.md").is_file()
    assert (tmp_path / "plots" / "nces_geomean_by_null.png").is_file()
