"""The ``sae_bench`` command on the tiny model (claims C1-C6).

The model and text loaders are monkeypatched to the tiny model and tiny token rows (it has
no tokenizer), so each command runs offline in seconds.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import (
    D_MODEL,
    FAST,
    HOOK,
    N_CTX,
    make_tiny_model,
    make_tokens,
    one_error_line,
    result_files,
    save_standard,
)
from sae_bench.evals.core.eval_output import CoreEvalOutput
from sae_lens.saes.sae import SAEMetadata

from csae_plugin import CausalTrainingSAE, CausalTrainingSAEConfig, cli, models
from csae_plugin.evals import tokens
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces.eval_output import NCESEvalOutput


def save_causal(folder):
    torch.manual_seed(1)
    cfg = CausalTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4, metadata=SAEMetadata(hook_name=HOOK))
    CausalTrainingSAE(cfg).save_model(folder)
    return folder


# C1. run --eval core,nces writes both SAEBench files per SAE (a causal one included), one model load
def test_c1_run_writes_core_and_nces_results(tmp_path, tiny_world, capsys):
    saes = [save_standard(tmp_path / "standard"), save_causal(tmp_path / "causal")]
    out = tmp_path / "results"
    argv = ["run", "--eval", "core,nces", "--sae", *map(str, saes), "--model", "tiny"]
    assert cli.main([*argv, "--output-dir", str(out), *FAST]) == 0
    assert tiny_world == ["tiny"]
    assert result_files(out) == [
        "core/local_causal_eval_results.json",
        "core/local_standard_eval_results.json",
        "nces/local_causal_eval_results.json",
        "nces/local_standard_eval_results.json",
    ]
    for name in ("causal", "standard"):
        nces = NCESEvalOutput(
            **json.loads((out / f"nces/local_{name}_eval_results.json").read_text())
        )
        core = CoreEvalOutput(
            **json.loads((out / f"core/local_{name}_eval_results.json").read_text())
        )
        assert nces.eval_config.latents == 6 and nces.eval_result_metrics.nces.null_draws == 3
        # the config records the tokens used (12 rows of N_CTX), not its defaults
        assert (nces.eval_config.n_eval_sequences, nces.eval_config.context_size) == (12, N_CTX)
        assert nces.eval_config.n_reference_sequences == 12
        assert core.eval_result_metrics.sparsity.l0 > 0
    causal = json.loads((out / "nces/local_causal_eval_results.json").read_text())
    assert causal["sae_cfg_dict"]["architecture"] == "topk"  # saved as its plain equivalent
    assert causal["sae_cfg_dict"]["metadata"]["training_architecture"] == "causal"
    summary = capsys.readouterr().out
    assert "causal" in summary and "standard" in summary and "nces_geomean" in summary


# C2. each bad input: exit code 2, one line on stderr, no result file, cheap checks before the model
@pytest.mark.parametrize(
    "case, needle",
    [
        ("unknown_eval", "unknown eval 'probing'"),
        ("missing_sae", "does not exist"),
        ("corrupt_sae", "is corrupt"),
        ("unknown_architecture", "unknown architecture"),
        ("unwritable_output", "can't be written"),
        ("bad_config", "null_draws"),
        ("unknown_null", "unknown null 'gaussian'"),
        ("one_null_draw", "null_draws"),
        ("nan_weights", "NaN or inf values in W_dec"),
        ("fractional_k", "k must be a whole number"),
        ("hook_mismatch", "not in the model"),
        ("d_in_mismatch", "does not match"),
        ("unknown_model", "has no config.json"),
        ("nan_activations", "NaN activations"),
        ("zero_tokens", "zero evaluation tokens"),
    ],
)
def test_c2_bad_inputs_exit_2_with_one_line(
    tmp_path, tiny_world, monkeypatch, capsys, case, needle
):
    sae = save_standard(tmp_path / "sae")
    out = tmp_path / "results"
    args = {"--eval": "core,nces", "--sae": str(sae), "--model": "tiny", "--output-dir": str(out)}
    cheap = case in ("unknown_eval", "missing_sae", "corrupt_sae", "unknown_architecture")
    cheap |= case in ("unwritable_output", "bad_config", "unknown_null", "one_null_draw")
    cheap |= case in ("nan_weights", "fractional_k")
    if case == "unknown_eval":
        args["--eval"] = "nces,probing"
    elif case == "missing_sae":
        args["--sae"] = str(tmp_path / "nope")
    elif case == "corrupt_sae":
        (sae / "cfg.json").write_text("{not json")
    elif case == "unknown_architecture":
        cfg = json.loads((sae / "cfg.json").read_text())
        (sae / "cfg.json").write_text(json.dumps(cfg | {"architecture": "mystery"}))
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("")
        args["--output-dir"] = str(tmp_path / "file" / "results")
    elif case == "bad_config":
        args["--null-draws"] = "0"
    elif case == "unknown_null":
        args["--null"] = "matched,gaussian"
    elif case == "one_null_draw":
        args["--null-draws"] = "1"
    elif case == "nan_weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(sae / "sae_weights.safetensors")
        weights["W_dec"][3, 5] = float("nan")
        save_file(weights, sae / "sae_weights.safetensors")
    elif case == "fractional_k":
        cfg = json.loads((sae / "cfg.json").read_text())
        (sae / "cfg.json").write_text(json.dumps(cfg | {"architecture": "topk", "k": 7.5}))
    elif case == "hook_mismatch":
        args["--sae"] = str(save_standard(tmp_path / "hook", hook="blocks.9.hook_resid_post"))
    elif case == "d_in_mismatch":
        args["--sae"] = str(save_standard(tmp_path / "narrow", d_in=16))
    elif case == "unknown_model":
        monkeypatch.undo()
        (tmp_path / "empty_model").mkdir()
        args["--model"] = str(tmp_path / "empty_model")
    elif case == "nan_activations":
        model = make_tiny_model()
        with torch.no_grad():
            model.W_E[:] = float("nan")
        monkeypatch.setattr(models, "load_model", lambda name, device="cpu", dtype="float32": model)
    elif case == "zero_tokens":
        empty = torch.zeros((0, 16), dtype=torch.long)
        monkeypatch.setattr(tokens, "load_tokens", lambda model, config: (empty, empty))
    argv = ["run", *FAST, *[item for pair in args.items() for item in pair]]
    assert cli.main(argv) == 2
    assert needle in one_error_line(capsys)
    assert not (out.exists() and result_files(out))
    if cheap:
        assert tiny_world == []


# C3. an interrupt exits 130 with one line, keeps finished SAEs, and a rerun resumes after them
def test_c3_interrupt_keeps_finished_saes_and_rerun_resumes(
    tmp_path, tiny_world, monkeypatch, capsys
):
    saes = [str(save_standard(tmp_path / "a")), str(save_standard(tmp_path / "b"))]
    out = tmp_path / "results"
    argv = ["run", "--eval", "nces", "--sae", *saes, "--output-dir", str(out), *FAST]
    real = nces_main.latent_effects
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nces_main, "latent_effects", interrupt_second)
    assert cli.main(argv) == 130
    assert "interrupted" in one_error_line(capsys)
    # a's result; b's work folder, which holds no finished chunk (it was interrupted in its first)
    assert result_files(out) == [
        "nces/.local_b_eval_results.chunks/fingerprint.json",
        "nces/local_a_eval_results.json",
    ]
    first = (out / "nces/local_a_eval_results.json").read_text()

    monkeypatch.setattr(nces_main, "latent_effects", real)
    assert cli.main(argv) == 0
    assert result_files(out) == ["nces/local_a_eval_results.json", "nces/local_b_eval_results.json"]
    assert (out / "nces/local_a_eval_results.json").read_text() == first

    tiny_world.clear()
    assert cli.main(argv) == 0  # everything finished: nothing to do, no model load
    assert tiny_world == []


# C4. compare reads the result folders into one table, a CSV and plots
def test_c4_compare_writes_csv_and_plots(tmp_path, tiny_world, capsys):
    saes = [str(save_standard(tmp_path / "standard")), str(save_causal(tmp_path / "causal"))]
    out = tmp_path / "results"
    argv = ["run", "--eval", "core,nces", "--sae", *saes, "--output-dir", str(out), *FAST]
    assert cli.main(argv) == 0
    csv, plots = tmp_path / "table.csv", tmp_path / "plots"
    assert cli.main(["compare", str(out), "--csv", str(csv), "--plots", str(plots)]) == 0
    table = pd.read_csv(csv, index_col="sae")
    assert sorted(table.index) == ["causal", "standard"]
    columns = ("l0", "explained_variance", "explained_variance_centered", "kl_div_score")
    for column in (*columns, "ce_loss_score", "nces_median"):
        assert table[column].notna().all(), column
    for name in ("nces_hist.png", "l0_vs_ce_loss_score.png"):
        assert (plots / name).stat().st_size > 1000
    assert cli.main(["compare", str(tmp_path / "nowhere")]) == 2


# C5. list names each eval on one line; every subcommand has --help
def test_c5_list_and_help(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["core", "nces"]
    for command in ([], ["run"], ["list"], ["compare"]):
        assert cli.main([*command, "--help"]) == 0
        assert "usage: sae_bench" in capsys.readouterr().out


# C6. demo forwards its arguments to csae_plugin.demo.main
def test_c6_demo_is_forwarded(monkeypatch):
    from csae_plugin import demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["demo", "--k", "8", "--latents", "4"]) == 0
    assert seen == [["--k", "8", "--latents", "4"]]


# C6. SAEBench's own spellings of the options work too
def test_c6_saebench_spellings_are_accepted(tmp_path, tiny_world, capsys):
    sae = save_standard(tmp_path / "sae")
    out = tmp_path / "results"
    argv = ["run", "--eval", "nces", "--sae_paths", str(sae), "--model_name", "tiny"]
    argv += ["--output_folder", str(out), "--null_draws", "3", "--seqs_per_latent", "2"]
    argv += ["--latents", "4", "--n_bootstrap", "20", "--force_rerun", "--context_size", "16"]
    assert cli.main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    data = json.loads((out / "nces/local_sae_eval_results.json").read_text())
    assert data["eval_config"]["null_draws"] == 3 and data["eval_config"]["seqs_per_latent"] == 2
    assert cli.main(["run", "--eval", "nces", "--model", "tiny"]) == 2
    assert "no SAE given" in one_error_line(capsys)
    parsed = nces_main.cli_arg_parser().parse_args(
        ["--sae", "x", "--output-dir", "o", "--null-draws", "3", "--force-rerun"]
    )
    assert (parsed.sae_paths, parsed.output_folder, parsed.null_draws) == (["x"], "o", "3")


# C7. --llm-dtype reaches the model loader; a dtype it does not know is a one-line error
def test_c7_llm_dtype_is_passed_to_the_model_loader(tmp_path, monkeypatch, capsys):
    asked = []

    def load_model(name, device="cpu", dtype="float32"):
        asked.append(dtype)
        return make_tiny_model()

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(
        tokens, "load_tokens", lambda model, config: (make_tokens(12, 1), make_tokens(12, 2))
    )
    sae = str(save_standard(tmp_path / "sae"))
    argv = ["run", "--eval", "nces", "--sae", sae, "--output-dir", str(tmp_path / "out"), *FAST]
    assert cli.main([*argv, "--llm-dtype", "bfloat16"]) == 0
    assert asked == ["bfloat16"]
    capsys.readouterr()
    assert cli.main([*argv, "--llm-dtype", "float8", "--force-rerun"]) == 2
    assert "llm_dtype" in one_error_line(capsys)
    assert asked == ["bfloat16"]  # refused before any model load


# C8. without --model, the SAEs' own model and its loading kwargs are used (and said)
def test_c8_model_defaults_to_the_saes_own(tmp_path, monkeypatch, capsys):
    asked = []

    def load_model(name, device="cpu", dtype="float32", **kwargs):
        asked.append((name, kwargs))
        return make_tiny_model()

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(
        tokens, "load_tokens", lambda model, config: (make_tokens(12, 1), make_tokens(12, 2))
    )
    folders = []
    for name, model_name in (("a", "tiny-x"), ("b", "tiny-x"), ("c", "tiny-y")):
        folder = save_standard(tmp_path / name)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg |= {"model_name": model_name, "model_from_pretrained_kwargs": {"fold_ln": False}}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        folders.append(str(folder))
    argv = ["run", "--eval", "nces", "--output-dir", str(tmp_path / "out"), *FAST]
    assert cli.main([*argv, "--sae", *folders[:2]]) == 0
    assert asked == [("tiny-x", {"fold_ln": False})]
    assert "model: tiny-x (the SAEs' own model_name" in capsys.readouterr().out
    assert cli.main([*argv, "--sae", *folders]) == 2
    assert "trained on different models (tiny-x, tiny-y)" in one_error_line(capsys)
