"""Which NCES definition: score forms and nulls measured on the same raw effects.

    python -m evals.study.nces_definition --sae demo_output/saes/causal_2048_k32 \
        demo_output/saes/topk_2048_k32                  # raw effects, then the analysis
    python -m evals.study.nces_definition --analyse-only  # the analysis of the saved effects

For each dictionary (trained SAEs given with ``--sae``; random dictionaries of seven shapes; the
planted Fisher dictionary) the engine computes every latent's effect and its null effects under
the ``matched`` (0.4.0), ``matched_band`` (0.3.0's matched) and ``matched_eigen`` (0.2.0's)
nulls on the same sequences, and saves them (``<out>/effects/<name>.npz``, so a rerun only adds
what is missing; a 0.3.0 file gets 0.4.0's draws only for the latents whose draws changed). The
analysis scores them under each score form and null: the per-SAE geometric mean (ratio-of-sums
0.2.0, symmetric log 0.3.0/0.4.0) with its CI, the rank score, the fraction of p-values below
0.05 (5% for a calibrated test on null-like dictionaries), the fraction verified and Storey's
fraction beating the null; and the variance components that bound the verdict's power (between
null directions of one latent, and the smallest effect ratio the settings verify). Writes
``summary.json`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from csae_plugin.causal import latent_effects, reference_stats
from csae_plugin.causal.nces import LOG_RATIO_FLOOR, log_scores, nces_details, nces_metrics
from csae_plugin.data import corpus_splits
from csae_plugin.evals.nces.main import neuron_nulls
from csae_plugin.evals.reference_saes import (
    RANDOM_SHAPES,
    hook_activations,
    reference_fisher,
    reference_sae,
)
from csae_plugin.models import load_model
from csae_plugin.saes.loading import load_sae_from_folder
from evals.common import HOOK, MODEL, RESULTS, machine, write_json

NULLS = ("matched", "matched_band", "matched_eigen")
"""0.4.0's default null, 0.3.0's (band draws for every latent) and 0.2.0's."""
RANDOM = ("random_isotropic", "random_covariance", "random_mixture", *RANDOM_SHAPES)
FDR = 0.05


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", nargs="*", default=[], help="trained SAE folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "nces_definition")
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
    model = load_model(MODEL)
    splits = corpus_splits(model.tokenizer, args.context, seed=args.seed)
    eval_tokens = splits.eval[: args.n_eval_sequences]
    reference = splits.train[: args.n_reference_sequences]
    acts = hook_activations(model, HOOK, reference)
    # the Fisher metric from rows neither the reference statistics nor the scoring read
    fisher_rows = splits.train[args.n_reference_sequences :]
    fisher = reference_fisher(model, HOOK, fisher_rows)
    # (name, reference kind or SAE folder, encoder, nulls): the two main random shapes with
    # tied encoders and the planted control under every null, random dictionaries of every
    # shape whose firing is independent of their directions (the exactly null-like ones) under
    # the default null and 0.3.0's, then the trained SAEs under every null
    entries = [(kind, kind, "tied", NULLS) for kind in (*RANDOM[:2], "planted_fisher")]
    entries += [(f"{kind}_independent", kind, "independent", NULLS[:2]) for kind in RANDOM]
    entries += [(Path(p).name, p, "tied", NULLS) for p in args.sae]
    for name, source, encoder, nulls in entries:
        path = out / "effects" / f"{name}.npz"
        saved = load_effects(path)
        if saved is not None and set(nulls) <= set(saved["nulls"]):
            continue
        if Path(source).is_dir():
            sae = load_sae_from_folder(source)
        else:
            width = args.d_sae if source.startswith("random") else args.latents
            sae = reference_sae(
                source, acts, HOOK, d_sae=width, seed=args.seed + 1, fisher=fisher, encoder=encoder
            )
        started = time.perf_counter()
        st = reference_stats(model, sae, reference, seed=args.seed)
        if saved is None:
            rng = np.random.default_rng(args.seed)
            latents = np.sort(rng.choice(sae.cfg.d_sae, args.latents, replace=False))
            effects = latent_effects(
                model,
                sae,
                eval_tokens,
                latents,
                st,
                null_draws=args.null_draws,
                seqs_per_latent=args.seqs_per_latent,
                seed=args.seed,
                null=nulls,
            )
            saved = {
                "latents": effects.latents,
                "effect": effects.effect,
                "null_effects": effects.null_effects,
                "nulls": np.array(nulls),
                "seconds": 0.0,
            }
        else:  # a file from 0.3.0: its 'matched' is band draws; add 0.4.0's 'matched'
            saved = add_neuron_nulls(model, sae, eval_tokens, st, saved, args)
        saved["neuron_null"] = neuron_nulls(sae, st, saved["latents"])
        saved["seconds"] = float(saved["seconds"]) + time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **saved)
        print(f"[nces_definition] {name}: {time.perf_counter() - started:.0f} s", flush=True)


