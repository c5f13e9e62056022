"""Benchmark: the batched NCES engine against the naive reference, same work, one run.

Both evaluate the same latents on the same sequences with the same null directions and
resample draws; the script reports latent-evaluations per second of each, their ratio, the
largest differences between their numbers, and peak memory of the engine for N and 2N latents
(it must not grow). Results go to ``evals/results/bench_nces_<device>.json``.

It also measures, in the same run, the floor: the FLOPs of the work no exact engine can skip
(each copy's tail blocks from its first intervened position on, and the unembedding of each
scored position), divided by this machine's matmul rate, measured twice: on the unembedding's
own shape (rows x d_model x d_vocab, the bulk of the work) and on a square 2048^3 product (the
machine's best). The engine's time over the floor says how much is left to gain.

Two other measurements of the eval's cost run instead with ``--screen`` (the second-order
screen of every latent of 2k- and 16k-latent SAEs: ``bench_screen_<device>.json``) and
``--sharding`` (the exact eval in 1 process against N torch.distributed processes:
``bench_sharding_<device>.json``).

The SAE is a SAELens TopK SAE (k=32) initialised from data, not trained
(:func:`evals.common.data_initialised_topk`): every token fires its k best-matching latents,
so latents fire on realistic subsets of tokens. Only speed is measured here, not SAE quality.

    python -m evals.benchmarks.nces                  # Gemma 3 270M, blocks.6.hook_resid_post
    python -m evals.benchmarks.nces --model tiny     # in-process tiny model, seconds
    python -m evals.benchmarks.nces --screen         # a few minutes on a 2-core CPU
    python -m evals.benchmarks.nces --sharding       # 2 processes, 16 latents
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformer_lens import HookedTransformer

from csae_plugin import causal as iv
from csae_plugin.causal.inputs import capture_rows, prepare_inputs
from csae_plugin.causal.interventions import intervened_positions
from evals.common import (
    HOOK,
    MODEL,
    RESULTS,
    TINY_HOOK,
    PeakRSS,
    data_initialised_topk,
    gemma_setup,
    machine,
    plain,
    tiny_setup,
    write_json,
)

SCREEN_WIDTHS = (2048, 16384)
"""Dictionary widths ``--screen`` times."""

TARGET_SPEEDUP = 5.0
TARGET_OVER_FLOOR = 1.3


def run_naive(model, sae, tokens, effects, stats, seed, bos_token_id):
    """The naive reference on the engine's exact pairs and draws: (effect, null, seconds)."""
    start = time.perf_counter()
    effect, null = iv.naive_latent_effects(
        model, sae, tokens, effects, stats, seed=seed, bos_token_id=bos_token_id
    )
    return effect, null, time.perf_counter() - start


class FastUnembed:
    """Temporarily unembed with ``h @ W_U + b_U`` instead of TransformerLens's Unembed, which
    copies ``W_U.T`` (671 MB for Gemma 3) on every forward: a naive reference without that cost,
    so the speedup is also reported for the algorithm alone."""

    def __init__(self, model: HookedTransformer):
        self.unembed = model.unembed

    def _forward(self, residual: torch.Tensor) -> torch.Tensor:
        flat = residual.reshape(-1, residual.shape[-1])
        out = torch.addmm(self.unembed.b_U, flat, self.unembed.W_U)
        return out.reshape(*residual.shape[:-1], -1)

    def __enter__(self) -> FastUnembed:
        self.unembed.forward = self._forward
        return self

    def __exit__(self, *exc: object) -> None:
        del self.unembed.forward


def matmul_rates(model: HookedTransformer, rows: int = 256, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of this machine now: the unembedding's shape, and a square 2048^3 product."""

    def rate(a: torch.Tensor, b: torch.Tensor) -> float:
        torch.mm(a, b)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - start)

    w_u = model.unembed.W_U.detach()
    h = torch.randn(rows, w_u.shape[0], dtype=w_u.dtype, device=w_u.device)
    square = torch.randn(2048, 2048, dtype=w_u.dtype, device=w_u.device)
    return {"unembed_gflops": rate(h, w_u) / 1e9, "square_gflops": rate(square, square) / 1e9}


