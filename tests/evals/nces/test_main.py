"""The NCES eval in SAEBench's layout (``csae_plugin/evals/nces``: its config, output model and
schema, ``run_eval`` and ``evaluate_sae``, the command line) on the tiny model (claims E1-E12;
E8 and E9, the core wrapper, are in ``tests/evals/test_core.py``)."""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

import pytest
import torch
from conftest import make_tiny_model, make_tokens, standard_sae
from eval_setup import run, tiny_config
from pydantic import TypeAdapter

from csae_plugin import models
from csae_plugin.evals import EvalInputError
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.nces.eval_output import SCHEMA_PATH, NCESEvalOutput, NCESMetrics


def strict_json(path):
    """Parse as standard JSON: NaN/Infinity are not JSON and fail here."""

    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


# E1. the committed (and shipped) JSON schema equals the one generated from the output model
def test_e1_committed_schema_matches_the_output_model():
    shipped = resources.files("csae_plugin.evals.nces") / SCHEMA_PATH.name
    assert shipped.is_file()
    assert json.loads(shipped.read_text()) == TypeAdapter(NCESEvalOutput).json_schema()


# E2. every config field has a title and a description, as in SAEBench's configs
def test_e2_config_fields_are_documented_and_latents_parse():
    for field in dataclasses.fields(NCESEvalConfig):
        assert field.default.title and field.default.description, field.name
    assert NCESEvalConfig(latents="3,17").latents == [3, 17]
    assert NCESEvalConfig(latents="[3]").latents == [3]
    assert NCESEvalConfig(latents="12").latents == 12
    with pytest.raises(ValueError):
        NCESEvalConfig(latents="some")
    with pytest.raises(ValueError):
        NCESEvalConfig(intervention="ablate")


