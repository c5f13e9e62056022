"""``core`` is SAEBench's core: every key SAEBench writes holds SAEBench's own number.

SAEBench's ``multiple_evals`` loads the model and the dataset by name; here its two loaders are
pointed at the tiny model and the same token rows ``run_core`` reads (in the same order, no
shuffle), so both run on the same SAE and tokens. And the wrapper itself: it writes SAEBench's
core output over exactly the tokens given, with the conventional explained variance added.
"""

from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from conftest import BOS, D_MODEL, HOOK, make_tiny_model, make_tokens, standard_sae
from sae_bench.evals.core import main as saebench_core
from sae_bench.evals.core.eval_output import CoreEvalOutput
from sae_lens.training.activations_store import ActivationsStore

from csae_plugin.evals import core


def flat(result: dict) -> dict[str, object]:
    """``category.key`` -> value of a result's metrics, and ``detail<i>.key`` of its details."""
    values = {
        f"{category}.{key}": value
        for category, metrics in result["eval_result_metrics"].items()
        for key, value in metrics.items()
    }
    for i, detail in enumerate(result["eval_result_details"]):
        values |= {f"detail{i}.{key}": value for key, value in detail.items()}
    return values


def test_core_agrees_with_saebench_core_on_every_saebench_key(tmp_path, monkeypatch):
    model, tokens = make_tiny_model(), make_tokens(32, seed=4)
    # SAEBench ignores the tokenizer's PAD/EOS/BOS; the tiny model has none, so name BOS
    model.tokenizer = SimpleNamespace(
        pad_token_id=BOS, eos_token_id=BOS, bos_token_id=BOS, padding_side="right"
    )
    sae = standard_sae()
    sae.cfg.metadata.model_name = model.cfg.model_name
    config = core.core_config(model.cfg.model_name, "", tokens.shape[1], tokens.shape[0])

    monkeypatch.setattr(
        saebench_core.HookedTransformer,
        "from_pretrained_no_processing",
        lambda *args, **kwargs: model,
    )
    monkeypatch.setattr(
        ActivationsStore,
        "from_sae",
        lambda model, sae, **kwargs: core._activation_store(model, sae, tokens, config),
    )
    monkeypatch.setattr(ActivationsStore, "shuffle_input_dataset", lambda self, seed: None)
    saebench_core.multiple_evals(
        [("local", sae)],
        n_eval_reconstruction_batches=config.n_eval_reconstruction_batches,
        n_eval_sparsity_variance_batches=config.n_eval_sparsity_variance_batches,
        eval_batch_size_prompts=config.batch_size_prompts,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
        context_size=tokens.shape[1],
        output_folder=str(tmp_path / "saebench"),
        device="cpu",
    )
    theirs_path = tmp_path / "saebench" / "local_custom_sae_eval_results.json"
    assert theirs_path.exists(), "SAEBench's multiple_evals logged an error instead of a result"
    theirs = flat(json.loads(theirs_path.read_text()))

    ours_result = core.run_core(
        model,
        sae,
        tokens,
        release="local",
        sae_id="custom_sae",
        output_path=tmp_path / "ours",
        config=config,
        progress=False,
    )
    assert ours_result is not None
    ours = flat(ours_result)

    added = f"reconstruction_quality.{core.CENTERED_KEY}"
    assert set(ours) - set(theirs) == {added}
    assert set(theirs) <= set(ours)
    differ = {
        key: (ours[key], value)
        for key, value in theirs.items()
        if not (
            ours[key] == value
            or (
                isinstance(value, float) and abs(ours[key] - value) <= 1e-6 * max(1.0, abs(value))  # type: ignore[operator]
            )
        )
    }
    assert differ == {}
    # the added key is said to be added, and differs from SAEBench's on purpose
    assert added in ours_result["eval_result_unstructured"]["added_by_csae_plugin"]
    assert ours[added] != theirs["reconstruction_quality.explained_variance"]


def test_core_file_validates_against_saebench_core_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = resources.files("sae_bench.evals.core") / "eval_output_schema_core.json"
    validator = jsonschema.Draft202012Validator(json.loads(schema.read_text()))
    model, tokens = make_tiny_model(), make_tokens(16, seed=4)
    sae = standard_sae()
    result = core.run_core(
        model,
        sae,
        tokens,
        release="local",
        sae_id="tiny",
        output_path=tmp_path,
        bos_token_id=BOS,
        progress=False,
    )
    validator.validate(result)


# the core wrapper writes SAEBench's core output over exactly the tokens given
def test_core_runs_on_given_model_and_tokens(tmp_path):
    model, sae, tokens = make_tiny_model(), standard_sae(), make_tokens(32, seed=3)
    result = core.run_core(
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
        core.run_core(
            model, sae, tokens, release="local", sae_id="tiny", output_path=tmp_path / "core"
        )
        is None
    )


# core adds the conventional explained variance under its own key: an SAE that outputs only
# the mean activation explains ~0 (SAEBench 0.6.0's own formula says ~1 on high-mean activations),
# and the written value equals 1 - SSE / SST computed here over the same positions.
def test_core_explained_variance_is_conventional(tmp_path):
    model, tokens = make_tiny_model(), make_tokens(32, seed=4)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D_MODEL).double()  # BOS excluded, as core's ignore_tokens
    shift = 50.0 * torch.ones(D_MODEL)  # a large mean, as in real residual streams

    def shifted(act, hook):
        return act + shift

    model.add_perma_hook(HOOK, shifted)
    x = x + shift.double()
    mean_only = standard_sae()
    with torch.no_grad():
        mean_only.W_dec.zero_()
        mean_only.b_dec.copy_(x.mean(0).float())
    sae = standard_sae(seed=1)
    for name, candidate in (("mean_only", mean_only), ("random", sae)):
        result = core.run_core(
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
