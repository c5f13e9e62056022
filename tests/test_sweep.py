"""Pieces of the comparison sweep (``evals/sweep.py``) that read results: the stricter-bar table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EVALS = Path(__file__).parents[1] / "evals"
sys.path.insert(0, str(EVALS))
import sweep  # noqa: E402


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
