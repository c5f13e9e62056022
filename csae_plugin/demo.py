"""``sae_bench demo``: the whole idea on a real model, offline, in minutes.

On the embedded Gemma 3 270M (or ``--model``), train a causal SAE and a TopK baseline of the
same width at the same L0 on the same training tokens through SAELens's runner, score both
with SAEBench's ``core`` and the plugin's ``nces`` eval on held-out tokens, then print the
comparison and write it (JSON, CSV) and its plots to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from csae_plugin.evals.api import (
    SUMMARY_COLUMNS,
    evaluate_saes,
    load_results,
    plot_results,
    writable_dir,
)
from csae_plugin.evals.reference_saes import REFERENCE_KINDS, save_reference_saes
from csae_plugin.models import EMBEDDED_MODEL, check_hook, load_model
from csae_plugin.saes.causal import DEFAULT_LAMBDA_KL
from csae_plugin.training import TrainSpec, cache_activations, train_sae
from csae_plugin.training.cache import STORE_BATCH_PROMPTS
from csae_plugin.training.train import activations_read

DEFAULT_HOOK = "blocks.6.hook_resid_post"
DEMO_REFERENCES = ("random_isotropic", "random_covariance", "planted_fisher")
"""The demo's reference dictionaries: random directions with independent firing (NCES must not
verify them) and the planted control (the top Fisher directions, which it must find)."""


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae_bench demo",
        description="Train a causal SAE and a TopK baseline, score both with core and nces.",
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model (default: %(default)s)")
    parser.add_argument("--hook", default=DEFAULT_HOOK, help="hook name (default: %(default)s)")
    parser.add_argument("--dataset", default=None, help="HF dataset (default: stdlib docs)")
    parser.add_argument("--output-dir", default="demo_output", help="where results go")
    parser.add_argument("--d-sae", type=int, default=2048, help="SAE width")
    parser.add_argument("--k", type=int, default=32, help="target L0 of both SAEs")
    parser.add_argument("--training-tokens", type=int, default=80_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument(
        "--kl-estimator",
        choices=["fisher", "exact"],
        default="fisher",
        help="the causal SAE's KL term: its second-order (Fisher) form on every step, estimated "
        "once (the config's default), or the exact KL every --kl-every steps (mostly noise "
        "on a few sequences per step: evals/REPORT.md)",
    )
    parser.add_argument(
        "--lambda-kl",
        type=float,
        default=None,
        help="causal SAE's KL weight (default: the config's, 1000, with fisher; 1 with exact)",
    )
    parser.add_argument(
        "--kl-every", type=int, default=None, help="default: 1 with fisher, 10 with exact"
    )
    parser.add_argument(
        "--fisher-sequences",
        type=int,
        default=8,
        help="sequences the Fisher metric is estimated on (default: %(default)s)",
    )
    parser.add_argument(
        "--kl-positions",
        type=int,
        default=0,
        help="exact KL only: positions per KL sequence compared (0: all; fewer is cheaper "
        "and noisier)",
    )
    parser.add_argument("--latents", type=int, default=16, help="latents scored by nces")
    parser.add_argument(
        "--reference-latents",
        type=int,
        default=8,
        help="latents scored per reference dictionary; 0: none",
    )
    parser.add_argument(
        "--references",
        nargs="+",
        choices=REFERENCE_KINDS,
        default=list(DEMO_REFERENCES),
        metavar="KIND",
        help="reference dictionaries scored beside the SAEs (default: %(default)s, the negative "
        f"and positive controls; choices: {', '.join(REFERENCE_KINDS)})",
    )
    parser.add_argument(
        "--eval-context", type=int, default=64, help="tokens per held-out sequence scored"
    )
    parser.add_argument("--null-draws", type=int, default=4)
    parser.add_argument("--seqs-per-latent", type=int, default=4)
    parser.add_argument(
        "--n-eval-sequences", type=int, default=32, help="held-out sequences nces draws from"
    )
    parser.add_argument(
        "--core-sequences",
        type=int,
        default=16,
        help="held-out sequences core scores (its clean, spliced and zero-ablated passes run "
        "the whole model: the demo's costliest eval per sequence; default: %(default)s)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def causal_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The causal SAE's config fields from the demo's flags (defaults by estimator)."""
    fisher = args.kl_estimator == "fisher"
    overrides: dict[str, object] = {
        "kl_estimator": args.kl_estimator,
        "lambda_kl": args.lambda_kl
        if args.lambda_kl is not None
        else DEFAULT_LAMBDA_KL[args.kl_estimator],
        "kl_every": args.kl_every if args.kl_every is not None else (1 if fisher else 10),
    }
    if fisher:
        overrides["fisher_sequences"] = args.fisher_sequences
    else:
        overrides["kl_positions"] = args.kl_positions
    return overrides


