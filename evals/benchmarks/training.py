"""Benchmark: training throughput of the causal SAE against a TopK SAE, same work, one run.

Both train through the same runner (:func:`csae_plugin.training.train_sae`) on the same model,
hook, tokens, width, k and batch size. The causal SAE uses a TopK encoder with the KL term
(lambda_kl 1 every 10 steps) and verification off; with ``--verify-every N`` a third row adds
causal verification every N steps. The clock runs from the start of the first training step to
the end of the last one (activation generation between steps included; model loading, the
activation-norm estimate and saving excluded); the whole ``train_sae`` call is reported too.
Results go to ``evals/results/bench_training_<model>.json``; the target is causal >= 0.6x TopK.

    python -m evals.benchmarks.training                # Gemma 3 270M, blocks.6.hook_resid_post
    python -m evals.benchmarks.training --model tiny   # in-process tiny model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from csae_plugin.training import TrainSpec, train_sae
from evals.common import (
    HOOK,
    MODEL,
    RESULTS,
    TINY_HOOK,
    StepClock,
    gemma_setup,
    machine,
    tiny_setup,
    write_json,
)

TARGET_RATIO = 0.6


def timed_training(
    model: HookedTransformer,
    hook: str,
    tokens: torch.Tensor,
    spec: TrainSpec,
    args: argparse.Namespace,
    bos: int,
    verify_tokens: torch.Tensor,
    steps: int,
) -> dict[str, Any]:
    """Train ``spec`` for ``steps`` steps; its timings (and verification history)."""
    with tempfile.TemporaryDirectory() as out, StepClock() as clock:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        _, runner = train_sae(
            model,
            hook,
            tokens,
            spec,
            training_tokens=steps * args.batch_tokens,
            output_path=out,
            batch_size_tokens=args.batch_tokens,
            seed=args.seed,
            exclude_special_tokens=[bos],
            verify_tokens=verify_tokens,
            device=args.device,
            norm_estimate_batches=args.norm_estimate_batches,
        )
        total = time.perf_counter() - start
    context = getattr(runner.sae, "causal_context", None)
    history = [] if context is None else list(context.history)
    steps_timed = clock.steps
    return {
        "architecture": spec.architecture,
        "overrides": spec.overrides,
        "steps": steps_timed,
        "seconds": clock.seconds,
        "steps_per_s": steps_timed / clock.seconds,
        "tokens_per_s": steps_timed * args.batch_tokens / clock.seconds,
        "train_sae_seconds": total,
        "verification_history": history,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hook", default=None, help="default blocks.6 (gemma) / blocks.1 (tiny)")
    parser.add_argument("--d-sae", type=int, default=None, help="default 2048 (gemma) / 256")
    parser.add_argument("--k", type=int, default=None, help="default 32 (gemma) / 8 (tiny)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="default 1024 / 256")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--context-size", type=int, default=None, help="default 128 / 32")
    parser.add_argument("--kl-every", type=int, default=10)
    parser.add_argument("--lambda-kl", type=float, default=1.0)
    parser.add_argument("--kl-batch-size", type=int, default=4, help="sequences per KL step")
    parser.add_argument("--verify-every", type=int, default=0, help="0: no verification row")
    parser.add_argument("--verify-latents", type=int, default=64)
    parser.add_argument("--norm-estimate-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="rows alternate; medians reported")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed TopK run first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    defaults = {"d_sae": 2048, "k": 32, "batch_tokens": 1024, "context_size": 128}
    if args.model == "tiny":
        defaults = {"d_sae": 256, "k": 8, "batch_tokens": 256, "context_size": 32}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    start = time.perf_counter()
    if args.model == "tiny":
        model, train, evaluation, bos = tiny_setup(args.context_size, rows=512, eval_rows=64)
    else:
        model, train, evaluation, bos = gemma_setup(args.device, args.context_size)
    load_s = time.perf_counter() - start
    hook = args.hook or (TINY_HOOK if args.model == "tiny" else HOOK)
    causal = {
        "activation": "topk",
        "kl_estimator": "exact",
        "kl_finetune_fraction": 0.0,
        "lambda_kl": args.lambda_kl,
        "kl_every": args.kl_every,
        "kl_batch_size": args.kl_batch_size,
        "verify_every": 0,
    }
    specs = {
        "topk": TrainSpec("topk", args.d_sae, args.k),
        "causal": TrainSpec("causal", args.d_sae, args.k, causal),
    }
    if args.verify_every > 0:
        verify = {**causal, "verify_every": args.verify_every}
        verify["verify_latents"] = args.verify_latents
        specs["causal_verify"] = TrainSpec("causal", args.d_sae, args.k, verify)
    verify_tokens = evaluation[:16]

    if args.warmup_steps > 0:  # one-time costs (allocator, thread pools) out of the first row
        timed_training(
            model, hook, train, specs["topk"], args, bos, verify_tokens, args.warmup_steps
        )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
    for repeat in range(args.repeats):
        order = list(specs) if repeat % 2 == 0 else list(reversed(specs))
        for name in order:
            row = timed_training(
                model, hook, train, specs[name], args, bos, verify_tokens, args.steps
            )
            runs[name].append(row)
            print(f"{name}: {row['steps_per_s']:.3f} steps/s ({row['seconds']:.1f} s)", flush=True)

    def median_rate(name: str) -> float:
        return statistics.median(r["steps_per_s"] for r in runs[name])

    ratio = median_rate("causal") / median_rate("topk")
    result = {
        "benchmark": "training throughput: causal SAE (KL term) vs TopK SAE, same runner",
        "machine": machine(args.device),
        "settings": {
            "model": args.model,
            "hook": hook,
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_tokens": args.batch_tokens,
            "context_size": args.context_size,
            "steps": args.steps,
            "kl_every": args.kl_every,
            "lambda_kl": args.lambda_kl,
            "kl_batch_size": args.kl_batch_size,
            "verify_every": args.verify_every,
            "verify_latents": args.verify_latents if args.verify_every else None,
            "verify_tokens": int(verify_tokens.shape[0]),
            "d_vocab": int(model.cfg.d_vocab),
            "repeats": args.repeats,
            "seed": args.seed,
            "timed": "first training step's start to last step's end (activation generation "
            "included; model load, norm estimate and saving excluded)",
        },
        "runs": runs,
        "steps_per_s": {name: median_rate(name) for name in specs},
        "tokens_per_s": {name: median_rate(name) * args.batch_tokens for name in specs},
        "ratio_causal_over_topk": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": bool(ratio >= TARGET_RATIO),
        "setup_seconds": {"model_and_data": load_s},
    }
    if "causal_verify" in specs:
        result["ratio_causal_verify_over_topk"] = median_rate("causal_verify") / median_rate("topk")
    out = write_json(args.out or RESULTS / f"bench_training_{args.model}.json", result)
    print(f"causal / topk throughput: {ratio:.3f} (target {TARGET_RATIO}); written to {out}")
    return result


if __name__ == "__main__":
    main()
