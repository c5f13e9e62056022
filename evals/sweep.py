"""The comparison sweep: the causal SAE against SAELens's baselines at several sparsities.

Every SAE is trained the same way (same model, hook, width, training tokens, budget, learning
rate; ``csae_plugin.training.train_sae``) and scored with SAEBench's ``core`` and the plugin's
``nces`` eval on held-out tokens. Output, under ``--out`` (default ``evals/results/sweep_<preset>``):
SAEBench-layout result files, ``table.csv`` / ``table.md`` / ``table.json`` (with machine and
settings) and plots (L0 vs CE-loss score, L0 vs fraction verified, NCES distributions).

    python evals/sweep.py --preset full       # 5 architectures x 3 sparsities (about an hour here)
    python evals/sweep.py --preset ci         # causal vs TopK, small: what CI compares
    python evals/sweep.py --preset full --intervention mean --out evals/results/ablation_mean

The standard (ReLU + L1) SAE has no L0 knob: its L1 coefficients per sparsity level were chosen
on training tokens only (``STANDARD_L1``) to land near the other SAEs' L0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.training import TrainSpec, train_sae

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.6.hook_resid_post"
STANDARD_L1 = {16: 8.0, 32: 5.0, 64: 3.0}
"""L1 coefficient of the standard SAE per target L0 (chosen on training tokens)."""


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
    "full": Preset(
        architectures=("causal", "standard", "topk", "batchtopk", "jumprelu"),
        ks=(16, 32, 64),
        d_sae=2048,
        training_tokens=100_000,
        latents=32,
        seqs_per_latent=4,
        null_draws=4,
        n_eval_sequences=96,
        nces_context=64,
        causal={"lambda_kl": 1.0, "kl_every": 10},
    ),
    "ci": Preset(
        architectures=("causal", "topk"),
        ks=(32,),
        d_sae=1024,
        training_tokens=40_000,
        latents=16,
        seqs_per_latent=4,
        null_draws=4,
        n_eval_sequences=48,
        nces_context=64,
        causal={"lambda_kl": 1.0, "kl_every": 10},
    ),
}


def specs_of(preset: Preset, causal_overrides: dict) -> list[TrainSpec]:
    specs = []
    for k in preset.ks:
        for arch in preset.architectures:
            overrides = {}
            if arch == "causal":
                overrides = {**preset.causal, **causal_overrides}
            elif arch == "standard":
                overrides = {"l1_coefficient": STANDARD_L1.get(k, 5.0)}
            specs.append(TrainSpec(arch, preset.d_sae, k, overrides))
    return specs


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run(
    preset_name: str,
    out: Path,
    intervention: str = "zero",
    seed: int = 0,
    causal_overrides: dict | None = None,
    device: str = "cpu",
    retrain: bool = False,
) -> pd.DataFrame:
    """Train (or reuse, unless ``retrain``) and score every SAE of the preset; the table."""
    from csae_plugin.cli import evaluate_saes, load_results, plot_results

    preset = PRESETS[preset_name]
    started = time.perf_counter()
    model = load_model("gemma-3-270m", device=device)
    splits = corpus_splits(model.tokenizer, 128, seed=seed)
    bos = model.tokenizer.bos_token_id
    specs = specs_of(preset, causal_overrides or {})
    train_seconds: dict[str, float] = {}
    folders = []
    for spec in specs:
        folder = out / "saes" / spec.name
        folders.append(folder)
        if folder.joinpath("cfg.json").is_file() and not retrain:
            continue
        t0 = time.perf_counter()
        train_sae(
            model,
            HOOK,
            splits.train,
            spec,
            training_tokens=preset.training_tokens,
            output_path=folder,
            seed=seed,
            exclude_special_tokens=[bos],
            device=device,
        )
        train_seconds[spec.name] = time.perf_counter() - t0
    eval_dir = out / "eval_results"
    evaluate_saes(
        evals=["core", "nces"],
        sae_specs=[str(f) for f in folders],
        model=model,
        eval_tokens=splits.eval[: preset.n_eval_sequences, : preset.nces_context],
        reference_tokens=splits.train[: preset.n_eval_sequences, : preset.nces_context],
        output_dir=eval_dir,
        device=device,
        force_rerun=retrain,
        nces_overrides={
            "latents": preset.latents,
            "null_draws": preset.null_draws,
            "seqs_per_latent": preset.seqs_per_latent,
            "intervention": intervention,
            "random_seed": seed,
        },
    )
    table = load_results([eval_dir])
    table["architecture"] = [name.split("_")[0] for name in table.index]
    table["k"] = [int(name.rsplit("_k", 1)[1]) for name in table.index]
    table["train_seconds"] = [train_seconds.get(n, float("nan")) for n in table.index]
    table = table.sort_values(["k", "architecture"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv")
    (out / "table.md").write_text(table.to_markdown(floatfmt=".4g") + "\n")
    (out / "table.json").write_text(
        json.dumps(
            {
                "preset": preset_name,
                "settings": {**asdict(preset), "intervention": intervention, "seed": seed},
                "causal_overrides": causal_overrides or {},
                "hook": HOOK,
                "machine": machine(),
                "minutes": (time.perf_counter() - started) / 60,
                "table": json.loads(table.to_json(orient="index")),
            },
            indent=2,
        )
        + "\n"
    )
    plot_results(table, out / "plots", eval_dirs=[eval_dir])
    plot_verified(table, out / "plots" / "l0_vs_frac_verified.png")
    return table


def plot_verified(table: pd.DataFrame, path: Path) -> None:
    """L0 against fraction of verified latents, one line per architecture."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for arch, rows in table.groupby("architecture"):
        rows = rows.sort_values("l0")
        ax.plot(rows["l0"], rows["frac_verified"], marker="o", label=arch)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("fraction of latents verified (NCES > 1, q < 0.05)")
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--intervention", default="zero")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-kl", type=float, default=None)
    parser.add_argument("--verify-every", type=int, default=None)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    causal = {}
    if args.lambda_kl is not None:
        causal["lambda_kl"] = args.lambda_kl
    if args.verify_every is not None:
        causal["verify_every"] = args.verify_every
    out = args.out or RESULTS / f"sweep_{args.preset}"
    table = run(args.preset, out, args.intervention, args.seed, causal, args.device, args.retrain)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
