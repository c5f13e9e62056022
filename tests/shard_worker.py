"""One process of a (possibly torchrun-launched) NCES run on the tiny model, for
tests/evals/nces/test_shards.py.

    python tests/shard_worker.py OUT_DIR                          # one process
    python -m torch.distributed.run --nproc-per-node 2 tests/shard_worker.py OUT_DIR
    python tests/shard_worker.py OUT_DIR --gemma --threads 2      # the embedded model

Writes its pid to OUT_DIR/pid_rank<r> first, so a test can kill one rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import make_tiny_model, make_tokens, standard_sae

from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces import shards
from csae_plugin.evals.nces.eval_config import NCESEvalConfig


def main(out: Path, gemma: bool = False, threads: int = 1) -> None:
    shards.init_from_env("cpu")
    torch.set_num_threads(threads)
    rank, _ = shards.rank_and_world()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid_rank{rank}").write_text(str(os.getpid()))
    if gemma:
        return run_gemma(out)
    sae = standard_sae()
    config = NCESEvalConfig(
        model_name="tiny",
        context_size=16,
        latents="all",
        latents_per_chunk=4,
        null_draws=8,
        seqs_per_latent=8,
        n_bootstrap=50,
    )
    nces_main.evaluate_and_save(
        config,
        make_tiny_model(),
        sae,
        "tiny",
        "sharded",
        out / "results",
        make_tokens(64, seed=1),
        make_tokens(16, seed=2),
        progress=False,
    )


def run_gemma(out: Path) -> None:
    """8 latents of a random covariance-shaped dictionary on the embedded model, 2 chunks."""
    from csae_plugin.data import corpus_splits
    from csae_plugin.evals.reference_saes import hook_activations, reference_sae
    from csae_plugin.models import load_model

    hook = "blocks.6.hook_resid_post"
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 32, seed=0)
    acts = hook_activations(model, hook, splits.train[:32])
    sae = reference_sae("random_covariance", acts, hook, d_sae=64, seed=1, firing_rate=0.05)
    config = NCESEvalConfig(
        context_size=32,
        latents=8,
        latents_per_chunk=4,
        null_draws=4,
        seqs_per_latent=4,
        n_bootstrap=50,
    )
    nces_main.evaluate_and_save(
        config,
        model,
        sae,
        "gemma",
        "sharded",
        out / "results",
        splits.eval[:24],
        splits.train[:24],
        progress=False,
    )


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        gemma="--gemma" in sys.argv,
        threads=int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1,
    )
