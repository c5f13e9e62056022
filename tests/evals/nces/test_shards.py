"""NCES in chunks: resumable, and shared over torch.distributed processes (gloo, on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TESTS

from csae_plugin.causal.engine import LatentEffects
from csae_plugin.evals.nces import shards

WORKER = TESTS / "shard_worker.py"  # beside conftest, which it imports
RESULT = "results/tiny_sharded_eval_results.json"


def launch(out: Path, processes: int, *options: str) -> subprocess.Popen:
    """The worker in one plain process, or in ``processes`` gloo processes under torchrun."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
        command += [f"--master-port={29500 + os.getpid() % 1000}"]
    return subprocess.Popen(
        [*command, str(WORKER), str(out), *options],
        cwd=WORKER.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-2000:]
    return output


def per_latent(out: Path) -> tuple[list, dict]:
    result = json.loads((out / RESULT).read_text())
    return result["eval_result_details"], result["eval_result_metrics"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    finish(launch(out, 1))
    return out


def test_two_gloo_processes_give_the_one_process_results(one_process, tmp_path):
    finish(launch(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pid_rank0", "pid_rank1", "results"]
    assert per_latent(tmp_path) == per_latent(one_process)
    assert len(per_latent(tmp_path)[0]) == 64  # every latent, each once
    assert os.listdir(tmp_path / "results") == [Path(RESULT).name]  # chunks cleaned up


def test_a_killed_rank_leaves_its_finished_chunks_and_a_rerun_resumes(one_process, tmp_path):
    run = launch(tmp_path, 2)
    chunks = tmp_path / "results" / ".tiny_sharded_eval_results.chunks"
    deadline = time.monotonic() + 300
    while not list(chunks.glob("chunk_*1.npz")) + list(chunks.glob("chunk_*3.npz")):
        assert run.poll() is None and time.monotonic() < deadline, "rank 1 finished no chunk"
        time.sleep(0.02)
    os.kill(int((tmp_path / "pid_rank1").read_text()), signal.SIGKILL)
    run.communicate(timeout=120)
    assert run.returncode != 0 and not (tmp_path / RESULT).exists()
    kept = sorted(p.name for p in chunks.glob("chunk_*.npz"))
    assert 0 < len(kept) < 16  # 64 latents in chunks of 4: some done, not all
    output = finish(launch(tmp_path, 2))
    assert "resuming" in output
    assert per_latent(tmp_path) == per_latent(one_process)


def fake_effects(latents: np.ndarray) -> LatentEffects:
    n = len(latents)
    return LatentEffects(
        latents=np.asarray(latents),
        effect=np.asarray(latents, dtype=float)[:, None] * np.ones((n, 2)),
        null_effects=np.ones((n, 2, 1, 3)),
        sequences=np.zeros((n, 2), dtype=np.int64),
        n_positions=np.ones((n, 2), dtype=np.int64),
        intervention="zero",
        null_draws=3,
        alpha=1.0,
    )


def test_chunks_resume_only_for_the_same_inputs(tmp_path):
    calls = []

    def compute(ids):
        calls.append(ids.tolist())
        return fake_effects(ids)

    latents = np.arange(10)
    work = tmp_path / "work"
    shards._claim(work, "key-a", 0)
    shards._save(fake_effects(np.arange(4, 8)), shards._chunk_path(work, 1))
    merged = shards.chunked_effects(compute, latents, work, "key-a", 4, progress=False)
    assert calls == [[0, 1, 2, 3], [8, 9]]  # chunk 1 was done
    np.testing.assert_array_equal(merged.latents, latents)
    np.testing.assert_array_equal(merged.effect[:, 0], latents)
    assert len(list(work.glob("chunk_*.npz"))) == 3  # kept until the result is written
    shards.remove_chunks(work)
    assert not work.exists()
    # a chunk from other inputs (another fingerprint) is discarded, not merged
    shards._claim(work, "key-a", 0)
    shards._save(fake_effects(np.arange(100, 104)), shards._chunk_path(work, 1))
    calls.clear()
    merged = shards.chunked_effects(compute, latents, work, "key-b", 4, progress=False)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    np.testing.assert_array_equal(merged.latents, latents)


def test_fingerprint_changes_with_any_input():
    import torch

    base = shards.fingerprint({"seed": 1}, torch.zeros(3))
    assert base == shards.fingerprint({"seed": 1}, torch.zeros(3))
    assert base != shards.fingerprint({"seed": 2}, torch.zeros(3))
    assert base != shards.fingerprint({"seed": 1}, torch.tensor([0.0, 0.0, 1e-6]))
    # a state dict: every parameter and buffer by name, dtype and exact bytes
    state = {"W_enc": torch.ones(2, 3), "threshold": torch.zeros(3, dtype=torch.float64)}
    key = shards.fingerprint(state)
    assert key == shards.fingerprint({k: v.clone() for k, v in state.items()})
    assert key != shards.fingerprint(state | {"threshold": torch.full((3,), 1e-12).double()})
    assert key != shards.fingerprint(state | {"threshold": torch.zeros(3)})
    assert key != shards.fingerprint(state | {"extra": torch.tensor(0.0)})


@pytest.mark.slow
def test_thread_count_and_processes_do_not_move_nces_on_the_embedded_model(tmp_path):
    """1 thread, 2 threads, and 2 gloo processes of 1 thread give the same per-latent NCES
    (to 1e-3 relative): the matched null's draws do not depend on rounding."""
    runs = {}
    for name, processes, threads in (("one", 1, "1"), ("two_threads", 1, "2"), ("gloo", 2, "1")):
        out = tmp_path / name
        finish(launch(out, processes, "--gemma", "--threads", threads))
        details = json.loads((out / "results/gemma_sharded_eval_results.json").read_text())
        runs[name] = {d["latent"]: d["nces"] for d in details["eval_result_details"]}
    reference = runs.pop("one")
    live = [latent for latent, value in reference.items() if value is not None]
    assert len(live) >= 6
    for name, run in runs.items():
        assert run.keys() == reference.keys(), name
        np.testing.assert_allclose(
            [run[k] for k in live], [reference[k] for k in live], rtol=1e-3, err_msg=name
        )
