"""Same seed, same machine: training gives bit-identical SAE weights and the evals identical
result JSON (timestamps and ids aside), each run in its own process, as a user reruns them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

_RUN = """
import sys
sys.path.insert(0, {tests!r})
from conftest import BOS, make_tiny_model, make_tokens
import csae_plugin
from csae_plugin.evals.api import evaluate_saes
from csae_plugin.training import TrainSpec, train_sae

out = {out!r}
model, tokens = make_tiny_model(), make_tokens(64, seed=5)
folders = []
for spec in [
    TrainSpec("causal", 64, k=4, overrides={{"kl_estimator": "exact", "kl_every": 2,
                                             "kl_finetune_fraction": 0.0, "kl_batch_size": 4,
                                             "verify_every": 5,
                                             "verify_latents": 8, "verify_null_draws": 2}}),
    TrainSpec("topk", 64, k=4),
]:
    folder = f"{{out}}/saes/{{spec.name}}"
    train_sae(model, "blocks.0.hook_resid_post", tokens, spec, training_tokens=64 * 40,
              batch_size_tokens=64, output_path=folder, seed=0, exclude_special_tokens=[BOS],
              verify_tokens=make_tokens(8, seed=9), norm_estimate_batches=2)
    folders.append(folder)
evaluate_saes(["core", "nces"], folders, model=model, eval_tokens=make_tokens(12, seed=1),
              reference_tokens=make_tokens(12, seed=2), output_dir=f"{{out}}/eval_results",
              nces_overrides={{"latents": 6, "null_draws": 3, "seqs_per_latent": 3,
                               "n_bootstrap": 50}}, progress=False)
"""

VOLATILE = {"eval_id", "datetime_epoch_millis"}


def _run(out: Path) -> None:
    code = _RUN.format(tests=str(TESTS), out=str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _stable(path: Path) -> dict:
    payload = json.loads(path.read_text())
    return {k: v for k, v in payload.items() if k not in VOLATILE}


def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    weights = sorted((tmp_path / "a").rglob("*.safetensors"))
    assert len(weights) == 4  # weights and feature sparsity of two SAEs
    for path in weights:
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == twin.read_bytes(), path
    results = sorted((tmp_path / "a" / "eval_results").rglob("*.json"))
    assert len(results) == 4  # core and nces for two SAEs
    for path in results:
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert _stable(path) == _stable(twin), path
