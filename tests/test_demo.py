"""``sae_bench demo`` end to end on the tiny model: two trained SAEs and the references."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import make_tiny_model, make_tokens

from csae_plugin import data, demo


def test_demo_trains_scores_and_tabulates_with_reference_dictionaries(tmp_path, monkeypatch):
    model = make_tiny_model()  # no tokenizer: BOS is not special here
    splits = data.CorpusSplits(train=make_tokens(200), eval=make_tokens(24, seed=1))
    monkeypatch.setattr(demo, "load_model", lambda name, device="cpu", dtype="float32": model)
    monkeypatch.setattr(data, "corpus_splits", lambda *args, **kwargs: splits)
    argv = ["--hook", "blocks.0.hook_resid_post", "--d-sae", "64", "--k", "4"]
    argv += ["--training-tokens", "2048", "--context-size", "16", "--eval-context", "16"]
    argv += ["--latents", "4", "--reference-latents", "3", "--n-eval-sequences", "8"]
    argv += ["--core-sequences", "4"]
    argv += ["--null-draws", "2", "--seqs-per-latent", "2", "--device", "cpu"]
    # an earlier run's results in the same folder: one for an SAE this run retrains, one for
    # an SAE it does not train; neither may reach the table
    for name, l0 in (("topk_64_k4", 12345.0), ("old_sae", 1.0)):
        stale = tmp_path / "eval_results" / "core" / f"local_{name}_eval_results.json"
        stale.parent.mkdir(parents=True, exist_ok=True)
        result = {"sae_lens_release_id": "local", "sae_lens_id": name}
        stale.write_text(json.dumps(result | {"eval_result_metrics": {"sparsity": {"l0": l0}}}))
    assert demo.main([*argv, "--output-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "comparison.csv", index_col="sae")
    # by default the controls only: random directions and the planted Fisher directions
    references = [f"reference_{k}" for k in ("random-isotropic", "random-covariance")]
    references += ["reference_planted-fisher"]
    assert sorted(table.index) == sorted(["causal_64_k4", "topk_64_k4", *references])
    assert (table.loc[["causal_64_k4", "topk_64_k4"], "n_scored"] == 4).all()
    assert (table.loc[references, "n_scored"] == 3).all()
    assert 0 < table.loc["topk_64_k4", "l0"] <= 4 and table.loc[references, "l0"].isna().all()
    assert {"nces_geomean", "frac_verified", "mean_effect_kl", "n_live"} <= set(table.columns)
    assert not (tmp_path / "activation_cache").exists()  # both SAEs trained from it, then gone
    written = json.loads((tmp_path / "comparison.json").read_text())
    settings, stages = written["settings"], written["stage_seconds"]
    # every stage timed, and together they are the run
    assert {"load model", "cache activations", "train causal", "train topk"} <= set(stages)
    assert {"score core", "score nces", "score reference dictionaries"} <= set(stages)
    assert sum(stages.values()) <= written["minutes"] * 60 <= sum(stages.values()) + 1
    assert settings["reference_latents"] == 3
    assert settings["references"] == list(demo.DEMO_REFERENCES)
    # core reads --core-sequences held-out rows, nces draws from --n-eval-sequences
    core = json.loads(next((tmp_path / "eval_results" / "core").glob("*topk*.json")).read_text())
    config = core["eval_config"]
    assert config["batch_size_prompts"] * config["n_eval_reconstruction_batches"] == 4
    assert settings["kl_estimator"] == "fisher"


def test_demo_causal_settings_follow_the_kl_estimator():
    """Fisher (the default): the config's lambda (1000) every step on --fisher-sequences; exact:
    lambda 1 every 10 steps with --kl-positions; explicit flags win over both."""
    parse = demo.arg_parser().parse_args
    assert demo.causal_overrides(parse([])) == {
        "kl_estimator": "fisher",
        "lambda_kl": 1000.0,
        "kl_every": 1,
        "fisher_sequences": 8,
    }
    assert demo.causal_overrides(parse(["--kl-estimator", "exact", "--kl-positions", "16"])) == {
        "kl_estimator": "exact",
        "lambda_kl": 1.0,
        "kl_every": 10,
        "kl_positions": 16,
    }
    chosen = demo.causal_overrides(parse(["--lambda-kl", "3", "--kl-every", "2"]))
    assert (chosen["lambda_kl"], chosen["kl_every"]) == (3.0, 2)


def test_demo_references_flag_takes_any_kind_and_names_the_choices(capsys):
    parse = demo.arg_parser().parse_args
    assert parse(["--references", "pca", "identity"]).references == ["pca", "identity"]
    with pytest.raises(SystemExit):
        parse(["--references", "pcb"])
    assert "invalid choice: 'pcb'" in capsys.readouterr().err
