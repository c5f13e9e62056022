"""The CI gate (``sae_bench compare BASELINE CANDIDATE --fail-on-regression``): a regression
fails, noise within tolerance passes, missing metrics and SAEs are named."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import FAST, one_error_line, save_standard

from csae_plugin import cli
from csae_plugin.evals import EvalInputError
from csae_plugin.evals.gate import DEFAULT_TOLERANCES, Tolerance, gate, parse_tolerance

BASE = dict(
    l0=32.0,
    explained_variance_centered=0.70,
    ce_loss_score=0.90,
    kl_div_score=0.88,
    nces_geomean=1.30,
    frac_verified=0.40,
    nces_definition="0.3.0",
    null="matched",
)


def table(**rows: dict) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index")


def results(checks) -> dict[str, str]:
    return {c.metric: c.result for c in checks}


def test_noise_within_tolerance_passes_and_a_regression_fails():
    noisy = BASE | {
        name: BASE[name] - 0.5 * tol.limit(BASE[name]) for name, tol in DEFAULT_TOLERANCES.items()
    }
    checks = gate(table(sae=BASE), table(sae=noisy))
    assert {c.metric for c in checks} == set(DEFAULT_TOLERANCES)
    assert not any(c.failed for c in checks)
    worse = gate(table(sae=BASE), table(sae=BASE | {"ce_loss_score": 0.85}))
    assert [(c.metric, c.result) for c in worse if c.failed] == [("ce_loss_score", "worse")]


def test_better_passes_unless_two_sided_and_l0_fails_either_way():
    better = table(sae=BASE | {"ce_loss_score": 0.95, "nces_geomean": 2.0})
    assert not any(c.failed for c in gate(table(sae=BASE), better))
    assert results(gate(table(sae=BASE), better))["ce_loss_score"] == "better"
    assert results(gate(table(sae=BASE), better, two_sided=True))["ce_loss_score"] == "moved"
    for l0 in (16.0, 64.0):
        assert results(gate(table(sae=BASE), table(sae=BASE | {"l0": l0})))["l0"] == "moved"


def test_missing_metrics_and_saes_are_named():
    core_only = {k: v for k, v in BASE.items() if k not in ("nces_geomean", "frac_verified")}
    checks = gate(table(a=BASE, b=BASE), table(a=core_only))
    failed = {(c.sae, c.metric, c.result) for c in checks if c.failed}
    assert failed == {
        ("a", "nces_geomean", "missing"),
        ("a", "frac_verified", "missing"),
        ("b", "", "missing"),
    }
    # a metric the baseline lacks is said, not failed
    assert results(gate(table(s=core_only), table(s=BASE)))["nces_geomean"] == "no baseline"


def test_one_sae_per_side_pairs_whatever_the_names_and_settings_must_agree():
    checks = gate(table(topk=BASE), table(mine=BASE))
    assert checks[0].sae == "mine (vs topk)" and not any(c.failed for c in checks)
    other = gate(table(s=BASE), table(s=BASE | {"nces_definition": "0.2.0"}))
    assert [c.result for c in other if c.failed] == ["not comparable"]
    assert "nces_definition 0.3.0 vs 0.2.0" in other[-1].metric


def test_tolerances_parse_and_bad_ones_are_one_line_errors():
    assert parse_tolerance("ce_loss_score=0.02") == ("ce_loss_score", Tolerance("absolute", 0.02))
    assert parse_tolerance("nces_geomean=20%") == ("nces_geomean", Tolerance("relative", 0.2))
    assert parse_tolerance("l0=off") == ("l0", None)
    for bad in ("ce_loss_score", "x=", "x=-1", "x=abc"):
        with pytest.raises(EvalInputError, match="METRIC=VALUE"):
            parse_tolerance(bad)


def test_cli_gate_on_result_folders(tmp_path, tiny_world, capsys):
    base = tmp_path / "base"
    sae = str(save_standard(tmp_path / "sae"))
    assert cli.main(["run", "--sae", sae, "--output-dir", str(base), *FAST]) == 0
    cand = tmp_path / "cand"
    shutil.copytree(base, cand)
    capsys.readouterr()
    summary = tmp_path / "summary.md"
    argv = ["compare", str(base), str(cand), "--fail-on-regression", "--summary", str(summary)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("### SAE gate: passed") and "| sae | ce_loss_score |" in out
    assert summary.read_text().startswith("### SAE gate: passed")

    core = cand / "core" / "local_sae_eval_results.json"
    data = json.loads(core.read_text())
    data["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] -= 0.05
    core.write_text(json.dumps(data))
    (cand / "nces" / "local_sae_eval_results.json").unlink()
    assert cli.main([*argv[:4]]) == 1
    out = capsys.readouterr().out
    assert out.startswith("### SAE gate: FAILED")
    assert "| ce_loss_score |" in out and "**worse**" in out
    assert "| frac_verified |" in out and "**missing**" in out
    # overridden tolerance: the CE-loss drop allowed, the missing NCES switched off
    loose = ["--tolerance", "ce_loss_score=0.1", "--tolerance", "nces_geomean=off"]
    assert cli.main([*argv[:4], *loose, "--tolerance", "frac_verified=off"]) == 0
    capsys.readouterr()
    # a CSV from compare --csv serves as the baseline
    csv = tmp_path / "base.csv"
    assert cli.main(["compare", str(base), "--csv", str(csv)]) == 0
    assert cli.main(["compare", str(csv), str(base), "--fail-on-regression"]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(base), "--fail-on-regression"]) == 2
    assert "BASELINE CANDIDATE" in one_error_line(capsys)
    assert cli.main(["compare", str(base), "--tolerance", "l0=off"]) == 2
    assert "need --fail-on-regression" in one_error_line(capsys)
