"""The comparison study: causal vs TopK (same steps and equal compute), BatchTopK and JumpReLU,
400 steps of 1024 tokens, three training seeds, on the embedded Gemma 3 270M.

The language model runs once over the training tokens (``csae_plugin.training.cache``); every
SAE and seed trains from that cache through SAELens's cached-activations path, and only the
causal SAE's KL term runs the model (on sequences of the same training set). Steps:

1. ``rates``: 60 steps each of TopK and causal through the model (no cache), as a user would
   train them, timed step by step: the causal/TopK throughput ratio of the KL setting below;
   it also fixes the equal-compute TopK's steps (``STEPS / ratio``).
2. train and score each seed (seed 0 first, so partial results are usable): core and nces
   (default null) on held-out tokens, the reference dictionaries once.
3. targeted probing (six concepts) on the causal and TopK SAEs of every seed.
4. tables: one row per SAE, mean/sd over seeds, pooled verified fractions, and the goal check.

    python evals/study.py                       # everything (~1.5 h on a 2-core CPU)
    python evals/study.py --seeds 0 --no-probe  # one seed, no probing
    python evals/study.py --tables-only         # rebuild tables from finished results

Results go to ``evals/results/study_cpu/`` (the activation cache and trained SAEs stay out of
git: ``cache/`` and ``saes/`` are ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sweep import (  # evals/ is on sys.path when this runs as a script
    HOOK,
    PRESETS,
    machine,
    null_table,
    save_references,
    score,
)

from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.training import TrainSpec, cache_activations, train_sae

RESULTS = Path(__file__).parent / "results"
PRESET = PRESETS["cpu"]  # width 1024, scoring settings of the earlier study
K = 32
STEPS = 400
BATCH_TOKENS = 1024
CAUSAL = {"lambda_kl": 4.0, "kl_every": 4, "kl_batch_size": 4, "kl_positions": 16}
"""The causal SAE's KL setting, fixed before the runs: every 4th step, 4 sequences, 16 scored
positions each (a fifth of the unembedding work of all 127), weight 4 so the time-averaged
weight matches lambda_kl 1 every step."""
VARIANTS = {
    "everystep": {"lambda_kl": 1.0, "kl_every": 1, "kl_batch_size": 1, "kl_positions": 16},
    "fisher": {"lambda_kl": 10.0, "kl_every": 1, "kl_estimator": "fisher"},
}
"""Causal KL settings added after the first runs (not fixed before them).