def load_effects(path: Path) -> dict[str, np.ndarray] | None:
    """A saved effects file, its nulls named as now (files written before 0.4.0 call the band
    null 'matched' and have no 'matched_band': renamed here)."""
    if not path.exists():
        return None
    data = dict(np.load(path))
    old = ("matched", "matched_eigen")[: data["null_effects"].shape[2]]
    nulls = [str(n) for n in data.get("nulls", old)]
    if "matched_band" not in nulls and "neuron_null" not in data:
        nulls = ["matched_band" if n == "matched" else n for n in nulls]
    data["nulls"] = np.array(nulls)
    return data


def add_neuron_nulls(model, sae, eval_tokens, st, saved, args) -> dict[str, np.ndarray]:
    """0.4.0's 'matched' beside a saved 'matched_band': the same draws for every latent the
    neuron-permuted family does not take (so copied), new effects for those it takes."""
    nulls = [str(n) for n in saved["nulls"]]
    band = saved["null_effects"][:, :, nulls.index("matched_band")]
    matched = band.copy()
    switched = neuron_nulls(sae, st, saved["latents"])
    if switched.any():
        effects = latent_effects(
            model,
            sae,
            eval_tokens,
            saved["latents"][switched],
            st,
            null_draws=args.null_draws,
            seqs_per_latent=args.seqs_per_latent,
            seed=args.seed,
            null=("matched",),
        )
        same = np.allclose(effects.effect, saved["effect"][switched], equal_nan=True, rtol=1e-4)
        if not same:
            raise RuntimeError("the recomputed effects differ from the saved ones: other settings?")
        matched[switched] = effects.null_effects[:, :, 0]
    saved["null_effects"] = np.concatenate([matched[:, :, None], saved["null_effects"]], axis=2)
    saved["nulls"] = np.array(["matched", *nulls])
    return saved


