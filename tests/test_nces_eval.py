"""The NCES eval in SAEBench's layout, and the core wrapper, on the tiny model (claims E1-E8)."""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

import pytest
import torch
from conftest import BOS, D_MODEL, make_tiny_model, make_tokens
from pydantic import TypeAdapter
from sae_bench.evals.core.eval_output import CoreEvalOutput
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from csae_plugin import models
from csae_plugin.evals import EvalInputError
from csae_plugin.evals.core import run_core
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.nces.eval_output import SCHEMA_PATH, NCESEvalOutput, NCESMetrics

HOOK = "blocks.0.hook_resid_post"


def tiny_sae(seed: int = 0, d_in: int = D_MODEL, hook: str = HOOK, dead: int | None = None):
    """A random StandardSAE on the tiny model; latent ``dead`` can never fire."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=SAEMetadata(hook_name=hook)))
    if dead is not None:
        with torch.no_grad():
            sae.b_enc[dead] = -1e6
    return sae


def tiny_config(**overrides) -> NCESEvalConfig:
    values = dict(
        model_name="tiny",
        context_size=16,
        latents=[0, 3, 5, 9, 17, 40],
        null_draws=3,
        seqs_per_latent=4,
        n_bootstrap=50,
    )
    return NCESEvalConfig(**(values | overrides))


def run(tmp_path, sae, config=None, **kwargs):
    return nces_main.run_eval(
        config or tiny_config(),
        [("tiny/release", sae)],
        "cpu",
        str(tmp_path),
        model=kwargs.pop("model", make_tiny_model()),
        eval_tokens=kwargs.pop("eval_tokens", make_tokens(12, seed=1)),
        reference_tokens=kwargs.pop("reference_tokens", make_tokens(12, seed=2)),
        **kwargs,
    )


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
    results = run(tmp_path, tiny_sae(dead=3))
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
    a = run(tmp_path / "a", tiny_sae(), config)["tiny/release_custom_sae"]
    b = run(tmp_path / "b", tiny_sae(), config)["tiny/release_custom_sae"]
    assert a["eval_result_metrics"] == b["eval_result_metrics"]
    assert a["eval_result_details"] == b["eval_result_details"]
    other = nces_main.select_latents(8, 64, seed=8)
    assert [d["latent"] for d in a["eval_result_details"]] != list(other)


# E5. an existing result is skipped (no model load) unless force_rerun
def test_e5_existing_results_are_skipped_unless_forced(tmp_path, monkeypatch):
    run(tmp_path, tiny_sae())
    path = tmp_path / "tiny_release_custom_sae_eval_results.json"
    first = json.loads(path.read_text())["eval_id"]

    def no_model(*args, **kwargs):
        raise AssertionError("model loaded for a finished SAE")

    monkeypatch.setattr(models, "load_model", no_model)
    assert nces_main.run_eval(tiny_config(), [("tiny/release", tiny_sae())], "cpu", tmp_path) == {}
    assert json.loads(path.read_text())["eval_id"] == first
    run(tmp_path, tiny_sae(), force_rerun=True)
    assert json.loads(path.read_text())["eval_id"] != first


# E6. evaluate_sae is the file's content without the files
def test_e6_evaluate_sae_matches_the_written_metrics(tmp_path):
    model, sae, config = make_tiny_model(), tiny_sae(), tiny_config()
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
    model, sae, kwargs, config = make_tiny_model(), tiny_sae(), {}, None
    if case == "hook":
        sae = tiny_sae(hook="blocks.7.hook_resid_post")
    elif case == "d_in":
        sae = tiny_sae(d_in=16)
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


# E8. the core wrapper writes SAEBench's core output over exactly the tokens given
def test_e8_core_runs_on_given_model_and_tokens(tmp_path):
    model, sae, tokens = make_tiny_model(), tiny_sae(), make_tokens(32, seed=3)
    result = run_core(
        model,
        sae,
        tokens,
        release="local",
        sae_id="tiny",
        output_path=tmp_path / "core",
        bos_token_id=BOS,
        progress=False,
    )
    path = tmp_path / "core" / "local_tiny_eval_results.json"
    assert result == json.loads(path.read_text())
    output = CoreEvalOutput(**result)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    acts = sae.encode(cache[HOOK])[:, 1:]  # BOS excluded, as core's ignore_tokens
    l0 = (acts != 0).sum(-1).float().mean().item()
    assert output.eval_result_metrics.sparsity.l0 == pytest.approx(l0, rel=1e-5)
    assert output.eval_result_metrics.token_stats.total_tokens_eval_sparsity_variance == 32 * 16
    assert len(output.eval_result_details) == sae.cfg.d_sae
    assert (
        run_core(model, sae, tokens, release="local", sae_id="tiny", output_path=tmp_path / "core")
        is None
    )


# E9. core adds the conventional explained variance under its own key: an SAE that outputs only
# the mean activation explains ~0 (SAEBench 0.6.0's own formula says ~1 on high-mean activations),
# and the written value equals 1 - SSE / SST computed here over the same positions.
def test_e9_core_explained_variance_is_conventional(tmp_path):
    model, tokens = make_tiny_model(), make_tokens(32, seed=4)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D_MODEL).double()  # BOS excluded, as core's ignore_tokens
    shift = 50.0 * torch.ones(D_MODEL)  # a large mean, as in real residual streams

    def shifted(act, hook):
        return act + shift

    model.add_perma_hook(HOOK, shifted)
    x = x + shift.double()
    mean_only = tiny_sae()
    with torch.no_grad():
        mean_only.W_dec.zero_()
        mean_only.b_dec.copy_(x.mean(0).float())
    sae = tiny_sae(seed=1)
    for name, candidate in (("mean_only", mean_only), ("random", sae)):
        result = run_core(
            model,
            candidate,
            tokens,
            release="local",
            sae_id=name,
            output_path=tmp_path / "core",
            bos_token_id=BOS,
            progress=False,
        )
        quality = result["eval_result_metrics"]["reconstruction_quality"]
        written = quality["explained_variance_centered"]
        assert "explained_variance_centered" in str(result["eval_result_unstructured"])
        x_hat = candidate.decode(candidate.encode(x.float())).double()
        expected = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert written == pytest.approx(float(expected), rel=1e-5, abs=1e-4)
        if name == "mean_only":
            assert abs(written) < 1e-3


# E10. several nulls: each its own metrics category and detail columns, the headline first
def test_e10_several_nulls_each_get_their_own_scores(tmp_path):
    config = tiny_config(null="isotropic, matched")
    assert config.null == "isotropic,matched" and config.nulls == ("isotropic", "matched")
    data = run(tmp_path, tiny_sae(), config)["tiny/release_custom_sae"]
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
    alone = run(tmp_path / "alone", tiny_sae(), tiny_config(null="matched"))
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
    run(tmp_path, tiny_sae(dead=3), config)
    data = strict_json(tmp_path / "tiny_release_custom_sae_eval_results.json")
    assert data["eval_result_unstructured"]["screen"]
    validator.validate(data)
    data["eval_result_metrics"]["nces"]["n_latents_evaluated"] = "six"
    assert not validator.is_valid(data)
