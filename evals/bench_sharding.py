"""Benchmark: the exact NCES eval in 1 process against N torch.distributed processes (gloo).

Runs ``python -m csae_plugin.evals.nces.main`` once plainly (all of torch's threads) and once
under ``torchrun --nproc-per-node N`` (each process gets cores / N threads), on the same SAE,
latents and settings, and reports both wall times, the speed-up and whether the per-latent
results are identical (bitwise only where every process runs the same number of threads, as in
``tests/test_shards.py``: here 1 process has all the cores' threads and each of N has a share,
so matrix products sum in another order). Results: ``evals/results/bench_sharding_<device>.json``.

The SAE is ``bench_nces.py``'s data-initialised TopK SAE (speed only, not quality).

    python evals/bench_sharding.py                     # Gemma 3 270M, 2 processes, 16 latents
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_nces import data_initialised_topk, gemma_setup  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.6.hook_resid_post"


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command[:4])} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--latents-per-chunk", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    model, train, _, _ = gemma_setup("cpu", 64)
    sae = data_initialised_topk(model, HOOK, train[64 : 64 + 66], 2048, 32)
    sae.cfg.metadata.model_name = "gemma-3-270m"
    sae.save_model(work / "sae")
    del model
    flags = ["--sae_paths", str(work / "sae"), "--model_name", "gemma-3-270m"]
    flags += ["--latents", str(args.latents), "--latents_per_chunk", str(args.latents_per_chunk)]
    flags += ["--null_draws", "4", "--seqs_per_latent", "4", "--context_size", "64"]
    flags += ["--n_eval_sequences", "64", "--n_reference_sequences", "32", "--device", "cpu"]
    module = ["-m", "csae_plugin.evals.nces.main"]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    one = run([sys.executable, *module, *flags, "--output_folder", str(work / "one")], env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.processes}"]
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    many = run(
        [*torchrun, *module, *flags, "--output_folder", str(work / "many")],
        env | {"OMP_NUM_THREADS": str(threads)},
    )
    name = "local_sae_eval_results.json"
    a = json.loads((work / "one" / name).read_text())["eval_result_details"]
    b = json.loads((work / "many" / name).read_text())["eval_result_details"]
    result = {
        "benchmark": "exact NCES eval, 1 process vs torchrun gloo processes, same work",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "settings": vars(args)
        | {
            "model": "gemma-3-270m",
            "hook": HOOK,
            "threads_per_process": threads,
            "sae": "TopK d_sae=2048 k=32, data-initialised (untrained)",
        },
        "one_process_seconds": one,
        "sharded_seconds": many,
        "speedup": one / many,
        "identical_per_latent_results": a == b,
        "max_relative_difference_effect_kl": max(
            abs(x["effect_kl"] - y["effect_kl"]) / abs(x["effect_kl"])
            for x, y in zip(a, b, strict=True)
            if x["effect_kl"]
        ),
        "note": "wall times include each process's start, model load and reference statistics",
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_sharding_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
