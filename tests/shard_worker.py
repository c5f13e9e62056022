"""One process of a (possibly torchrun-launched) NCES run on the tiny model, for test_shards.

    python tests/shard_worker.py OUT_DIR                          # one process
    python -m torch.distributed.run --nproc-per-node 2 tests/shard_worker.py OUT_DIR

Writes its pid to OUT_DIR/pid_rank<r> first, so a test can kill one rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import make_tiny_model, make_tokens
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from csae_plugin.evals.nces import main as nces_main
from csae_plugin.evals.nces import shards
from csae_plugin.evals.nces.eval_config import NCESEvalConfig


def main(out: Path) -> None:
    shards.init_from_env("cpu")
    torch.set_num_threads(1)
    rank, _ = shards.rank_and_world()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid_rank{rank}").write_text(str(os.getpid()))
    torch.manual_seed(0)
    hook = "blocks.0.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name=hook)))
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
