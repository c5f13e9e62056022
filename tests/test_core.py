"""``core`` is SAEBench's core: every key SAEBench writes holds SAEBench's own number.

SAEBench's ``multiple_evals`` loads the model and the dataset by name; here its two loaders are
pointed at the tiny model and the same token rows ``run_core`` reads (in the same order, no
shuffle), so both run on the same SAE and tokens.
"""

from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from conftest import BOS, D_MODEL, make_tiny_model, make_tokens
from sae_bench.evals.core import main as saebench_core
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activations_store import ActivationsStore

from csae_plugin.evals import core

HOOK = "blocks.0.hook_resid_post"


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
    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(d_in=D_MODEL, d_sae=64, metadata=SAEMetadata(hook_name=HOOK))
    )
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
    sae = StandardSAE(
        StandardSAEConfig(d_in=D_MODEL, d_sae=64, metadata=SAEMetadata(hook_name=HOOK))
    )
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
