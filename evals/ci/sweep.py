"""The comparison sweep: the causal SAE against SAELens's baselines at several sparsities.

Every SAE is trained the same way (same model, hook, width, training tokens, budget, learning
rate; ``csae_plugin.training.train_sae``) and scored with SAEBench's ``core`` and the plugin's
``nces`` eval on held-out tokens. Output, under ``--out`` (default
``evals/results/sweep_<preset>``): SAEBench-layout result files, ``table.csv`` / ``table.md`` /
``table.json`` (with machine and settings) and plots (L0 vs CE-loss score, L0 vs fraction
verified, NCES distributions).

    python -m evals.ci.sweep --preset cpu --calibrate-standard  # L1 per target L0
    python -m evals.ci.sweep --preset cpu     # 5 architectures x 3 sparsities (CPU-sized)
    python -m evals.ci.sweep --preset cpu --ablate-interventions  # mean/resample/steer
    python -m evals.ci.sweep --preset cpu --architectures causal --ks 32 --lambda-kl 0 \
        --out evals/results/sweep_cpu_no_kl   # a loss-term ablation
    python -m evals.ci.sweep --preset ci      # the CI subset: causal vs TopK at k = 32
    python -m evals.ci.sweep --preset full    # 2048 latents and 100k tokens (GPU)

The standard (ReLU + L1) SAE has no L0 knob: ``--calibrate-standard`` trains it at a grid of
L1 coefficients with the preset's budget, measures L0 on training tokens only, and writes
``standard_l1_<preset>.json``; the sweep then interpolates log L1 against log L0 for each
target. Without that file the sweep stops and says to run the calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from csae_plugin.data import CorpusSplits, corpus_splits
from csae_plugin.models import hook_layer, load_model
from csae_plugin.training import TrainSpec, train_sae
from evals.common import HOOK, MODEL, RESULTS, machine, write_json

L1_GRID = (10.0, 20.0, 40.0, 80.0, 160.0)
"""L1 coefficients the standard SAE is calibrated on (geometric, wide: L0 falls steeply)."""


@dataclass
class Preset:
    architectures: tuple[str, ...]
    ks: tuple[int, ...]
    d_sae: int
    training_tokens: int
    latents: int
    seqs_per_latent: int
    null_draws: int
    n_eval_sequences: int
    nces_context: int
    causal: dict = field(default_factory=dict)


PRESETS = {
    "cpu": Preset(
        architectures=("causal", "standard", "topk", "batchtopk", "jumprelu"),
        ks=(16, 32, 64),
        d_sae=1024,
        training_tokens=40_000,
        latents=24,
        seqs_per_latent=4,
        null_draws=4,
        n_eval_sequences=32,
        nces_context=64,
        # the causal SAE's 0.3.0 defaults, pinned: the CI reference was measured with them
        causal={
            "kl_estimator": "exact",
            "lambda_kl": 1.0,
            "kl_every": 10,
            "kl_batch_size": 4,
            "kl_positions": 0,
            "kl_finetune_fraction": 0.0,
        },
    ),
}
PRESETS["full"] = dataclasses.replace(
    PRESETS["cpu"], d_sae=2048, training_tokens=100_000, latents=32, n_eval_sequences=96
)
"""``cpu`` with wider SAEs, more training tokens, latents and evaluation sequences."""
PRESETS["ci"] = dataclasses.replace(PRESETS["cpu"], architectures=("causal", "topk"), ks=(32,))
"""The CI subset of ``cpu``: the same settings, so its rows are the sweep's rows."""


def specs_of(
    preset_name: str,
    causal_overrides: dict,
    architectures: tuple[str, ...] | None = None,
    ks: tuple[int, ...] | None = None,
) -> list[TrainSpec]:
    """The preset's SAEs (optionally only ``architectures`` / ``ks``), k-major."""
    preset = PRESETS[preset_name]
    specs = []
    for k in ks or preset.ks:
        for arch in architectures or preset.architectures:
            overrides = {}
            if arch == "causal":
                overrides = {**preset.causal, **causal_overrides}
            elif arch == "standard":
                overrides = {"l1_coefficient": standard_l1(preset_name, k)}
            specs.append(TrainSpec(arch, preset.d_sae, k, overrides))
    return specs


def calibration_path(preset_name: str) -> Path:
    return RESULTS / f"standard_l1_{'cpu' if preset_name == 'ci' else preset_name}.json"


