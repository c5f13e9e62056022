"""How well the second-order screen ranks latents: screen every latent, score a sample exactly.

On the embedded Gemma 3 270M (layer 6 residual stream) with a trained SAE (``--sae``; default:
train the demo's TopK SAE, 2048 latents, k 32, 80k tokens), the screen scores all latents on
``--screen-sequences`` held-out rows; the exact engine scores ``--exact-latents`` latents drawn
uniformly among those the screen saw fire, on the held-out rows (4 sequences and 4 null draws per
latent, as the demo). Reported: the screen's time, Spearman's rho between the screen and the
exact effect, NCES (0.3.0, and 0.2.0's ratio of sums) and percentile, the screen/exact effect ratio (where the quadratic term under-predicts),
and a scatter plot. Results: ``evals/results/screen_vs_exact_<device>.json`` and ``.png``.

    python -m evals.benchmarks.screen_vs_exact      # ~20 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sae_lens import SAE
from scipy.stats import spearmanr

from csae_plugin import causal as iv
from csae_plugin.causal.nces import effects_details
from csae_plugin.causal.screen import nces_screen
from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.training import TrainSpec, train_sae
from evals.common import HOOK, MODEL, RESULTS, machine, write_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, default=None, help="trained SAE folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--screen-sequences", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--exact-latents", type=int, default=256)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = load_model(MODEL, device=args.device)
    bos = model.tokenizer.bos_token_id
    splits = corpus_splits(model.tokenizer, 128, seed=args.seed)
    folder = args.sae
    if folder is None:
        folder = RESULTS / "screen_vs_exact" / "saes" / "topk_2048_k32"
        if not (folder / "cfg.json").exists():
            train_sae(
                model,
                HOOK,
                splits.train,
                TrainSpec("topk", 2048, 32),
                training_tokens=80_000,
                output_path=folder,
                seed=args.seed,
                exclude_special_tokens=[bos],
                device=args.device,
            )
    sae = SAE.load_from_disk(folder, device=args.device)
    eval_tokens = splits.eval[: args.eval_sequences, :64]
    stats = iv.reference_stats(model, sae, splits.train[:32, :64], bos_token_id=bos, seed=args.seed)

    start = time.perf_counter()
    screen = nces_screen(
        model,
        sae,
        eval_tokens[: args.screen_sequences],
        stats,
        samples=args.samples,
        seed=args.seed,
        bos_token_id=bos,
    )
    screen_s = time.perf_counter() - start

    seen = np.nonzero(screen.n_sequences > 0)[0]
    rng = np.random.default_rng(args.seed)
    latents = np.sort(rng.choice(seen, size=min(args.exact_latents, len(seen)), replace=False))
    start = time.perf_counter()
    exact = iv.latent_effects(
        model,
        sae,
        eval_tokens,
        latents,
        stats,
        null_draws=4,
        seqs_per_latent=4,
        seed=args.seed,
        bos_token_id=bos,
    )
    exact_s = time.perf_counter() - start
    exact_effect = np.nanmean(exact.effect, 1)
    # the per-latent score under the current definition (0.3.0), and 0.2.0's ratio of sums
    details = effects_details(exact)
    exact_nces = details["nces"].to_numpy()
    exact_percentile = details["percentile"].to_numpy()
    exact_nces_020 = np.nansum(exact.effect, 1) / np.nansum(exact.null, 1)
    ratio = screen.effect[latents] / exact_effect
    quartiles = np.nanquantile(exact_effect, [0.25, 0.5, 0.75])
    bins = np.digitize(exact_effect, quartiles)
    result = {
        "benchmark": "second-order screen (all latents) against the exact engine (a sample)",
        "machine": machine(args.device),
        "settings": {
            "model": MODEL,
            "hook": HOOK,
            "sae": str(folder),
            "d_sae": sae.cfg.d_sae,
            **{k: v for k, v in vars(args).items() if k != "sae"},
            "exact": "zero ablation, matched null, 4 sequences x 4 null draws, 64 tokens",
        },
        "screen_seconds": screen_s,
        "screen_latents": int(sae.cfg.d_sae),
        "screen_latents_seen_firing": int(len(seen)),
        "exact_seconds": exact_s,
        "exact_latents": int(len(latents)),
        "spearman_effect": float(spearmanr(screen.effect[latents], exact_effect).statistic),
        "spearman_nces": float(
            spearmanr(screen.nces[latents], exact_nces, nan_policy="omit").statistic
        ),
        "spearman_percentile": float(
            spearmanr(screen.nces[latents], exact_percentile, nan_policy="omit").statistic
        ),
        "spearman_nces_0.2.0": float(
            spearmanr(screen.nces[latents], exact_nces_020, nan_policy="omit").statistic
        ),
        "nces_definition": "0.3.0 (spearman_nces); 0.2.0's ratio of sums (spearman_nces_0.2.0)",
        "screen_over_exact_effect": {
            "median": float(np.nanmedian(ratio)),
            "quartiles": np.nanquantile(ratio, [0.25, 0.75]).tolist(),
            "median_by_exact_effect_quartile": [
                float(np.nanmedian(ratio[bins == q])) for q in range(4)
            ],
        },
        "goal_spearman": 0.8,
        "goal_screen_seconds": 180,
        "latents": latents.tolist(),
        "screen_effect": screen.effect[latents].tolist(),
        "exact_effect": exact_effect.tolist(),
        "screen_nces": screen.nces[latents].tolist(),
        "exact_nces": exact_nces.tolist(),
        "exact_percentile": exact_percentile.tolist(),
        "exact_nces_0.2.0": exact_nces_020.tolist(),
    }
    out = write_json(RESULTS / f"screen_vs_exact_{args.device}.json", result)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, name in ((axes[0], "effect", "effect (nats)"), (axes[1], "nces", "NCES")):
        x, y = np.array(result[f"exact_{key}"]), np.array(result[f"screen_{key}"])
        ax.scatter(x, y, s=8, alpha=0.6)
        lo, hi = np.nanmin([x, y]), np.nanmax([x, y])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"exact {name}")
        ax.set_ylabel(f"screen {name}")
        ax.set_title(f"Spearman {result[f'spearman_{key}']:.2f}")
        ax.legend()
    fig.suptitle(f"Second-order screen vs exact, {result['exact_latents']} latents, Gemma 3 270M")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