def analyse(name: str, data: dict[str, np.ndarray]) -> list[dict[str, object]]:
    rows = []
    nulls = [str(n) for n in data["nulls"]]
    for n, null in enumerate(nulls):
        null_effects = data["null_effects"][:, :, n]
        for definition in ("0.4.0", "0.2.0"):  # the score forms (0.3.0 scores like 0.4.0)
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
    """Variance components of the log effects and the smallest ratio the settings verify.

    Per latent, the log null effects [S, K] are a direction term a_k + a sequence term b_s +
    noise e_sk (two-way decomposition). ``direction_var`` (sigma_a^2) is what random
    directions differ by however many sequences are read; ``noise_var`` (sigma_e^2) averages
    out over S sequences; ``null_direction_var`` = the variance of L_k over the K null
    directions at these settings (~ sigma_a^2 + sigma_e^2 / S), what the test compares with.
    ``min_verified_ratio``: the NCES at which the prediction t-test has 80% power at
    p = FDR x 0.1 (BH with a tenth of the latents real) with these S and K; ``..._16x8`` at
    the eval's defaults; ``..._limit``: with unlimited sequences and draws (sigma_a alone).
    ``latent_excess_var``: variance over latents of log NCES beyond that noise.
    """
    scores = log_scores(effect, null)
    live = ~np.isnan(scores[:, 0])
    if live.sum() < 3:
        return {}
    k = null.shape[-1]
    direction_var, noise_var = variance_components(effect, null)
    scores = scores[live]
    null_var = float(scores[:, 1:].var(axis=1, ddof=1).mean())
    diffs = scores[:, 0] - scores[:, 1:].mean(axis=1)
    z = stats.norm.isf(FDR * 0.1) + stats.norm.isf(0.2)
    s_now = float(np.nanmean((~np.isnan(effect[live])).sum(1)))
    sigma_a, sigma_e = float(np.nanmean(direction_var)), float(np.nanmean(noise_var))

    def ratio(seqs: float, draws: float) -> float:
        return float(np.exp(z * np.sqrt((sigma_a + sigma_e / seqs) * (1 + 1 / draws))))

    return {
        "null_direction_var": null_var,
        "direction_var": sigma_a,
        "noise_var": sigma_e,
        "latent_excess_var": float(diffs.var(ddof=1) - null_var * (1 + 1 / k)),
        "min_verified_ratio": ratio(s_now, k),
        "min_verified_ratio_16x8": ratio(16, 8),
        "min_verified_ratio_limit": float(np.exp(z * np.sqrt(sigma_a))),
    }


def variance_components(effect: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent (direction_var, noise_var) of the log null effects [S, K] (NaN below 2
    sequences): the two-way decomposition a_k + b_s + e_sk of :func:`power`."""
    k = null.shape[-1]
    direction_var = np.full(len(effect), np.nan)
    noise_var = np.full(len(effect), np.nan)
    for i in range(len(effect)):
        keep = ~np.isnan(effect[i])
        logs = np.log(null[i, keep] + LOG_RATIO_FLOOR)  # [S, K]
        s = len(logs)
        if s < 2:
            continue
        resid = logs - logs.mean(0, keepdims=True) - logs.mean(1, keepdims=True) + logs.mean()
        noise_var[i] = (resid**2).sum() / ((s - 1) * (k - 1))
        direction_var[i] = max(logs.mean(0).var(ddof=1) - noise_var[i] / s, 0.0)
    return direction_var, noise_var


def markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| dictionary | null | definition | live | geomean [CI] | rank [CI] | p<0.05 | verified "
        "| beats null | direction var | noise var | smallest verified ratio (these, 16x8, limit) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines, nan = [], float("nan")
    for r in rows:
        gl, gh = r["geomean_ci"]
        rl, rh = r["rank_ci"]
        lines.append(
            f"| {r['dictionary']} | {r['null']} | {r['definition']} | {r['n_live']} "
            f"| {r['geomean']:.3f} [{gl:.3f}, {gh:.3f}] | {r['rank']:.3f} [{rl:.3f}, {rh:.3f}] "
            f"| {r['frac_p_below_0.05']:.3f} | {r['frac_verified']:.3f} "
            f"| {r['frac_beats_null']:.3f} | {r.get('direction_var', nan):.3f} "
            f"| {r.get('noise_var', nan):.3f} | {r.get('min_verified_ratio', nan):.2f}, "
            f"{r.get('min_verified_ratio_16x8', nan):.2f}, "
            f"{r.get('min_verified_ratio_limit', nan):.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    args = arg_parser().parse_args()
    out = args.out
    if not args.analyse_only:
        compute(args, out)
    rows = []
    for path in sorted((out / "effects").glob("*.npz")):
        rows += analyse(path.stem, load_effects(path))
    summary = {
        "produced_by": "python -m evals.study.nces_definition "
        + " ".join(f"--sae {s}" for s in args.sae),
        "settings": {k: v for k, v in vars(args).items() if k != "analyse_only"},
        "machine": machine(),
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