``everystep`` (after seed 0's results): the KL term at every step, as in the 40-step study
where every step kept the CE-loss score and every 10th step lowered it, on one sequence with 16
scored positions. ``fisher`` (after ``evals/kl_diagnosis.py`` found the exact term's per-step
gradient mostly noise): the KL's second-order form at every step, on every training token, with
the Fisher metric estimated once on 32 sequences; weight 10 makes its gradient about as large as
the MSE gradient's at the trained TopK SAE (measured ratio 0.07-0.2 at weight 1)."""
GOAL = "frac_verified >= TopK's + 0.2 and nces_geomean CI above TopK's, CE within 0.01"
RATE_STEPS = 60


def specs(seed: int, equal_steps: int) -> list[tuple[str, TrainSpec, int]]:
    """(name, spec, steps) of one seed's SAEs; BatchTopK and JumpReLU on seed 0 only."""
    rows = [
        ("causal", TrainSpec("causal", PRESET.d_sae, K, dict(CAUSAL)), STEPS),
        ("topk", TrainSpec("topk", PRESET.d_sae, K), STEPS),
        ("topkequal", TrainSpec("topk", PRESET.d_sae, K), equal_steps),
    ]
    if seed == 0:
        rows += [
            ("batchtopk", TrainSpec("batchtopk", PRESET.d_sae, K), STEPS),
            ("jumprelu", TrainSpec("jumprelu", PRESET.d_sae, K), STEPS),
        ]
    return [(f"{name}_s{seed}", spec, steps) for name, spec, steps in rows]


def measure_rates(model, tokens, bos, out: Path, causal: dict, path: Path) -> dict:
    """Steps/s of TopK and causal trained through the model (no cache), same runner."""
    from bench_training import StepClock

    if path.is_file():
        return json.loads(path.read_text())
    rates, first_step, later = {}, {}, {}
    for name, spec in (
        ("topk", TrainSpec("topk", PRESET.d_sae, K)),
        ("causal", TrainSpec("causal", PRESET.d_sae, K, dict(causal))),
    ):
        with StepClock() as clock:
            train_sae(
                model,
                HOOK,
                tokens,
                spec,
                training_tokens=RATE_STEPS * BATCH_TOKENS,
                output_path=out / "rate_saes" / name,
                exclude_special_tokens=[bos],
                norm_estimate_batches=4,
            )
        rates[name] = clock.steps / (clock.last - clock.first)
        first_step[name] = clock.durations[0]
        # the same without the first step, which holds any one-off cost (the Fisher estimate)
        later[name] = (clock.steps - 1) / (clock.seconds - clock.durations[0])
        print(f"[study] {name} through the model: {rates[name]:.3f} steps/s", flush=True)
    result = {
        "steps_per_s_through_model": rates,
        "ratio_causal_over_topk": rates["causal"] / rates["topk"],
        "first_step_seconds": first_step,
        "steps_per_s_after_the_first_step": later,
        "ratio_after_the_first_step": later["causal"] / later["topk"],
        "steps": RATE_STEPS,
        "timed": "first step's start to last step's end, activations computed by the model",
        "causal_settings": causal,
        "machine": machine(),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_one(
    model, tokens, cache, bos, name: str, spec: TrainSpec, steps: int, seed: int, out: Path
) -> Path:
    """Train ``spec`` from the activation cache into ``out/saes/name`` (kept if already there),
    with its wall-clock seconds beside it."""
    folder = out / "saes" / name
    if (folder / "cfg.json").is_file():
        return folder
    t0 = time.perf_counter()
    train_sae(
        model,
        HOOK,
        tokens,
        spec,
        training_tokens=steps * BATCH_TOKENS,
        output_path=folder,
        seed=seed,
        exclude_special_tokens=[bos],
        cached_activations_path=cache,
    )
    seconds = time.perf_counter() - t0
    (folder / "train_seconds.json").write_text(json.dumps(seconds) + "\n")
    print(f"[study] trained {name} ({steps} steps) in {seconds:.0f} s", flush=True)
    return folder


def train_seed(model, tokens, cache, bos, seed: int, equal_steps: int, out: Path) -> list[Path]:
    return [
        train_one(model, tokens, cache, bos, name, spec, steps, seed, out)
        for name, spec, steps in specs(seed, equal_steps)
    ]


def probe(model, splits, folders: list[Path], out: Path) -> None:
    from csae_plugin.evals.concepts import default_concepts
    from csae_plugin.evals.probing import probing_consistency
    from csae_plugin.saes.loading import load_sae

    path = out / "probing.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    concepts = default_concepts(model.tokenizer)
    for folder in folders:
        if folder.name in done:
            continue
        sae = load_sae(str(folder))[0].eval()
        t0 = time.perf_counter()
        result = probing_consistency(
            model, sae, splits.train[:64], splits.eval[:32], concepts, seed=0
        )
        done[folder.name] = {
            "seconds": time.perf_counter() - t0,
            "summary": result.summary,
            "concepts": result.concepts.to_dict(orient="records"),
        }
        path.write_text(json.dumps(done, indent=2, default=float) + "\n")
        print(f"[study] probed {folder.name}: {result.summary}", flush=True)


def tables(out: Path) -> str:
    """Per-SAE rows, per-architecture mean/sd over seeds, pooled fractions, the goal check."""
    from csae_plugin.evals.api import load_results

    table = load_results([out / "eval_results"])
    table.index = [i.removeprefix("local_") for i in table.index]
    nulls = null_table(out)  # also plots every SAE's geometric mean with its CI
    details = {}
    for p in (out / "eval_results" / "nces").glob("*_eval_results.json"):
        name = p.name.removeprefix("local_").removesuffix("_eval_results.json")
        details[name] = json.loads(p.read_text())["eval_result_details"]
    named = [re.fullmatch(r"(.+)_s(\d+)", i) for i in table.index]
    table["architecture"] = [m[1] if m else i for m, i in zip(named, table.index, strict=True)]
    table["seed"] = [int(m[2]) if m else None for m in named]
    table["train_seconds"] = [
        json.loads(f.read_text())
        if (f := out / "saes" / i / "train_seconds.json").is_file()
        else None
        for i in table.index
    ]
    table["n_live"] = [nulls.loc[i, "n_live"] if i in nulls.index else None for i in table.index]
    cols = [
        "architecture",
        "seed",
        "l0",
        "explained_variance_centered",
        "kl_div_score",
        "ce_loss_score",
    ]
    cols += ["nces_geomean", "nces_geomean_ci_low", "nces_geomean_ci_high", "frac_verified"]
    cols += ["n_live", "mean_effect_kl", "frac_dead", "train_seconds"]
    cols = [c for c in cols if c in table.columns]
    table = table[cols].sort_values(["architecture", "seed"], na_position="last")
    table.to_csv(out / "table.csv")
    metric_cols = [c for c in cols if c not in ("architecture", "seed")]
    by_arch = pd.DataFrame(
        {
            c: table.groupby("architecture")[c].agg(
                lambda v: (
                    f"{v.mean():.3g} ± {v.std():.2g} ({v.count()})"
                    if v.count() > 1
                    else (f"{v.mean():.3g}" if v.count() else "")
                )
            )
            for c in metric_cols
        }
    )
    pooled = {}
    for arch in table["architecture"].unique():
        names = table.index[table["architecture"] == arch]
        live = [d for n in names for d in details.get(n, []) if not d["dead"]]
        logs = np.log([d["nces"] for d in live if d["nces"] and d["nces"] > 0])
        boot = np.random.default_rng(0).choice(logs, (2000, len(logs))).mean(1)
        verified = sum(d["verified"] for d in live)
        pooled[arch] = {
            "seeds": len(names),
            "live_latents": len(live),
            "verified": verified,
            "frac_verified_pooled": verified / max(len(live), 1),
            "nces_geomean_pooled": float(np.exp(logs.mean())),
            "ci_low": float(np.exp(np.quantile(boot, 0.025))),
            "ci_high": float(np.exp(np.quantile(boot, 0.975))),
        }
    pooled_df = pd.DataFrame.from_dict(pooled, orient="index")
    pooled_df.to_csv(out / "pooled.csv")
    plot_pooled(pooled_df, out / "plots" / "pooled_nces.png")
    text = "## Per SAE\n\n" + table.to_markdown(floatfmt=".3g") + "\n\n"
    text += "## Per architecture: mean ± sd over seeds (number of seeds)\n\n"
    text += by_arch.to_markdown() + "\n\n"
    text += "## Pooled over seeds: live scored latents, verified, geometric-mean NCES [95% CI]\n\n"
    text += pooled_df.to_markdown(floatfmt=".3g")
    text += "\n\n" + goal_check(table, pooled, out) + "\n"
    probing = out / "probing.json"
    if probing.is_file():
        text += "\n## Targeted probing (six concepts)\n\n" + probing_table(probing) + "\n"
    (out / "summary.md").write_text(text)
    return text


def plot_pooled(pooled: pd.DataFrame, path: Path) -> None:
    """Pooled geometric-mean NCES per architecture and reference, with its 95% CI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.4 * len(pooled) + 1.5), layout="constrained")
    ax = fig.subplots()
    mid = pooled["nces_geomean_pooled"].to_numpy(float)
    err = [mid - pooled["ci_low"].to_numpy(float), pooled["ci_high"].to_numpy(float) - mid]
    ax.errorbar(mid, range(len(pooled)), xerr=err, fmt="o", capsize=3)
    ax.axvline(1.0, color="grey", lw=0.8)
    labels = [
        f"{a} ({int(n)} latents)" for a, n in zip(pooled.index, pooled["live_latents"], strict=True)
    ]
    ax.set_yticks(range(len(pooled)), labels)
    ax.set_xlabel("geometric-mean NCES, matched null, pooled over seeds (95% bootstrap CI)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def goal_check(table: pd.DataFrame, pooled: dict, out: Path) -> str:
    """The goal, per seed and pooled: causal against TopK at equal compute and same steps."""
    lines = [f"## Goal check ({GOAL})", ""]
    for base in ("topkequal", "topk"):
        if base not in pooled or "causal" not in pooled:
            continue
        for seed in sorted(table["seed"].dropna().unique()):
            c = table[(table.architecture == "causal") & (table.seed == seed)]
            b = table[(table.architecture == base) & (table.seed == seed)]
            if c.empty or b.empty:
                continue
            c, b = c.iloc[0], b.iloc[0]
            lines.append(
                f"- seed {int(seed)}, causal vs {base}: frac_verified {c.frac_verified:.3f} vs "
                f"{b.frac_verified:.3f} (+{c.frac_verified - b.frac_verified:.3f}; goal +0.2); "
                f"geomean CI [{c.nces_geomean_ci_low:.2f}, {c.nces_geomean_ci_high:.2f}] vs "
                f"[{b.nces_geomean_ci_low:.2f}, {b.nces_geomean_ci_high:.2f}] (above: "
                f"{c.nces_geomean_ci_low > b.nces_geomean_ci_high}); CE-loss score "
                f"{c.ce_loss_score:.3f} vs {b.ce_loss_score:.3f} (within 0.01: "
                f"{c.ce_loss_score >= b.ce_loss_score - 0.01}); L0 {c.l0:.1f} vs {b.l0:.1f}"
            )
        c, b = pooled["causal"], pooled[base]
        lines.append(
            f"- pooled over seeds, causal vs {base}: frac_verified difference "
            f"{c['frac_verified_pooled'] - b['frac_verified_pooled']:+.3f}; geomean "
            f"{c['nces_geomean_pooled']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] vs "
            f"{b['nces_geomean_pooled']:.2f} [{b['ci_low']:.2f}, {b['ci_high']:.2f}] "
            f"(above: {c['ci_low'] > b['ci_high']})"
        )
    return "\n".join(lines)


def probing_table(path: Path) -> str:
    """Per probed SAE: the mean difference in nats (probe latents minus matched random latents,
    with its joint bootstrap CI) per concept and overall, and how many concepts are consistent
    (the concept's CI above 0). The drop ratio is left out: its denominator is often <= 0."""
    rows = []
    for name, r in json.loads(path.read_text()).items():
        s = r["summary"]
        row = {"sae": name}
        row |= {c["concept"]: c["difference"] for c in r["concepts"]}
        row["consistent"] = (
            f"{sum(bool(c['consistent']) for c in r['concepts'])} / {len(r['concepts'])}"
        )
        row["mean [95% CI]"] = (
            f"{s['difference_mean']:.3f} [{s['difference_mean_ci_low']:.3f}, "
            f"{s['difference_mean_ci_high']:.3f}]"
        )
        rows.append(row)
    return pd.DataFrame(rows).set_index("sae").to_markdown(floatfmt=".3f")


def run_variant(model, splits, train, bos, variant: str, seeds, out: Path) -> None:
    """The causal SAE with :data:`VARIANTS`'s KL setting: its throughput ratio through the
    model (same run as a TopK's), then trained from the same cache and scored per seed."""
    causal = VARIANTS[variant]
    measure_rates(model, train, bos, out, causal, out / f"rates_{variant}.json")
    cache = cache_activations(model, HOOK, train, out / "cache")
    spec = TrainSpec("causal", PRESET.d_sae, K, dict(causal))
    for seed in seeds:
        name = f"causal{variant}_s{seed}"
        folder = train_one(model, train, cache, bos, name, spec, STEPS, seed, out)
        score(["core", "nces"], [folder], model, splits, PRESET, out / "eval_results", "zero", 0)
        tables(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "study_cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), help="only the causal SAE with this KL setting"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        print(tables(out))
        return
    started = time.perf_counter()
    torch.set_grad_enabled(True)
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 128, seed=0)
    bos = model.tokenizer.bos_token_id
    train = splits.train[: splits.train.shape[0] // 8 * 8]
    if args.variant:
        run_variant(model, splits, train, bos, args.variant, args.seeds, out)
        return
    rates = measure_rates(model, train, bos, out, CAUSAL, out / "rates.json")
    equal_steps = math.ceil(STEPS / rates["ratio_causal_over_topk"])
    t0 = time.perf_counter()
    cache = cache_activations(model, HOOK, train, out / "cache")
    print(
        f"[study] activations of {train.numel()} tokens cached in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    settings = {
        "model": "gemma-3-270m",
        "hook": HOOK,
        "d_sae": PRESET.d_sae,
        "k": K,
        "steps": STEPS,
        "batch_tokens": BATCH_TOKENS,
        "training_tokens_cached": int(train.numel()),
        "epochs": STEPS * BATCH_TOKENS / train.numel(),
        "equal_compute_topk_steps": equal_steps,
        "causal": CAUSAL,
        "scoring": {
            "latents": PRESET.latents,
            "seqs": PRESET.seqs_per_latent,
            "null_draws": PRESET.null_draws,
            "eval_sequences": PRESET.n_eval_sequences,
            "context": PRESET.nces_context,
        },
        "seeds": args.seeds,
        "goal": GOAL,
        "machine": machine(),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    eval_dir = out / "eval_results"
    score_args = (model, splits, PRESET, eval_dir, "zero", 0)
    for seed in args.seeds:
        folders = train_seed(model, train, cache, bos, seed, equal_steps, out)
        score(["core", "nces"], folders, *score_args)
        if seed == args.seeds[0]:
            score(["nces"], save_references(model, splits, PRESET, out / "saes", 0), *score_args)
        tables(out)
    if not args.no_probe:
        probe(
            model,
            splits,
            [
                out / "saes" / f"{a}_s{s}"
                for s in args.seeds
                for a in ("causal", "topk", "topkequal")
            ],
            out,
        )
    print(tables(out))
    print(f"[study] {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
