"""Benchmark: the second-order screen's time for every latent of 2k- and 16k-latent SAEs.

On the embedded Gemma 3 270M (layer 6 residual stream), ``bench_nces.py``'s data-initialised
TopK SAEs (k 32) of each width; the screen reads 24 held-out sequences of 64 tokens with 8
label samples, as ``latents='screen:N'`` does by default. Results:
``evals/results/bench_screen_<device>.json``.

    python evals/bench_screen.py            # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_nces import data_initialised_topk, gemma_setup  # noqa: E402

from csae_plugin import causal as iv  # noqa: E402
from csae_plugin.causal.screen import nces_screen  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.6.hook_resid_post"


def main() -> None:
    model, train, evaluation, bos = gemma_setup("cpu", 64)
    rows = {}
    for d_sae in (2048, 16384):
        n_init = -(-2 * d_sae // 63)
        sae = data_initialised_topk(model, HOOK, train[64 : 64 + n_init], d_sae, 32)
        stats = iv.reference_stats(model, sae, train[:32], bos_token_id=bos)
        start = time.perf_counter()
        screen = nces_screen(model, sae, evaluation[:24], stats, samples=8, bos_token_id=bos)
        seconds = time.perf_counter() - start
        rows[d_sae] = {
            "seconds": seconds,
            "latents_seen_firing": int((screen.n_sequences > 0).sum()),
        }
        print(d_sae, rows[d_sae], flush=True)
    result = {
        "benchmark": "second-order screen of every latent (nces_screen), by dictionary width",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "settings": {
            "model": "gemma-3-270m",
            "hook": HOOK,
            "sae": "TopK k=32, data-initialised (untrained)",
            "sequences": 24,
            "context": 64,
            "samples": 8,
        },
        "by_d_sae": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_screen_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
