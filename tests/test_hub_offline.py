"""The hub path a researcher takes first, with no hub: ``--sae release:sae_id`` and no ``--model``.

A local Hugging Face cache holds a tiny GPT-2 (random weights) under the real name ``gpt2`` and
a tiny SAE under SAELens's real release ``gpt2-small-res-jb``; ``sae_bench run`` in a fresh
process with ``HF_HUB_OFFLINE=1`` must pick the SAE's own model (``gpt2-small``), load it with
the release's ``model_from_pretrained_kwargs`` (``center_writing_weights``) and score the SAE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import save_tiny_gpt2
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata

RELEASE, SAE_ID = "gpt2-small-res-jb", "blocks.0.hook_resid_pre"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(hub: Path, repo_id: str, source: Path, prefix: str = "") -> None:
    """Lay ``source``'s files out as the hub client's cache of ``repo_id`` at main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / prefix
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        shutil.copy(file, snapshot / file.name)


def test_release_and_hub_model_offline(tmp_path):
    hub = tmp_path / "hf" / "hub"
    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    put_in_cache(hub, "gpt2", model_dir)
    lookup = get_pretrained_saes_directory()[RELEASE]
    torch.manual_seed(0)
    meta = SAEMetadata(hook_name=SAE_ID, model_name="gpt2-small")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=meta))
    with torch.no_grad():
        sae.b_enc.fill_(0.2)
    sae.save_model(tmp_path / "sae")
    put_in_cache(hub, lookup.repo_id, tmp_path / "sae", prefix=lookup.saes_map[SAE_ID])

    out = tmp_path / "results"
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "csae_plugin.cli", "run", "--eval", "nces"]
    argv += ["--sae", f"{RELEASE}:{SAE_ID}", "--output-dir", str(out), "--no-progress"]
    argv += ["--context-size", "16", "--n-eval-sequences", "8", "--n-reference-sequences", "8"]
    argv += ["--latents", "4", "--null-draws", "2", "--seqs-per-latent", "2"]
    argv += ["--n-bootstrap", "20", "--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: gpt2-small (the SAEs' own model_name" in done.stdout
    assert "{'center_writing_weights': True}" in done.stdout
    result = json.loads((out / "nces" / f"{RELEASE}_{SAE_ID}_eval_results.json").read_text())
    assert result["eval_config"]["model_name"] == "gpt2-small"
    assert result["sae_lens_release_id"] == RELEASE
    assert result["eval_result_metrics"]["nces"]["n_latents_evaluated"] == 4

    # the hub path applies the processing: writing weights centred only when asked
    probe = (
        "from csae_plugin.models import load_model\n"
        "for kw in ({}, {'center_writing_weights': True}):\n"
        "    m = load_model('gpt2-small', **kw)\n"
        "    print('W_out row mean', float(m.blocks[0].mlp.W_out.mean(-1).abs().max()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("W_out row mean")]
    plain, centred = (float(line.split()[-1]) for line in lines)
    assert plain > 1e-3 and centred < 1e-6
