"""Which NCES definition: score forms and nulls measured on the same raw effects.

    python evals/nces_definition.py --sae demo_output/saes/causal_2048_k32 \
        demo_output/saes/topk_2048_k32            # raw effects, then the analysis
    python evals/nces_definition.py --analyse-only  # the analysis of the saved effects

For each dictionary (trained SAEs given with ``--sae``; random dictionaries of five shapes; the
planted Fisher dictionary) the engine computes every latent's effect and its null effects under
the ``matched`` (band) and ``matched_eigen`` (0.2.0) nulls on the same sequences, and saves them
(``<out>/effects/<name>.npz``, so a rerun only adds what is missing). The analysis scores them
under each definition and null: the per-SAE geometric mean (ratio-of-sums 0.2.0, symmetric log
0.3.0) with its CI, the rank score, the fraction of p-values below 0.05 (5% for a calibrated
test on null-like dictionaries), the fraction verified and Storey's fraction beating the null;
and the variance components that bound the verdict's power (between null directions of one
latent, and the smallest effect ratio the settings verify). Writes ``summary.json`` and
``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from csae_plugin.causal import latent_effects, reference_stats
from csae_plugin.causal.nces import log_scores, nces_details, nces_metrics
from csae_plugin.data import corpus_splits
from csae_plugin.evals.reference_saes import (
    RANDOM_SHAPES,
    hook_activations,
    reference_fisher,
    reference_sae,
)
from csae_plugin.models import load_model
from csae_plugin.saes.loading import load_sae_from_folder

HOOK = "blocks.6.hook_resid_post"
NULLS = ("matched", "matched_eigen")
RANDOM = ("random_isotropic", "random_covariance", "random_mixture", *RANDOM_SHAPES)
FDR = 0.05


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", nargs="*", default=[], help="trained SAE folders")
    parser.add_argument("--out", default="evals/results/nces_definition")
    parser.add_argument("--latents", type=int, default=16, help="latents per dictionary")
    parser.add_argument("--seqs-per-latent", type=int, default=8)
    parser.add_argument("--null-draws", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--n-eval-sequences", type=int, default=96)
    parser.add_argument("--n-reference-sequences", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=256, help="width of the random dictionaries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analyse-only", action="store_true")
    return parser


def compute(args: argparse.Namespace, out: Path) -> None:
    torch.manual_seed(args.seed)
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, args.context, seed=args.seed)
    eval_tokens = splits.eval[: args.n_eval_sequences]
    reference = splits.train[: args.n_reference_sequences]
    acts = hook_activations(model, HOOK, reference)
    # the Fisher metric from rows neither the reference statistics nor the scoring read
    fisher_rows = splits.train[args.n_reference_sequences :]
    fisher = reference_fisher(model, HOOK, fisher_rows)
    dictionaries = {kind: None for kind in (*RANDOM, "planted_fisher")}
    dictionaries |= {Path(p).name: p for p in args.sae}
    for name, folder in dictionaries.items():
        path = out / "effects" / f"{name}.npz"
        if path.exists():
            continue
        if folder is None:
            width = args.d_sae if name.startswith("random") else args.latents
            sae = reference_sae(name, acts, HOOK, d_sae=width, seed=args.seed + 1, fisher=fisher)
        else:
            sae = load_sae_from_folder(folder)
        rng = np.random.default_rng(args.seed)
        latents = np.sort(rng.choice(sae.cfg.d_sae, args.latents, replace=False))
        started = time.perf_counter()
        st = reference_stats(model, sae, reference, seed=args.seed)
        effects = latent_effects(
            model,
            sae,
            eval_tokens,
            latents,
            st,
            null_draws=args.null_draws,
            seqs_per_latent=args.seqs_per_latent,
            seed=args.seed,
            null=NULLS,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            latents=effects.latents,
            effect=effects.effect,
            null_effects=effects.null_effects,
            seconds=time.perf_counter() - started,
        )
        print(f"[nces_definition] {name}: {time.perf_counter() - started:.0f} s", flush=True)


def analyse(name: str, data: dict[str, np.ndarray]) -> list[dict[str, object]]:
    rows = []
    for n, null in enumerate(NULLS):
        null_effects = data["null_effects"][:, :, n]
        for definition in ("0.3.0", "0.2.0"):
            details = nces_details(
                data["effect"], null_effects, data["latents"], definition=definition, seed=0
            )
            metrics = nces_metrics(details, seed=0)
            alive = details[~details["dead"]]
            rows.append(
                {
                    "dictionary": name,
                    "null": null,
                    "definition": definition,
                    "n_live": len(alive),
                    "geomean": metrics["nces_geomean"],
                    "geomean_ci": [metrics["nces_geomean_ci_low"], metrics["nces_geomean_ci_high"]],
                    "rank": metrics["nces_rank"],
                    "rank_ci": [metrics["nces_rank_ci_low"], metrics["nces_rank_ci_high"]],
                    "frac_p_below_0.05": float((alive["p_value"] < 0.05).mean()),
                    "frac_verified": metrics["frac_verified"],
                    "frac_beats_null": metrics["frac_beats_null"],
                }
                | power(data["effect"], null_effects)
            )
    return rows


def power(effect: np.ndarray, null: np.ndarray) -> dict[str, float]:
    """Variance components of the log scores and the smallest ratio these settings verify.

    ``null_direction_var``: mean over latents of the variance of L_k over the K null
    directions (what the direction test compares against). ``latent_excess_var``: variance
    over latents of L_0 - mean L_k beyond what that spread explains (how much latents differ
    in their true effect). ``min_verified_ratio``: the NCES at which the prediction t-test
    reaches 80% power at p = FDR x 0.1 (BH with a tenth of the latents real, K draws).
    """
    scores = log_scores(effect, null)
    live = ~np.isnan(scores[:, 0])
    scores = scores[live]
    if len(scores) < 3:
        return {}
    k = scores.shape[1] - 1
    null_var = float(scores[:, 1:].var(axis=1, ddof=1).mean())
    diffs = scores[:, 0] - scores[:, 1:].mean(axis=1)
    excess = float(diffs.var(ddof=1) - null_var * (1 + 1 / k))
    sd = np.sqrt(null_var * (1 + 1 / k))
    z = stats.norm.isf(FDR * 0.1) + stats.norm.isf(0.2)
    return {
        "null_direction_var": null_var,
        "latent_excess_var": excess,
        "min_verified_ratio": float(np.exp(z * sd)),
    }


def markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| dictionary | null | definition | live | geomean [CI] | rank [CI] | p<0.05 | verified "
        "| beats null | null-direction var | smallest verified ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        gl, gh = r["geomean_ci"]
        rl, rh = r["rank_ci"]
        lines.append(
            f"| {r['dictionary']} | {r['null']} | {r['definition']} | {r['n_live']} "
            f"| {r['geomean']:.3f} [{gl:.3f}, {gh:.3f}] | {r['rank']:.3f} [{rl:.3f}, {rh:.3f}] "
            f"| {r['frac_p_below_0.05']:.3f} | {r['frac_verified']:.3f} "
            f"| {r['frac_beats_null']:.3f} | {r.get('null_direction_var', float('nan')):.3f} "
            f"| {r.get('min_verified_ratio', float('nan')):.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    args = arg_parser().parse_args()
    out = Path(args.out)
    if not args.analyse_only:
        compute(args, out)
    rows = []
    for path in sorted((out / "effects").glob("*.npz")):
        rows += analyse(path.stem, dict(np.load(path)))
    summary = {
        "produced_by": "python evals/nces_definition.py " + " ".join(f"--sae {s}" for s in args.sae),
        "settings": {k: v for k, v in vars(args).items() if k != "analyse_only"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