# E3. run_eval writes SAEBench's file, which SAEBench's output model loads back; NaN is null
def test_e3_result_file_has_saebench_layout_and_loads_back(tmp_path):
    results = run(tmp_path, standard_sae(dead=3))
    path = tmp_path / "tiny_release_custom_sae_eval_results.json"
    assert list(results) == ["tiny/release_custom_sae"]
    data = strict_json(path)
    output = NCESEvalOutput(**data)
    assert output == TypeAdapter(NCESEvalOutput).validate_python(data)
    assert output.eval_type_id == "nces" and output.sae_lens_release_id == "tiny/release"
    metrics = output.eval_result_metrics.nces
    assert set(data["eval_result_metrics"]["nces"]) == {
        f.name for f in dataclasses.fields(NCESMetrics)
    }
    assert metrics.n_latents_evaluated == 6 and metrics.frac_dead == pytest.approx(1 / 6)
    details = {d.latent: d for d in output.eval_result_details}
    assert details[3].dead and details[3].nces is None and not details[3].verified
    assert details[5].nces is not None and details[5].n_sequences > 0
    assert not list(tmp_path.glob(".*tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# E4. the same seed gives identical numbers; another seed draws another latent subset
def test_e4_same_seed_same_numbers(tmp_path):
    config = tiny_config(latents=8, random_seed=7)
    a = run(tmp_path / "a", standard_sae(), config)["tiny/release_custom_sae"]
    b = run(tmp_path / "b", standard_sae(), config)["tiny/release_custom_sae"]
    assert a["eval_result_metrics"] == b["eval_result_metrics"]
    assert a["eval_result_details"] == b["eval_result_details"]
    other = nces_main.select_latents(8, 64, seed=8)
    assert [d["latent"] for d in a["eval_result_details"]] != list(other)


# E5. an existing result is skipped (no model load) unless force_rerun
def test_e5_existing_results_are_skipped_unless_forced(tmp_path, monkeypatch):
    run(tmp_path, standard_sae())
    path = tmp_path / "tiny_release_custom_sae_eval_results.json"
    first = json.loads(path.read_text())["eval_id"]

    def no_model(*args, **kwargs):
        raise AssertionError("model loaded for a finished SAE")

    monkeypatch.setattr(models, "load_model", no_model)
    assert (
        nces_main.run_eval(tiny_config(), [("tiny/release", standard_sae())], "cpu", tmp_path) == {}
    )
    assert json.loads(path.read_text())["eval_id"] == first
    run(tmp_path, standard_sae(), force_rerun=True)
    assert json.loads(path.read_text())["eval_id"] != first


# E6. evaluate_sae is the file's content without the files
def test_e6_evaluate_sae_matches_the_written_metrics(tmp_path):
    model, sae, config = make_tiny_model(), standard_sae(), tiny_config()
    result = nces_main.evaluate_sae(
        model, sae, make_tokens(12, seed=1), make_tokens(12, seed=2), config, progress=False
    )
    written = run(tmp_path, sae, config)["tiny/release_custom_sae"]
    assert result.metrics == pytest.approx(written["eval_result_metrics"]["nces"])
    for null, metrics in result.metrics_by_null.items():
        assert metrics == pytest.approx(written["eval_result_metrics"][f"nces_{null}"])
    assert list(result.details["latent"]) == config.latents
    metrics, details = result  # unpacks as the (metrics, details) pair of 0.3.0
    assert metrics == result.metrics and details is result.details


# E7. bad inputs fail up front with one line and leave no result file
@pytest.mark.parametrize(
    "case, needle",
    [
        ("hook", "not in the model"),
        ("d_in", "does not match"),
        ("no_tokens", "zero evaluation tokens"),
        ("nan_model", "NaN activations"),
        ("latent_range", "out of range"),
    ],
)
def test_e7_bad_inputs_give_one_line_errors(tmp_path, case, needle):
    model, sae, kwargs, config = make_tiny_model(), standard_sae(), {}, None
    if case == "hook":
        sae = standard_sae(hook="blocks.7.hook_resid_post")
    elif case == "d_in":
        sae = standard_sae(d_in=16)
    elif case == "no_tokens":
        kwargs["eval_tokens"] = torch.zeros((0, 16), dtype=torch.long)
    elif case == "nan_model":
        with torch.no_grad():
            model.W_E[:] = float("nan")
    else:
        config = tiny_config(latents=[1, 99])
    with pytest.raises(ValueError, match=needle) as err:
        run(tmp_path, sae, config, model=model, **kwargs)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())
    if case in ("no_tokens", "nan_model", "latent_range"):
        assert isinstance(err.value, EvalInputError)


# E10. several nulls: each its own metrics category and detail columns, the headline first
def test_e10_several_nulls_each_get_their_own_scores(tmp_path):
    config = tiny_config(null="isotropic, matched")
    assert config.null == "isotropic,matched" and config.nulls == ("isotropic", "matched")
    data = run(tmp_path, standard_sae(), config)["tiny/release_custom_sae"]
    output = NCESEvalOutput(**data)
    metrics = output.eval_result_metrics
    assert metrics.nces.null == "isotropic" and metrics.nces == metrics.nces_isotropic
    assert metrics.nces_matched.null == "matched"
    assert metrics.nces_covariance.nces_median is None  # not run
    for detail in output.eval_result_details:
        if detail.dead:
            continue
        assert detail.nces == detail.nces_isotropic and detail.nces_matched is not None
        assert detail.nces_covariance is None
        assert detail.verified_all_nulls == (detail.verified_isotropic and detail.verified_matched)
    alone = run(tmp_path / "alone", standard_sae(), tiny_config(null="matched"))
    alone_metrics = alone["tiny/release_custom_sae"]["eval_result_metrics"]["nces"]
    assert alone_metrics == data["eval_result_metrics"]["nces_matched"] | {
        "frac_verified_all_nulls": alone_metrics["frac_verified_all_nulls"]
    }
    with pytest.raises(ValueError, match="unknown null 'gaussian'"):
        tiny_config(null="matched,gaussian")


# E11. SAEBench's own CLI check passes on arg_parser(); `python -m` adds only its runtime pair
def test_e11_cli_meets_saebench_eval_contract():
    from sae_bench.sae_bench_utils.testing_utils import validate_eval_cli_interface

    validate_eval_cli_interface(nces_main.arg_parser(), NCESEvalConfig)

    def dests(parser):
        return {action.dest for action in parser._actions} - {"help"}

    extra = dests(nces_main.cli_arg_parser()) - dests(nces_main.arg_parser())
    assert extra == set(nces_main.RUNTIME_ARGUMENTS)
    assert not extra & {f.name for f in dataclasses.fields(NCESEvalConfig)}


# E12. result files (with several nulls, a dead latent and the screen) validate against the
# committed JSON schema with a JSON-schema validator, which does reject a broken file
def test_e12_result_files_validate_against_the_committed_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    config = tiny_config(null="matched,isotropic", latents="screen:4", screen_sequences=4)
    run(tmp_path, standard_sae(dead=3), config)
    data = strict_json(tmp_path / "tiny_release_custom_sae_eval_results.json")
    assert data["eval_result_unstructured"]["screen"]
    validator.validate(data)
    data["eval_result_metrics"]["nces"]["n_latents_evaluated"] = "six"
    assert not validator.is_valid(data)


# E13. the details say which null family each latent got; a latent on one coordinate of the
# hook's space gets 0.4.0's neuron-permuted draws, 0.3.0 keeps band draws for every latent
def test_e13_details_name_each_latents_null_family():
    model, sae, config = make_tiny_model(), standard_sae(), tiny_config()
    one_hot = config.latents[0]
    with torch.no_grad():
        sae.W_dec[one_hot] = 0.0
        sae.W_dec[one_hot, 5] = 1.0
    tokens = make_tokens(12, seed=1), make_tokens(12, seed=2)
    result = nces_main.evaluate_sae(model, sae, *tokens, config, progress=False)
    family = dict(zip(result.details["latent"], result.details["neuron_null"], strict=True))
    assert family[one_hot] and not any(family[i] for i in config.latents[1:])
    old = dataclasses.replace(config, nces_definition="0.3.0")
    result_03 = nces_main.evaluate_sae(model, sae, *tokens, old, progress=False)
    assert "neuron_null" not in result_03.details
    same = result.details["latent"] != one_hot  # dense latents: the same draws, same numbers
    assert list(result.details["nces"][same]) == pytest.approx(
        list(result_03.details["nces"][same])
    )
    assert result.details["nces"][~same].item() != pytest.approx(
        result_03.details["nces"][~same].item()
    )