def standard_l1(preset_name: str, target_l0: float) -> float:
    """The L1 coefficient whose calibrated L0 is ``target_l0`` (log-log interpolation)."""
    path = calibration_path(preset_name)
    if not path.is_file():
        raise SystemExit(
            f"no L1 calibration for the standard SAE at {path}; run "
            f"python -m evals.ci.sweep --preset {preset_name} --calibrate-standard"
        )
    grid = sorted(
        (row["l0"], row["l1_coefficient"]) for row in json.loads(path.read_text())["grid"]
    )
    points = [(math.log(max(l0, 1e-3)), math.log(l1)) for l0, l1 in grid]
    x = math.log(target_l0)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    raise SystemExit(
        f"target L0 {target_l0} is outside the calibrated range "
        f"{grid[0][0]:.3g}-{grid[-1][0]:.3g} in {path}; widen L1_GRID and recalibrate"
    )


def calibrate_standard(preset_name: str, seed: int = 0, device: str = "cpu") -> dict:
    """Train the standard SAE at each of ``L1_GRID`` and measure its L0 on training tokens."""
    from tempfile import TemporaryDirectory

    preset = PRESETS[preset_name]
    model = load_model(MODEL, device=device)
    splits = corpus_splits(model.tokenizer, 128, seed=seed)
    bos = model.tokenizer.bos_token_id
    probe = splits.train[: preset.n_eval_sequences, : preset.nces_context]
    grid = []
    for l1 in L1_GRID:
        spec = TrainSpec("standard", preset.d_sae, 0, {"l1_coefficient": l1})
        with TemporaryDirectory() as tmp:
            sae, _ = train_sae(
                model,
                HOOK,
                splits.train,
                spec,
                training_tokens=preset.training_tokens,
                output_path=tmp,
                seed=seed,
                exclude_special_tokens=[bos],
                device=device,
            )
        with torch.no_grad():
            _, cache = model.run_with_cache(
                probe, names_filter=[HOOK], stop_at_layer=hook_layer(model, HOOK) + 1
            )
            acts = sae.encode(cache[HOOK][probe != bos])
        grid.append({"l1_coefficient": l1, "l0": float((acts > 0).sum(-1).float().mean())})
        print(f"[calibrate] l1 {l1:g}: L0 {grid[-1]['l0']:.1f} on training tokens", flush=True)
    result = {
        "produced_by": f"python -m evals.ci.sweep --preset {preset_name} --calibrate-standard",
        "tokens": "training split only (first rows, first nces_context tokens, BOS excluded)",
        "settings": asdict(preset),
        "machine": machine(device),
        "grid": grid,
    }
    write_json(calibration_path(preset_name), result)
    return result


def score(
    evals: list[str],
    folders: list[Path],
    model,
    splits,
    preset: Preset,
    eval_dir: Path,
    intervention: str,
    seed: int,
    force_rerun: bool = False,
    null: str | None = None,
) -> None:
    """``evals`` on the saved SAEs in ``folders``, on the preset's held-out tokens.

    ``null``: the nces eval's null(s) ('matched,covariance,isotropic'); default its default.
    """
    from csae_plugin.evals.api import evaluate_saes

    evaluate_saes(
        evals=evals,
        sae_specs=[str(f) for f in folders],
        model=model,
        eval_tokens=splits.eval[: preset.n_eval_sequences, : preset.nces_context],
        reference_tokens=splits.train[: preset.n_eval_sequences, : preset.nces_context],
        output_dir=eval_dir,
        device=str(model.cfg.device),
        force_rerun=force_rerun,
        nces_overrides={
            "latents": preset.latents,
            "null_draws": preset.null_draws,
            "seqs_per_latent": preset.seqs_per_latent,
            "intervention": intervention,
            "random_seed": seed,
            **({"null": null} if null else {}),
        },
    )


