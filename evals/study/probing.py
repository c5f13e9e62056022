"""Causal consistency by targeted probing, for saved SAELens SAEs (``csae_plugin.evals.probing``).

For each concept (next token is a digit / a call's ``(`` / a sentence's first word), the
latents that best predict it on training tokens are zeroed on held-out tokens, and the drop of
the model's log-probability of the concept is compared with zeroing firing-rate-matched random
latents. Writes a JSON (settings, machine, per-concept numbers, chosen latents) and a CSV (one
row per SAE and concept) and prints a table.

    python -m evals.study.probing --sae path/to/sae [path/to/other_sae ...]
    python -m evals.study.probing --init-topk /tmp/topk --sae /tmp/topk  # a quick SAE first

``--init-topk FOLDER`` saves a TopK SAE initialised from data, untrained (decoder rows are
centred activations, :func:`evals.common.data_initialised_topk`), built on training rows the
probe does not use: a smoke test of the pipeline, not a meaningful SAE.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from csae_plugin.data import corpus_splits
from csae_plugin.evals.probing import default_concepts, probing_consistency
from csae_plugin.models import load_model
from csae_plugin.saes.loading import load_sae
from evals.common import HOOK, MODEL, RESULTS, data_initialised_topk, machine, write_json

TABLE_COLUMNS = ["sae", "concept", "n_eval_positive", "drop_probe", "drop_random", "ratio"]
TABLE_COLUMNS += ["ratio_ci_low", "ratio_ci_high", "difference", "consistent"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", nargs="+", required=True, help="saved SAE folders")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument(
        "--hook", default=None, help=f"default: the SAE's hook_name ({HOOK} if unset)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "probing.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--probe-seqs", type=int, default=64, help="training rows to probe on")
    parser.add_argument("--eval-seqs", type=int, default=64, help="held-out rows to ablate on")
    parser.add_argument("--top-m", type=int, default=8, help="probe latents per concept")
    parser.add_argument("--random-draws", type=int, default=8, help="matched random sets")
    parser.add_argument("--match-pool", type=int, default=5, help="nearest latents drawn from")
    parser.add_argument("--batch-size", type=int, default=16, help="sequence copies per forward")
    parser.add_argument("--n-resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-topk", type=Path, default=None, help="first save a quick SAE here")
    parser.add_argument("--d-sae", type=int, default=2048, help="width of --init-topk")
    parser.add_argument("--k", type=int, default=32, help="k of --init-topk")
    return parser.parse_args(argv)


def init_topk(model, tokens: torch.Tensor, args: argparse.Namespace) -> None:
    """Save a data-initialised TopK SAE (:func:`evals.common.data_initialised_topk`) to
    ``args.init_topk``."""
    n_rows = -(-2 * args.d_sae // (args.context_size - 1))  # twice d_sae non-BOS tokens
    hook = args.hook or HOOK
    sae = data_initialised_topk(model, hook, tokens[:n_rows], args.d_sae, args.k, args.seed)
    args.init_topk.mkdir(parents=True, exist_ok=True)
    sae.save_model(args.init_topk)
    print(f"saved a data-initialised TopK SAE (d_sae={args.d_sae}, k={args.k}) to {args.init_topk}")


def csv_table(results: list[dict]) -> pd.DataFrame:
    """One row per SAE and concept: the concept's numbers, then the SAE's (prefixed ``sae_``)."""
    frames = []
    for r in results:
        table = pd.DataFrame(r["concepts"])
        table.insert(0, "sae", r["sae"])
        for key, value in {**r["summary"], "seconds": r["seconds"]}.items():
            table[f"sae_{key}"] = value
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = load_model(args.model, device=args.device)
    splits = corpus_splits(model.tokenizer, args.context_size, seed=args.seed)
    probe_tokens = splits.train[: args.probe_seqs]
    eval_tokens = splits.eval[: args.eval_seqs]
    if args.init_topk is not None:
        init_topk(model, splits.train[args.probe_seqs :], args)
    concepts = default_concepts(model.tokenizer)
    setup_s = time.perf_counter() - start

    results = []
    for spec in args.sae:
        sae, release, sae_id = load_sae(spec, device=args.device)
        sae.eval()
        hook = sae.cfg.metadata.hook_name
        if args.hook is not None and hook not in (None, args.hook):
            raise SystemExit(f"SAE {spec!r} reads {hook!r}, not --hook {args.hook!r}")
        sae.cfg.metadata.hook_name = hook or args.hook or HOOK
        start = time.perf_counter()
        result = probing_consistency(
            model,
            sae,
            probe_tokens,
            eval_tokens,
            concepts,
            top_m=args.top_m,
            random_draws=args.random_draws,
            match_pool=args.match_pool,
            batch_size=args.batch_size,
            n_resamples=args.n_resamples,
            seed=args.seed,
        )
        seconds = time.perf_counter() - start
        results.append(
            {
                "sae": spec,
                "release": release,
                "sae_id": sae_id,
                "architecture": sae.cfg.architecture(),
                "d_sae": int(sae.cfg.d_sae),
                "hook_name": sae.cfg.metadata.hook_name,
                "seconds": seconds,
                "summary": result.summary,
                "concepts": result.concepts.to_dict(orient="records"),
                "latents": result.latents.to_dict(orient="records"),
            }
        )

    output = {
        "eval": "probing: causal consistency of probe latents vs firing-rate-matched random latents",
        "machine": machine(args.device),
        "settings": {
            **vars(args),
            "probe_split": "train",
            "eval_split": "eval",
            "concepts": {c.name: len(c.token_ids) for c in concepts},
        },
        "setup_seconds": setup_s,
        "saes": results,
    }
    write_json(args.out, output)
    table = csv_table(results)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[TABLE_COLUMNS].to_string(index=False, float_format="{:.4g}".format))
        for r in results:
            s = r["summary"]
            print(
                f"{r['sae']}: ratio geomean {s['ratio_geomean']:.3g} "
                f"[{s['ratio_geomean_ci_low']:.3g}, {s['ratio_geomean_ci_high']:.3g}], "
                f"mean difference {s['difference_mean']:.3g} nats "
                f"[{s['difference_mean_ci_low']:.3g}, {s['difference_mean_ci_high']:.3g}] "
                f"({r['seconds']:.0f} s)"
            )
    print(f"written to {args.out} and {args.out.with_suffix('.csv')}")
    return output


if __name__ == "__main__":
    main()