def floor_flops(model, sae, tokens, effects, bos_token_id) -> dict[str, float]:
    """FLOPs no exact engine can skip for ``effects``' copies (real and null alike).

    Per copy: the tail blocks at positions t >= t0 (its first intervened position; earlier
    positions are the clean forward's), counted as 2 x the blocks' weights per position plus
    4 n_heads d_head (t + 1) per layer for attention, and 2 d_model d_vocab per scored position
    (t >= t0, not BOS or padding) for the unembedding. Norms, activations and the KL's
    elementwise work are left out, so the floor is a lower bound. ``clean_flops`` adds the work
    needed once per sequence: the model's head up to the hook and the clean distribution at the
    positions some evaluated latent scores on it.
    """
    setup = prepare_inputs(model, sae, tokens, bos_token_id)
    cfg = model.cfg
    start = setup.plan.start or 0
    blocks = model.blocks[start:]
    weights = sum(p.numel() for b in blocks for p in b.parameters() if p.ndim >= 2)
    n_copies = 1 + len(effects.nulls) * effects.null_draws
    block_flops = unembed_flops = 0.0
    firsts = []
    with torch.no_grad():
        for li, latent in enumerate(effects.latents):
            for row in effects.sequences[li]:
                if row < 0:
                    continue
                rows = torch.tensor([int(row)])
                x, _ = capture_rows(setup, rows)
                f = sae.encode(x.to(sae.dtype))[0, :, int(latent)].float()
                valid = setup.valid[int(row)]
                hit = intervened_positions(effects.intervention, f, valid)
                t0 = int(hit.int().argmax()) if hit.any() else f.shape[0]
                firsts.append((int(row), t0))
                t = torch.arange(t0, f.shape[0])
                per_position = 2 * weights + 4 * cfg.n_heads * cfg.d_head * len(blocks) * (t + 1)
                block_flops += n_copies * float(per_position.sum())
                scored = int(valid[t0:].sum())
                unembed_flops += n_copies * scored * 2 * cfg.d_model * cfg.d_vocab
    # once per sequence, whatever the number of copies: the head of the model up to the hook,
    # and the clean distribution at every position some latent on that row scores
    head = sum(p.numel() for b in model.blocks[:start] for p in b.parameters() if p.ndim >= 2)
    first_per_row: dict[int, int] = {}
    for row, t0 in firsts:
        first_per_row[row] = min(t0, first_per_row.get(row, t0))
    clean_flops = 0.0
    for row, t0 in first_per_row.items():
        clean_flops += 2 * head * tokens.shape[1]
        clean_flops += int(setup.valid[row, t0:].sum()) * 2 * cfg.d_model * cfg.d_vocab
    return {
        "block_flops": block_flops,
        "unembed_flops": unembed_flops,
        "total_flops": block_flops + unembed_flops,
        "clean_flops": clean_flops,
        "total_with_clean_flops": block_flops + unembed_flops + clean_flops,
    }


def timed_engine(model, sae, tokens, latents, stats, args, bos_token_id):
    with PeakRSS() as memory:
        start = time.perf_counter()
        effects = iv.latent_effects(
            model,
            sae,
            tokens,
            latents,
            stats,
            intervention=args.intervention,
            null_draws=args.null_draws,
            seqs_per_latent=args.seqs_per_latent,
            batch_size=args.batch_size,
            seed=args.seed,
            bos_token_id=bos_token_id,
            progress=False,
        )
        seconds = time.perf_counter() - start
    return effects, seconds, memory.peak_bytes


def differences(engine: np.ndarray, naive: np.ndarray) -> dict[str, float]:
    both = ~np.isnan(engine) & ~np.isnan(naive)
    abs_diff = np.abs(engine[both] - naive[both])
    rel_diff = abs_diff / np.maximum(np.abs(naive[both]), 1e-30)
    return {
        "max_abs": float(abs_diff.max()),
        "max_rel": float(rel_diff.max()),
        "median_value": float(np.median(np.abs(naive[both]))),
        "min_value": float(np.abs(naive[both]).min()),
    }


