"""A new user's battery of bad inputs and interruptions (issue 24), on the tiny model.

Each case either finishes as an uninterrupted run would, or ends as one line
``sae_bench: error: ...`` that names the problem and its fix, with nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import FAST, one_error_line, result_files, save_standard, save_tiny_gpt2
from safetensors.torch import load_file, save_file

from csae_plugin import cli, models
from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces import shards

RESULT = "nces/local_sae_eval_results.json"
CHUNKS = "nces/.local_sae_eval_results.chunks"
_LATENT_EFFECTS = nces_main.latent_effects


def nces_argv(sae, out, *extra: str) -> list[str]:
    """``sae_bench run --eval nces`` on the tiny model, 6 latents in 3 chunks of 2."""
    argv = ["run", "--eval", "nces", "--sae", str(sae), "--model", "tiny"]
    return [*argv, "--output-dir", str(out), *FAST, "--latents-per-chunk", "2", *extra]


def chunk_calls(monkeypatch, interrupt_after: int = 10**6) -> list[int]:
    """Count the chunks computed; Ctrl-C once ``interrupt_after`` of them are done."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        if len(calls) == interrupt_after:
            raise KeyboardInterrupt
        calls.append(1)
        return _LATENT_EFFECTS(*args, **kwargs)

    monkeypatch.setattr(nces_main, "latent_effects", counted)
    return calls


def details(out) -> list[dict]:
    return json.loads((out / RESULT).read_text())["eval_result_details"]


@pytest.fixture
def sae(tmp_path):
    return save_standard(tmp_path / "sae")


# 1. a resumed run never mixes chunks of two SAEs: any parameter or buffer changed (b_enc here)
def test_resume_discards_chunks_of_an_sae_changed_in_any_parameter(
    tmp_path, sae, tiny_world, monkeypatch, capsys
):
    out = tmp_path / "out"
    chunk_calls(monkeypatch, interrupt_after=1)
    assert cli.main(nces_argv(sae, out)) == 130
    assert len(list((out / CHUNKS).glob("chunk_*.npz"))) == 1
    weights = load_file(sae / "sae_weights.safetensors")
    weights["b_enc"] += 0.5
    save_file(weights, sae / "sae_weights.safetensors")
    calls = chunk_calls(monkeypatch)
    capsys.readouterr()
    assert cli.main(nces_argv(sae, out)) == 0
    assert len(calls) == 3 and "resuming" not in capsys.readouterr().out
    assert cli.main(nces_argv(sae, tmp_path / "fresh")) == 0
    assert details(out) == details(tmp_path / "fresh")


# 2. Ctrl-C after the last chunk (in the bootstrap) keeps the chunks; the rerun only merges
def test_interrupt_before_the_result_is_written_keeps_every_chunk(
    tmp_path, sae, tiny_world, monkeypatch, capsys
):
    out = tmp_path / "out"
    assert cli.main(nces_argv(sae, tmp_path / "fresh")) == 0
    real = nces_main.effects_details

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nces_main, "effects_details", interrupted)
    assert cli.main(nces_argv(sae, out)) == 130
    assert "finished results are kept" in one_error_line(capsys)
    assert len(list((out / CHUNKS).glob("chunk_*.npz"))) == 3 and not (out / RESULT).exists()
    monkeypatch.setattr(nces_main, "effects_details", real)
    calls = chunk_calls(monkeypatch)
    assert cli.main(nces_argv(sae, out)) == 0
    assert calls == [] and "resuming: 3 of 3 chunks" in capsys.readouterr().out
    assert result_files(out) == [RESULT]  # the chunks go once the result is written
    assert details(out) == details(tmp_path / "fresh")