def run(
    preset_name: str,
    out: Path,
    intervention: str = "zero",
    seed: int = 0,
    causal_overrides: dict | None = None,
    device: str = "cpu",
    retrain: bool = False,
    architectures: tuple[str, ...] | None = None,
    ks: tuple[int, ...] | None = None,
    train_seed: int | None = None,
    tune: bool = False,
    null: str | None = None,
    references: bool = False,
) -> pd.DataFrame:
    """Train (or reuse, unless ``retrain``) and score every SAE of the preset; the table.

    ``seed`` fixes the corpus split and the scored latents, ``train_seed`` (default ``seed``)
    the training. With ``tune``, the last ``n_eval_sequences`` training rows are held back
    from training and scored instead of the evaluation split: for choosing settings on
    training tokens only. ``null`` is passed to the nces eval; with ``references`` the
    reference dictionaries (``csae_plugin.evals.reference_saes``) are built on training rows
    and scored with nces beside the trained SAEs.
    """
    from csae_plugin.evals.api import load_results, plot_results

    preset = PRESETS[preset_name]
    started = time.perf_counter()
    specs = specs_of(preset_name, causal_overrides or {}, architectures, ks)
    model = load_model(MODEL, device=device)
    splits = corpus_splits(model.tokenizer, 128, seed=seed)
    if tune:
        held_back = preset.n_eval_sequences
        splits = CorpusSplits(train=splits.train[:-held_back], eval=splits.train[-held_back:])
    bos = model.tokenizer.bos_token_id
    train_seconds: dict[str, float] = {}  # this run's; saved beside each SAE
    folders = []
    for spec in specs:
        folder = out / "saes" / spec.name
        folders.append(folder)
        if folder.joinpath("cfg.json").is_file() and not retrain:
            continue
        t0 = time.perf_counter()
        _, runner = train_sae(
            model,
            HOOK,
            splits.train,
            spec,
            training_tokens=preset.training_tokens,
            output_path=folder,
            seed=seed if train_seed is None else train_seed,
            exclude_special_tokens=[bos],
            device=device,
        )
        train_seconds[spec.name] = time.perf_counter() - t0
        (folder / "train_seconds.json").write_text(json.dumps(train_seconds[spec.name]) + "\n")
        context = getattr(runner.sae, "causal_context", None)
        if context is not None and context.history:
            # term 4's log: latents checked, verified and resampled at each verification
            write_json(out / f"verification_history_{spec.name}.json", context.history)
    eval_dir = out / "eval_results"
    args = (model, splits, preset, eval_dir, intervention, seed, retrain, null)
    score(["core", "nces"], folders, *args)
    if references:
        score(["nces"], save_references(model, splits, preset, out / "saes", seed), *args)
    table = load_results([eval_dir])
    table["architecture"] = [name.split("_")[0] for name in table.index]
    table["k"] = [_k_of(name) for name in table.index]
    table["train_seconds"] = [_train_seconds(out / "saes" / n) for n in table.index]
    table = table.sort_values(["k", "architecture"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv")
    (out / "table.md").write_text(table.to_markdown(floatfmt=".4g") + "\n")
    write_json(
        out / "table.json",
        {
            "preset": preset_name,
            "settings": {
                **asdict(preset),
                "intervention": intervention,
                "seed": seed,
                "train_seed": seed if train_seed is None else train_seed,
                "scored_on": "held-back training rows (--tune)" if tune else "eval split",
            },
            "causal_overrides": causal_overrides or {},
            "hook": HOOK,
            "machine": machine(device),
            "minutes": (time.perf_counter() - started) / 60,
            "table": json.loads(table.to_json(orient="index")),
        },
    )
    plot_results(table, out / "plots", eval_dirs=[eval_dir])
    plot_verified(table, out / "plots" / "l0_vs_frac_verified.png")
    summary_table(out)
    null_table(out)
    return table


SUMMARY = [
    "architecture",
    "k",
    "l0",
    "explained_variance_centered",
    "kl_div_score",
    "ce_loss_score",
]
SUMMARY += ["nces_geomean", "nces_geomean_ci_low", "nces_geomean_ci_high", "frac_verified"]
SUMMARY += ["mean_effect_kl", "frac_dead", "train_seconds"]
SUMMARY += [
    f"{m}_{null}" for null in ("covariance", "isotropic") for m in ("nces_geomean", "frac_verified")
]


BARS = (2.0, 3.0, 4.0)
"""Stricter bars than NCES > 1 (``verification_bars``): lower ends of the per-latent 95% CI."""


def verification_bars(eval_dir: Path) -> pd.DataFrame:
    """Per SAE: the fraction of its live scored latents whose NCES 95% CI (bootstrap over
    sequences, from the nces result's details) lies above each of :data:`BARS`, beside
    ``frac_verified``. A latent seen in fewer than two sequences has no CI and counts as not
    above any bar. A post-hoc reading of the same results, not the eval's verdict."""
    rows = {}
    for path in sorted((eval_dir / "nces").glob("*_eval_results.json")):
        result = json.loads(path.read_text())
        live = [d for d in result["eval_result_details"] if not d["dead"]]
        name = path.name.removeprefix("local_").removesuffix("_eval_results.json")
        n_live = max(len(live), 1)  # no live latent: fractions of 0, with n_live saying why
        row = {"n_live": len(live), "frac_verified": sum(d["verified"] for d in live) / n_live}
        for bar in BARS:
            above = sum(d["ci_low"] is not None and d["ci_low"] > bar for d in live)
            row[f"frac_ci_low_above_{bar:g}"] = above / n_live
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("sae")


def summary_table(out: Path) -> str:
    """The key columns of ``<out>/table.csv`` as Markdown, then :func:`verification_bars`
    (written to ``<out>/summary.md``)."""
    table = pd.read_csv(out / "table.csv", index_col="sae")
    text = table[[c for c in SUMMARY if c in table.columns]].to_markdown(floatfmt=".3g") + "\n"
    bars = verification_bars(out / "eval_results")
    if not bars.empty:
        text += "\nFraction of live scored latents whose NCES 95% CI lies above a stricter bar\n"
        text += "(post hoc, same results):\n\n" + bars.to_markdown(floatfmt=".3g") + "\n"
    (out / "summary.md").write_text(text)
    return text


NULLS = ("matched", "covariance", "isotropic")


def null_table(out: Path) -> pd.DataFrame:
    """Per SAE (trained and reference) and null: geometric-mean NCES with its CI over latents,
    fraction verified and the number of live latents, beside the absolute effect; written to
    ``<out>/nulls.md`` / ``nulls.csv`` with a plot ``<out>/plots/nces_geomean_by_null.png``."""
    from matplotlib.figure import Figure

    rows = {}
    for path in sorted((out / "eval_results" / "nces").glob("*_eval_results.json")):
        result = json.loads(path.read_text())
        name = path.name.removeprefix("local_").removesuffix("_eval_results.json")
        metrics = result["eval_result_metrics"]
        live = sum(not d["dead"] for d in result["eval_result_details"])
        row = {"n_live": live, "mean_effect_kl": metrics["nces"]["mean_effect_kl"]}
        for null in NULLS:
            m = metrics.get(f"nces_{null}") or {}
            if m.get("null") is None:
                continue
            ci = (m["nces_geomean_ci_low"], m["nces_geomean_ci_high"])
            row[f"geomean_{null}"] = m["nces_geomean"]
            row[f"ci_{null}"] = "n/a" if None in ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
            row[f"ci_low_{null}"], row[f"ci_high_{null}"] = ci
            row[f"frac_verified_{null}"] = m["frac_verified"]
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("sae")
    table.to_csv(out / "nulls.csv")
    shown = ["n_live", "mean_effect_kl"]
    shown += [f"{c}_{n}" for n in NULLS for c in ("geomean", "ci", "frac_verified")]
    (out / "nulls.md").write_text(
        table[[c for c in shown if c in table]].to_markdown(floatfmt=".3g") + "\n"
    )
    fig = Figure(figsize=(8, 0.35 * len(table) + 1.5), layout="constrained")
    ax = fig.subplots()
    for offset, null in zip((-0.2, 0.0, 0.2), NULLS, strict=True):
        if f"geomean_{null}" not in table:
            continue
        y = range(len(table))
        mid = table[f"geomean_{null}"].to_numpy(dtype=float)
        low = table[f"ci_low_{null}"].to_numpy(dtype=float)
        err = [mid - low, table[f"ci_high_{null}"].to_numpy(dtype=float) - mid]
        ax.errorbar(mid, [v + offset for v in y], xerr=err, fmt="o", label=null, capsize=2)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xscale("log")
    ax.set_xlabel("geometric-mean NCES over scored latents (95% bootstrap CI)")
    ax.legend(title="null")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "plots" / "nces_geomean_by_null.png", dpi=120)
    return table


def collect(outs: list[Path], target: Path) -> pd.DataFrame:
    """The rows of several finished sweeps (e.g. one per ``--train-seed``) side by side, with
    their stricter-bar fractions, and mean / standard deviation per architecture and k;
    written to ``target`` (.csv of the rows, .md of both)."""
    frames = []
    for out in outs:
        table = pd.read_csv(out / "table.csv", index_col="sae")
        table = table.join(verification_bars(out / "eval_results").drop(columns="frac_verified"))
        settings = json.loads((out / "table.json").read_text())["settings"]
        table.insert(0, "train_seed", settings.get("train_seed", settings["seed"]))
        table.insert(0, "run", out.name)
        frames.append(table)
    rows = pd.concat(frames)
    # only the SAEs every run has (a full sweep next to runs of a subset)
    common = set.intersection(*(set(zip(f["architecture"], f["k"], strict=True)) for f in frames))
    rows = rows[[pair in common for pair in zip(rows["architecture"], rows["k"], strict=True)]]
    columns = [c for c in SUMMARY if c not in ("architecture", "k", "train_seconds")]
    columns += [c for c in rows.columns if c.startswith("frac_ci_low_above")]
    stats = rows.groupby(["architecture", "k"])[columns].agg(["mean", "std"])
    stats.columns = [f"{c} {s}" for c, s in stats.columns]
    target.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(target.with_suffix(".csv"))
    target.with_suffix(".md").write_text(
        rows[["run", "train_seed", "architecture", "k", *columns]].to_markdown(floatfmt=".3g")
        + "\n\nmean and standard deviation over runs\n\n"
        + stats.T.to_markdown(floatfmt=".3g")
        + "\n"
    )
    return stats


REFERENCE_TOKENS = 128
"""Training rows the reference dictionaries' covariance and thresholds come from."""
REFERENCE_STUDY = ("random_isotropic", "random_covariance", "pca", "identity")
"""The reference dictionaries scored beside the sweep's SAEs (the random mixture is covered by
the calibration tests)."""


def save_references(model, splits, preset: Preset, saes_dir: Path, seed: int) -> list[Path]:
    """The reference dictionaries (random ones at the preset's width), built on training rows
    and saved under ``saes_dir`` unless already there; their folders."""
    from csae_plugin.evals.reference_saes import save_reference_saes

    tokens = splits.train[:REFERENCE_TOKENS, : preset.nces_context]
    return save_reference_saes(
        model, HOOK, tokens, saes_dir, d_sae=preset.d_sae, kinds=REFERENCE_STUDY, seed=seed
    )


def _k_of(name: str) -> float:
    """The target L0 in an SAE's name (``topk_1024_k32`` -> 32); NaN for reference SAEs."""
    return float(name.rsplit("_k", 1)[1]) if "_k" in name else float("nan")


def _train_seconds(folder: Path) -> float:
    path = folder / "train_seconds.json"
    return float(json.loads(path.read_text())) if path.is_file() else float("nan")


def ablate_interventions(
    preset_name: str,
    out: Path,
    interventions: tuple[str, ...] = ("zero", "mean", "resample", "steer"),
    seed: int = 0,
    device: str = "cpu",
    ks: tuple[int, ...] | None = None,
) -> pd.DataFrame:
    """NCES of the sweep's saved SAEs (only those at ``ks``, if given) under each intervention.

    ``zero`` is read from the sweep's own results; the others are written to
    ``<out>/ablation_<intervention>/``. Returns one row per SAE and intervention.
    """
    from csae_plugin.evals.api import load_results

    preset = PRESETS[preset_name]
    folders = sorted(p.parent for p in (out / "saes").glob("*/cfg.json"))
    if ks:
        folders = [f for f in folders if int(f.name.rsplit("_k", 1)[1]) in ks]
    if not folders:
        raise SystemExit(f"no saved SAEs under {out / 'saes'}; run the sweep first")
    model = load_model(MODEL, device=device)
    splits = corpus_splits(model.tokenizer, 128, seed=seed)
    frames = []
    for intervention in interventions:
        eval_dir = out / ("eval_results" if intervention == "zero" else f"ablation_{intervention}")
        score(["nces"], folders, model, splits, preset, eval_dir, intervention, seed)
        table = load_results([eval_dir])[["nces_median", "frac_verified", "frac_dead"]]
        table = table[table.index.isin([f.name for f in folders])].copy()
        table["intervention"] = intervention
        table["rank_frac_verified"] = table["frac_verified"].rank(ascending=False)
        frames.append(table)
    result = pd.concat(frames).reset_index()
    result.to_csv(out / "ablation_interventions.csv", index=False)
    wide = result.pivot(index="sae", columns="intervention", values="frac_verified")
    (out / "ablation_interventions.md").write_text(
        "fraction of verified latents per intervention\n\n"
        + wide.to_markdown(floatfmt=".3g")
        + "\n\nNCES median per intervention\n\n"
        + result.pivot(index="sae", columns="intervention", values="nces_median").to_markdown(
            floatfmt=".3g"
        )
        + "\n"
    )
    return result


def plot_verified(table: pd.DataFrame, path: Path) -> None:
    """L0 against fraction of verified latents, and against CE-loss score (the Pareto view),
    one line per architecture (``path`` and ``<path dir>/pareto_l0_ce_loss_score.png``)."""
    from matplotlib.figure import Figure

    for metric, label, target in (
        ("frac_verified", "fraction of latents verified (NCES > 1, q < 0.05)", path),
        ("ce_loss_score", "CE-loss score (core)", path.parent / "pareto_l0_ce_loss_score.png"),
    ):
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for arch, rows in table.groupby("architecture"):
            rows = rows.sort_values("l0")
            ax.plot(rows["l0"], rows[metric], marker="o", label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, held-out tokens)")
        ax.set_ylabel(label)
        ax.legend()
        fig.savefig(target, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--intervention", default="zero")
    parser.add_argument("--seed", type=int, default=0, help="corpus split and scored latents")
    parser.add_argument("--train-seed", type=int, default=None, help="training (default: --seed)")
    parser.add_argument(
        "--tune", action="store_true", help="score held-back training rows, not the eval split"
    )
    parser.add_argument("--lambda-kl", type=float, default=None)
    parser.add_argument("--kl-every", type=int, default=None)
    parser.add_argument("--verify-every", type=int, default=None)
    parser.add_argument("--verify-latents", type=int, default=None, help="latents per verification")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--architectures", nargs="+", default=None, help="subset to run")
    parser.add_argument("--ks", nargs="+", type=int, default=None, help="subset of target L0s")
    parser.add_argument(
        "--calibrate-standard", action="store_true", help="calibrate the standard SAE's L1"
    )
    parser.add_argument(
        "--summary", action="store_true", help="write summary.md from a finished sweep"
    )
    parser.add_argument(
        "--ablate-interventions",
        action="store_true",
        help="rescore the saved SAEs with every intervention",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        type=Path,
        default=None,
        help="finished sweep folders to put side by side (mean/std per architecture) in --out",
    )
    parser.add_argument(
        "--null", default=None, help="nces null(s), e.g. matched,covariance,isotropic"
    )
    parser.add_argument(
        "--references",
        action="store_true",
        help="also score the reference dictionaries (random, PCA, identity) with nces",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.collect:
        target = args.out or RESULTS / "collected"
        print(collect(args.collect, target).T.to_string(float_format=lambda v: f"{v:.3g}"))
        print(f"written to {target.with_suffix('.md')} and {target.with_suffix('.csv')}")
        return
    causal = {}
    if args.lambda_kl is not None:
        causal["lambda_kl"] = args.lambda_kl
    if args.kl_every is not None:
        causal["kl_every"] = args.kl_every
    if args.verify_every is not None:
        causal["verify_every"] = args.verify_every
    if args.verify_latents is not None:
        causal["verify_latents"] = args.verify_latents
    out = args.out or RESULTS / f"sweep_{args.preset}"
    if args.calibrate_standard:
        print(json.dumps(calibrate_standard(args.preset, args.seed, args.device)["grid"]))
        return
    if args.summary:
        print(summary_table(out))
        print(null_table(out).to_string())
        plot_verified(pd.read_csv(out / "table.csv"), out / "plots" / "l0_vs_frac_verified.png")
        return
    if args.ablate_interventions:
        ks = tuple(args.ks) if args.ks else None
        table = ablate_interventions(args.preset, out, seed=args.seed, device=args.device, ks=ks)
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
        print(f"written to {out}")
        return
    table = run(
        args.preset,
        out,
        args.intervention,
        args.seed,
        causal,
        args.device,
        args.retrain,
        tuple(args.architectures) if args.architectures else None,
        tuple(args.ks) if args.ks else None,
        args.train_seed,
        args.tune,
        args.null,
        args.references,
    )
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