def setup(args: argparse.Namespace) -> tuple[HookedTransformer, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        return tiny_setup(args.context_size)
    return gemma_setup(args.device, args.context_size)


def bench_engine(args: argparse.Namespace) -> dict:
    """The engine against the naive reference and the floor (the module's docstring)."""
    start = time.perf_counter()
    model, train, evaluation, bos = setup(args)
    hook = args.hook or (TINY_HOOK if args.model == "tiny" else HOOK)
    load_s = time.perf_counter() - start
    reference = train[: args.reference_seqs]
    n_init = -(-2 * args.d_sae // (args.context_size - 1))  # twice d_sae non-BOS tokens
    init_tokens = train[args.reference_seqs : args.reference_seqs + n_init]
    sae = data_initialised_topk(model, hook, init_tokens, args.d_sae, args.k, args.seed)
    start = time.perf_counter()
    stats = iv.reference_stats(model, sae, reference, bos_token_id=bos, seed=args.seed)
    stats_s = time.perf_counter() - start
    firing = np.nonzero(stats.firing_freq.numpy() > 0)[0]
    rng = np.random.default_rng(args.seed)
    latents = np.sort(rng.choice(firing, size=2 * args.n_latents, replace=False))
    n = args.n_latents

    small, small_s, small_mem = timed_engine(model, sae, evaluation, latents[:n], stats, args, bos)
    large, large_s, large_mem = timed_engine(model, sae, evaluation, latents, stats, args, bos)
    with PeakRSS() as naive_memory:
        naive_effect, naive_null, naive_s = run_naive(
            model, sae, evaluation, small, stats, args.seed, bos
        )

    fast_effect = fast_s = None
    if args.fast_naive:
        with FastUnembed(model):
            fast_effect, _, fast_s = run_naive(model, sae, evaluation, small, stats, args.seed, bos)
    rates = matmul_rates(model)
    floor = floor_flops(model, sae, evaluation, small, bos)

    evaluated = int((small.n_sequences > 0).sum())
    engine_rate = evaluated / small_s
    naive_rate = evaluated / naive_s
    speedup = engine_rate / naive_rate
    result = {
        "benchmark": "NCES batched engine vs naive reference (one full hooked forward per variant)",
        "machine": machine(args.device),
        "settings": {
            "model": args.model,
            "hook": hook,
            "n_latents": n,
            "seqs_per_latent": args.seqs_per_latent,
            "null_draws": args.null_draws,
            "context_size": args.context_size,
            "batch_size": args.batch_size,
            "intervention": args.intervention,
            "sae": f"TopK d_sae={args.d_sae} k={args.k}, data-initialised (untrained)",
            "reference_seqs": int(reference.shape[0]),
            "eval_seqs": int(evaluation.shape[0]),
            "d_vocab": int(model.cfg.d_vocab),
            "seed": args.seed,
        },
        "latent_evaluations": {
            "definition": "one latent on seqs_per_latent sequences, 1 real + null_draws null variants each",
            "latents": evaluated,
            "sequences_per_latent_min": int(small.n_sequences.min()),
            "copies_per_latent": int(small.n_sequences.max()) * (1 + args.null_draws),
            "engine_seconds": small_s,
            "naive_seconds": naive_s,
            "engine_per_s": engine_rate,
            "naive_per_s": naive_rate,
            "speedup": speedup,
            "target_speedup": TARGET_SPEEDUP,
            "target_met": bool(speedup >= TARGET_SPEEDUP),
            "naive_fast_unembed_seconds": fast_s,
            "speedup_vs_naive_fast_unembed": fast_s / small_s if fast_s else None,
            "engine_seconds_2n": large_s,
            "engine_per_s_2n": int((large.n_sequences > 0).sum()) / large_s,
        },
        "floor": {
            "definition": " ".join(floor_flops.__doc__.split("\n\n")[1].split()),
            **floor,
            "matmul_rates": rates,
            "engine_s_per_latent": small_s / evaluated,
            "floor_s_per_latent_at_unembed_rate": floor["total_flops"]
            / (rates["unembed_gflops"] * 1e9)
            / evaluated,
            "floor_s_per_latent_at_square_rate": floor["total_flops"]
            / (rates["square_gflops"] * 1e9)
            / evaluated,
            "floor_with_clean_s_per_latent_at_unembed_rate": floor["total_with_clean_flops"]
            / (rates["unembed_gflops"] * 1e9)
            / evaluated,
        },
        "differences": {
            "effect": differences(small.effect, naive_effect),
            "null": differences(small.null_per_draw, naive_null),
            "naive_fast_unembed_vs_naive": (
                differences(fast_effect, naive_effect) if fast_effect is not None else None
            ),
        },
        "peak_memory_mb": {
            "engine_n_latents": small_mem / 2**20,
            "engine_2n_latents": large_mem / 2**20,
            "naive": naive_memory.peak_bytes / 2**20,
            "measured_as": "peak RSS above the level at the start of the run, sampled every 5 ms",
        },
        "setup_seconds": {"model_and_data": load_s, "reference_stats": stats_s},
        "nces_of_benchmarked_latents": (
            np.nansum(small.effect, 1) / np.nansum(small.null, 1)
        ).tolist(),
    }
    f = result["floor"]
    f["engine_over_floor_at_unembed_rate"] = (
        f["engine_s_per_latent"] / f["floor_s_per_latent_at_unembed_rate"]
    )
    f["engine_over_floor_at_square_rate"] = (
        f["engine_s_per_latent"] / f["floor_s_per_latent_at_square_rate"]
    )
    f["engine_over_floor_with_clean_at_unembed_rate"] = (
        f["engine_s_per_latent"] / f["floor_with_clean_s_per_latent_at_unembed_rate"]
    )
    f["target_over_floor"] = TARGET_OVER_FLOOR
    return result


def bench_screen(args: argparse.Namespace) -> dict:
    """The second-order screen's time for every latent of 2k- and 16k-latent data-initialised
    TopK SAEs: 24 held-out sequences with 8 label samples, as ``latents='screen:N'`` reads by
    default."""
    from csae_plugin.causal.screen import nces_screen

    model, train, evaluation, bos = setup(args)
    hook = args.hook or (TINY_HOOK if args.model == "tiny" else HOOK)
    rows = {}
    for d_sae in SCREEN_WIDTHS:
        n_init = -(-2 * d_sae // (args.context_size - 1))
        sae = data_initialised_topk(model, hook, train[64 : 64 + n_init], d_sae, args.k)
        stats = iv.reference_stats(model, sae, train[:32], bos_token_id=bos)
        start = time.perf_counter()
        screen = nces_screen(model, sae, evaluation[:24], stats, samples=8, bos_token_id=bos)
        seconds = time.perf_counter() - start
        rows[d_sae] = {
            "seconds": seconds,
            "latents_seen_firing": int((screen.n_sequences > 0).sum()),
        }
        print(d_sae, rows[d_sae], flush=True)
    return {
        "benchmark": "second-order screen of every latent (nces_screen), by dictionary width",
        "machine": machine(args.device),
        "settings": {
            "model": args.model,
            "hook": hook,
            "sae": f"TopK k={args.k}, data-initialised (untrained)",
            "sequences": 24,
            "context": args.context_size,
            "samples": 8,
        },
        "by_d_sae": rows,
    }


def bench_sharding(args: argparse.Namespace) -> dict:
    """The exact NCES eval (``python -m csae_plugin.evals.nces.main``) once plainly (all of
    torch's threads) and once under ``torchrun --nproc-per-node N`` (each process gets cores / N
    threads), same SAE (data-initialised TopK), latents and settings: both wall times, the speed-up
    and whether the per-latent results are identical (bitwise only where every process runs the same
    number of threads, as in ``tests/evals/nces/test_shards.py``: here 1 process has all the cores'
    threads and each of N has a share, so matrix products sum in another order)."""
    if args.model != MODEL:
        raise SystemExit("--sharding runs the eval's command line, on Gemma 3 270M only")
    work = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    model, train, _, _ = setup(args)
    hook = args.hook or HOOK
    n_init = -(-2 * args.d_sae // (args.context_size - 1))
    sae = data_initialised_topk(model, hook, train[64 : 64 + n_init], args.d_sae, args.k)
    sae.cfg.metadata.model_name = MODEL
    sae.save_model(work / "sae")
    del model
    flags = ["--sae_paths", str(work / "sae"), "--model_name", MODEL]
    flags += ["--latents", str(args.sharded_latents)]
    flags += ["--latents_per_chunk", str(args.latents_per_chunk)]
    flags += ["--null_draws", str(args.null_draws), "--seqs_per_latent", str(args.seqs_per_latent)]
    flags += ["--context_size", str(args.context_size), "--n_eval_sequences", "64"]
    flags += ["--n_reference_sequences", "32", "--device", args.device]
    module = ["-m", "csae_plugin.evals.nces.main"]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    one = run_command([sys.executable, *module, *flags, "--output_folder", str(work / "one")], env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.processes}"]
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    many = run_command(
        [*torchrun, *module, *flags, "--output_folder", str(work / "many")],
        env | {"OMP_NUM_THREADS": str(threads)},
    )
    name = "local_sae_eval_results.json"
    a = json.loads((work / "one" / name).read_text())["eval_result_details"]
    b = json.loads((work / "many" / name).read_text())["eval_result_details"]
    return {
        "benchmark": "exact NCES eval, 1 process vs torchrun gloo processes, same work",
        "machine": machine(args.device),
        "settings": {
            "processes": args.processes,
            "latents": args.sharded_latents,
            "latents_per_chunk": args.latents_per_chunk,
            "model": MODEL,
            "hook": hook,
            "threads_per_process": threads,
            "sae": f"TopK d_sae={args.d_sae} k={args.k}, data-initialised (untrained)",
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


def run_command(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``command``; its output's tail if it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command[:4])} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hook", default=None, help="default blocks.6 (gemma) / blocks.1")
    parser.add_argument("--n-latents", type=int, default=8, help="N (the engine also runs 2N)")
    parser.add_argument("--seqs-per-latent", type=int, default=4)
    parser.add_argument("--null-draws", type=int, default=4)
    parser.add_argument("--context-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="copies per tail forward")
    parser.add_argument("--intervention", default="zero", choices=list(iv.INTERVENTIONS))
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reference-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--fast-naive",
        action="store_true",
        help="also time the naive reference with a copy-free unembedding (minutes more)",
    )
    parser.add_argument(
        "--screen",
        action="store_true",
        help="instead: time the second-order screen of every latent at d_sae "
        + " and ".join(map(str, SCREEN_WIDTHS)),
    )
    parser.add_argument(
        "--sharding",
        action="store_true",
        help="instead: the exact NCES eval in 1 process vs --processes torchrun processes",
    )
    parser.add_argument("--processes", type=int, default=2, help="--sharding's processes")
    parser.add_argument("--sharded-latents", type=int, default=16, help="--sharding's latents")
    parser.add_argument("--latents-per-chunk", type=int, default=4, help="--sharding's chunks")
    args = parser.parse_args(argv)
    if args.screen:
        result, name = bench_screen(args), "bench_screen"
    elif args.sharding:
        result, name = bench_sharding(args), "bench_sharding"
    else:
        result, name = bench_engine(args), "bench_nces"
    suffix = "" if args.model == MODEL else f"_{args.model}"
    out = write_json(args.out or RESULTS / f"{name}_{args.device}{suffix}.json", result)
    print(json.dumps(plain(result), indent=2))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