# 4. a second run on the same result refuses (one line) while the first holds it
def test_a_second_run_on_the_same_result_refuses_while_another_runs(
    tmp_path, sae, tiny_world, monkeypatch, capsys
):
    out = tmp_path / "out"
    chunk_calls(monkeypatch, interrupt_after=1)
    assert cli.main(nces_argv(sae, out)) == 130  # a first run's chunk and fingerprint
    capsys.readouterr()
    kept = result_files(out)
    with shards.exclusive(out / CHUNKS):  # another run is computing it (its own lock)
        assert cli.main(nces_argv(sae, out)) == 2
        line = one_error_line(capsys)
        assert "another run is computing local_sae_eval_results.json" in line
        assert "pass another --output-dir" in line
        assert result_files(out) == [*kept, "nces/.local_sae_eval_results.lock"]
    assert result_files(out) == kept  # the lock file goes with its holder
    calls = chunk_calls(monkeypatch)
    assert cli.main(nces_argv(sae, out)) == 0
    assert len(calls) == 2 and result_files(out) == [RESULT]


# 3. a latent listed twice, or past d_sae, is refused before the model loads
@pytest.mark.parametrize(
    ("latents", "needle"),
    [
        ("3,3", "latent 3 is listed 2 times in latents; list each latent once"),
        ("5,1,5,5", "latent 5 is listed 3 times"),
        ("1,99999", "latent index 99999 out of range: the SAE has d_sae=64 latents"),
    ],
)
def test_a_latent_list_the_sae_cannot_score_is_refused_before_the_model(
    tmp_path, sae, tiny_world, capsys, latents, needle
):
    out = tmp_path / "out"
    assert cli.main(nces_argv(sae, out, "--latents", latents)) == 2
    assert needle in one_error_line(capsys)
    assert tiny_world == [] and not out.exists()


def _write_cfg(sae, text: str) -> None:
    (sae / "cfg.json").write_text(text)


def _non_utf8_copy(sae, tmp_path) -> str:
    folder = os.fsencode(tmp_path) + b"/\xff\xfe"
    try:
        os.mkdir(folder)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    target = os.fsdecode(folder) + "/sae"
    shutil.copytree(sae, target)
    return target


def _wider_cfg(sae) -> None:
    cfg = json.loads((sae / "cfg.json").read_text())
    _write_cfg(sae, json.dumps(cfg | {"d_sae": 128}))


