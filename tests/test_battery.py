"""A new user's battery of bad inputs and interruptions (issue 24), on the tiny model.

Each case either finishes as an uninterrupted run would, or ends as one line
``sae_bench: error: ...`` that names the problem and its fix, with nothing half-written.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from test_cli import FAST, one_error_line, result_files, save_standard

from csae_plugin import cli
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