def main(argv: list[str] | None = None) -> int:
    from csae_plugin.data import corpus_splits

    args = arg_parser().parse_args(argv)
    out = writable_dir(args.output_dir)
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        """Close the running stage: its seconds go to ``stages`` under ``name``."""
        stages[name] = time.perf_counter() - started - sum(stages.values())

    print(f"[demo] loading {args.model} ...", flush=True)
    model = load_model(args.model, device=args.device)
    check_hook(model, args.hook)
    stage("load model")
    splits = corpus_splits(model.tokenizer, args.context_size, seed=args.seed, dataset=args.dataset)
    stage("corpus")
    bos = getattr(model.tokenizer, "bos_token_id", None)
    special = [bos] if bos is not None else None
    print(
        f"[demo] corpus: {splits.train.shape[0]} training and {splits.eval.shape[0]} evaluation "
        f"sequences of {args.context_size} tokens (disjoint)",
        flush=True,
    )
    specs = [
        TrainSpec(
            "causal",
            args.d_sae,
            args.k,
            causal_overrides(args),
        ),
        TrainSpec("topk", args.d_sae, args.k),
    ]
    # the model runs once over the training rows; both SAEs train from the cached activations
    # (the causal SAE's KL term still runs the model, on the same rows). Rows for everything the
    # runner reads (scale estimate, b_dec's start, training, the mixing buffer's read-ahead), in
    # whole store batches, at most the whole training split: no activation is used twice
    needed = activations_read(args.training_tokens, args.context_size)
    per_row = args.context_size - (1 if special else 0)  # BOS positions are not trained on
    batches = -(-needed // (per_row * STORE_BATCH_PROMPTS))
    rows = min(batches, len(splits.train) // STORE_BATCH_PROMPTS) * STORE_BATCH_PROMPTS
    train_rows = splits.train[:rows]
    print(f"[demo] caching activations of {train_rows.numel():,} training tokens", flush=True)
    t0 = time.perf_counter()
    cache = cache_activations(
        model, args.hook, train_rows, out / "activation_cache", device=args.device
    )
    cache_seconds = time.perf_counter() - t0
    stage("cache activations")
    folders = []
    train_seconds = {}
    for spec in specs:
        print(f"[demo] training {spec.name} on {args.training_tokens:,} tokens", flush=True)
        folder = out / "saes" / spec.name
        t0 = time.perf_counter()
        train_sae(
            model,
            args.hook,
            train_rows,
            spec,
            training_tokens=args.training_tokens,
            output_path=folder,
            seed=args.seed,
            exclude_special_tokens=special,
            device=args.device,
            cached_activations_path=cache,
        )
        # each SAE's share of the one pass of the model that cached the activations
        train_seconds[spec.name] = time.perf_counter() - t0 + cache_seconds / len(specs)
        folders.append(folder)
        stage(f"train {spec.architecture}")
    shutil.rmtree(cache)  # ~2.6 kB per token: not worth keeping in the results folder

    nces = {
        "latents": args.latents,
        "null_draws": args.null_draws,
        "seqs_per_latent": args.seqs_per_latent,
        "random_seed": args.seed,
        "context_size": args.eval_context,
    }

    reference_rows = splits.train[: args.n_eval_sequences, : args.eval_context]

    def score(evals: list[str], saes: list[Path], latents: int, sequences: int) -> None:
        evaluate_saes(
            evals=evals,
            sae_specs=[str(f) for f in saes],
            model=model,
            # held-out rows, cut to --eval-context tokens (core reads the first of nces's)
            eval_tokens=splits.eval[:sequences, : args.eval_context],
            reference_tokens=reference_rows,
            output_dir=out / "eval_results",
            device=args.device,
            nces_overrides=nces | {"latents": latents},
            # the SAEs were just (re)trained: a result left by an earlier run is stale
            force_rerun=True,
        )

    score(["core"], folders, args.latents, args.core_sequences)
    stage("score core")
    score(["nces"], folders, args.latents, args.n_eval_sequences)
    stage("score nces")
    ran = {folder.name for folder in folders}
    if args.reference_latents > 0:
        print(f"[demo] reference dictionaries: {', '.join(args.references)}", flush=True)
        # built on the rows whose covariance the null is drawn from, so the random
        # dictionaries' directions are drawn like their own null directions
        references = save_reference_saes(
            model,
            args.hook,
            reference_rows,
            out / "saes",
            d_sae=args.d_sae,
            kinds=tuple(args.references),
            seed=args.seed,
            bos_token_id=bos,
        )
        stage("build reference dictionaries")
        score(["nces"], references, args.reference_latents, args.n_eval_sequences)
        ran |= {Path(folder).name for folder in references}
        stage("score reference dictionaries")
    # this run's SAEs only, not results an earlier run left in the same folder
    table = load_results([out / "eval_results"])
    table = table.loc[[name for name in table.index if name in ran]]
    table["train_seconds"] = [train_seconds.get(name, float("nan")) for name in table.index]
    # how many latents each fraction is over: scored, and live among them
    table["n_scored"] = table["n_latents_evaluated"]
    table["n_live"] = (table["n_latents_evaluated"] * (1 - table["frac_dead"])).round()
    columns = (*SUMMARY_COLUMNS, "n_scored", "n_live", "train_seconds")
    summary = table[[c for c in columns if c in table.columns]]
    summary.to_csv(out / "comparison.csv")
    plot_results(table, out / "plots", eval_dirs=[out / "eval_results"])
    stage("tables and plots")
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "settings": vars(args),
                "machine": _machine(),
                "minutes": (time.perf_counter() - started) / 60,
                "stage_seconds": stages,
                "table": json.loads(summary.to_json(orient="index")),
            },
            indent=2,
        )
        + "\n"
    )
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    print("[demo] stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"[demo] done in {(time.perf_counter() - started) / 60:.1f} min; results in {out}")
    return 0


def _machine() -> dict[str, object]:
    import os
    import platform

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