# 6. each bad input: exit code 2, one line naming the problem and the fix, no folder left
# behind; the cheap ones before the model loads
BAD_INPUTS = {
    # case: (argv change: --sae SPEC or extra flags, setup, needle, checked before the model)
    "device_without_gpu": (["--device", "cuda"], None, "no CUDA GPU is usable here", True),
    "unknown_device": (["--device", "gpu"], None, "unknown device 'gpu'; pass --device", True),
    "cfg_json_given": ("{sae}/cfg.json", None, "is a file; pass the folder that holds", True),
    "non_utf8_path": ("{utf8}", None, "path is not valid UTF-8", True),
    "mistyped_folder": ("results/sae", None, "'results' is not a SAELens release; check", True),
    "cfg_is_a_list": (None, lambda s: _write_cfg(s, "[]"), "a JSON list, not an object", True),
    "cfg_is_empty": (None, lambda s: _write_cfg(s, ""), "is corrupt", True),
    "d_sae_mismatch": (None, _wider_cfg, "W_dec has shape [64, 32] in sae_weights", True),
    "no_weights": (
        None,
        lambda s: (s / "sae_weights.safetensors").unlink(),
        "is not a saved SAE: it needs",
        True,
    ),
    "damaged_weights": (
        None,
        lambda s: (s / "sae_weights.safetensors").write_bytes(b"\0" * 64),
        "re-save the SAE",
        True,
    ),
    "same_sae_twice": (["--sae", "{sae}", "{sae}"], None, "would share the result file", True),
    "negative_latent": (["--latents", "-1"], None, "latents", True),
    "not_a_number": (["--null-draws", "many"], None, "null_draws", True),
    "context_past_n_ctx": (["--context-size", "100000"], None, "n_ctx=16 positions", False),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_as_one_line_naming_the_fix(
    tmp_path, sae, tiny_world, monkeypatch, capsys, case
):
    change, setup, needle, cheap = BAD_INPUTS[case]
    if case == "device_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    if setup is not None:
        setup(sae)
    if case == "mistyped_folder":
        monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = nces_argv(sae, out)
    if isinstance(change, str):
        argv[argv.index("--sae") + 1] = change.format(sae=sae, utf8=_non_utf8_copy(sae, tmp_path))
    elif change is not None:
        argv += [item.format(sae=sae) for item in change]
    assert cli.main(argv) == 2
    assert needle in one_error_line(capsys)
    assert not out.exists()
    assert tiny_world == ([] if cheap else ["tiny"])


# 7. with --no-progress a real model load (a local Hugging Face folder) draws no progress bar,
# so an error after it is still one line
def test_no_progress_keeps_an_error_after_the_model_load_to_one_line(tmp_path, capsys):
    model = save_tiny_gpt2(tmp_path / "tiny-gpt2")  # n_ctx 32
    argv = ["run", "--eval", "nces", "--sae", str(save_standard(tmp_path / "sae"))]
    argv += ["--model", str(model), "--output-dir", str(tmp_path / "out"), *FAST]
    capsys.readouterr()
    assert cli.main([*argv, "--context-size", "64"]) == 2
    assert "n_ctx=32 positions" in one_error_line(capsys)


@pytest.fixture
def two_results(tmp_path, tiny_world, capsys):
    """Finished nces results of SAEs a and b in ``tmp_path/out``; returns that folder."""
    saes = [str(save_standard(tmp_path / name)) for name in ("a", "b")]
    out = tmp_path / "out"
    argv = ["run", "--eval", "nces", "--sae", *saes, "--output-dir", str(out), *FAST]
    assert cli.main(argv) == 0
    capsys.readouterr()
    return out


# 8. compare shows the good results, names each bad file (exit 1), and says when two files
# hold the same eval of one SAE
def test_compare_shows_the_good_results_and_names_each_bad_file(two_results, capsys):
    nces = two_results / "nces"
    (nces / "local_c_eval_results.json").write_text("{not json")
    good = json.loads((nces / "local_a_eval_results.json").read_text())
    bad = good | {"sae_lens_id": "d", "eval_result_metrics": []}
    (nces / "local_d_eval_results.json").write_text(json.dumps(bad))
    assert cli.main(["compare", str(two_results)]) == 1
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()[2:]] == ["a", "b"]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("sae_bench: error: result file") for e in errors)
    assert "local_c_eval_results.json' is corrupt (JSONDecodeError" in errors[0]
    assert "local_d_eval_results.json' is corrupt (TypeError: eval_result_metrics" in errors[1]
    assert "Traceback" not in captured.err


def test_compare_says_when_two_files_hold_one_saes_result(two_results, capsys):
    copy = two_results / "nces" / "copy" / "a_again_eval_results.json"
    copy.parent.mkdir()
    copy.write_text((two_results / "nces" / "local_a_eval_results.json").read_text())
    assert cli.main(["compare", str(two_results)]) == 0
    note = capsys.readouterr().err
    assert "note: two nces results for a:" in note and "a_again_eval_results.json" in note


# 8. a finished result made with other settings is skipped with a note saying why
def test_rerun_with_other_settings_says_why_the_result_is_skipped(tmp_path, two_results, capsys):
    result = two_results / "nces" / "local_a_eval_results.json"
    before = result.read_text()
    argv = ["run", "--eval", "nces", "--sae", str(tmp_path / "a"), "--output-dir", str(two_results)]
    assert cli.main([*argv, *FAST]) == 0
    assert "other settings" not in capsys.readouterr().err
    assert cli.main([*argv, *FAST, "--null-draws", "4", "--latents", "5"]) == 0
    note = capsys.readouterr().err
    assert "result exists, made with other settings (" in note
    assert "null_draws 3, now 4" in note and "latents 6, now 5" in note
    assert "pass --force-rerun to redo it" in note
    assert result.read_text() == before


# an interrupt while the model loads: exit 130, one line, nothing written (no folder either)
def test_interrupt_during_the_model_load_leaves_nothing(tmp_path, sae, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    assert cli.main(nces_argv(sae, tmp_path / "out")) == 130
    assert "interrupted" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
