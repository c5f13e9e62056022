"""Overhead: training throughput and peak memory per architecture, and NCES cost per latent.

How the cost grows: training steps/s and the peak-memory increase of every architecture at three
widths (``--widths``), through the same runner on the same model, hook and tokens; NCES eval
seconds per latent at the same three widths and at three context lengths (``--contexts``).
Training is timed from the first step's start to the last step's end
(:class:`evals.common.StepClock`); memory is the peak resident set size during the call minus the resident size before it
(sampled every 5 ms); memory the process freed earlier is reused without raising the
resident size, so this is a lower bound past the first run, which an untimed warm-up run
absorbs. The SAEs scored by NCES are data-initialised TopK SAEs
(:func:`evals.common.data_initialised_topk`): cost does not depend on training. Writes ``evals/results/overhead_<model>.json`` / ``.md`` and
``overhead_<model>.png``.

    python -m evals.study.overhead               # Gemma 3 270M layer 6: about 15 minutes here
    python -m evals.study.overhead --model tiny  # in-process tiny model, a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.nces.main import evaluate_sae
from csae_plugin.training import ARCHITECTURES, TrainSpec, train_sae
from evals.common import (
    HOOK,
    MODEL,
    RESULTS,
    TINY_HOOK,
    PeakRSS,
    StepClock,
    data_initialised_topk,
    gemma_setup,
    machine,
    tiny_setup,
    write_json,
)


def training_row(model, hook, tokens, spec, args, bos) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as out, StepClock() as clock, PeakRSS() as memory:
        torch.manual_seed(args.seed)
        train_sae(
            model,
            hook,
            tokens,
            spec,
            training_tokens=args.steps * args.batch_tokens,
            output_path=out,
            batch_size_tokens=args.batch_tokens,
            seed=args.seed,
            exclude_special_tokens=[bos],
            device=args.device,
            norm_estimate_batches=2,
        )
    return {
        "architecture": spec.architecture,
        "d_sae": spec.d_sae,
        "steps_per_s": clock.steps / clock.seconds,
        "tokens_per_s": clock.steps * args.batch_tokens / clock.seconds,
        "peak_extra_mb": memory.peak_bytes / 2**20,
    }


def nces_row(model, sae, evaluation, reference, context, args, bos) -> dict[str, Any]:
    config = NCESEvalConfig(
        model_name=model.cfg.model_name,
        latents=args.nces_latents,
        null_draws=4,
        seqs_per_latent=4,
        context_size=context,
        random_seed=args.seed,
    )
    with PeakRSS() as memory:
        start = time.perf_counter()
        evaluate_sae(model, sae, evaluation, reference, config, progress=False, bos_token_id=bos)
        seconds = time.perf_counter() - start
    return {
        "d_sae": sae.cfg.d_sae,
        "context": context,
        "seconds_per_latent": seconds / args.nces_latents,
        "peak_extra_mb": memory.peak_bytes / 2**20,
    }


def plot(training: pd.DataFrame, nces: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    speed, mem, cost = fig.subplots(1, 3)
    for arch, rows in training.groupby("architecture"):
        speed.plot(rows["d_sae"], rows["steps_per_s"], marker="o", label=arch)
        mem.plot(rows["d_sae"], rows["peak_extra_mb"], marker="o", label=arch)
    for ax, label in ((speed, "training steps / s"), (mem, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_sae")
        ax.set_ylabel(label)
    speed.legend(fontsize="small")
    for width, rows in nces.groupby("d_sae"):
        cost.plot(rows["context"], rows["seconds_per_latent"], marker="o", label=f"d_sae {width}")
    cost.set_xlabel("tokens per sequence")
    cost.set_ylabel("NCES eval seconds per latent")
    cost.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, choices=[MODEL, "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="d_sae sizes")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=None, help="default 1024 / 256")
    parser.add_argument("--nces-latents", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    args.widths = args.widths or ([128, 256, 512] if tiny else [512, 1024, 2048])
    args.batch_tokens = args.batch_tokens or (256 if tiny else 1024)
    if tiny:
        args.k = min(args.k, 8)
        args.contexts = [c for c in args.contexts if c <= 32] or [32]
    context = max(args.contexts)
    if tiny:
        model, train, evaluation, bos = tiny_setup(context, rows=512, eval_rows=64)
    else:
        model, train, evaluation, bos = gemma_setup(args.device, 128)
    hook = TINY_HOOK if tiny else HOOK

    # untimed warm-up: the first training run in a process pays one-time costs (allocator,
    # kernels) that would otherwise land on whichever architecture is measured first
    training_row(model, hook, train, TrainSpec("topk", args.widths[0], args.k), args, bos)
    rows = []
    for width in args.widths:
        for arch in ARCHITECTURES:
            overrides = (
                {"kl_estimator": "exact", "kl_finetune_fraction": 0.0, "lambda_kl": 1.0}
                | {"kl_every": 10, "kl_batch_size": 4}
                if arch == "causal"
                else {}
            )
            rows.append(
                training_row(
                    model, hook, train, TrainSpec(arch, width, args.k, overrides), args, bos
                )
            )
            print(
                f"[train] {arch} d_sae {width}: {rows[-1]['steps_per_s']:.3f} steps/s", flush=True
            )
    training = pd.DataFrame(rows)
    topk = training[training["architecture"] == "topk"].set_index("d_sae")["steps_per_s"]
    training["throughput_vs_topk"] = training["steps_per_s"] / training["d_sae"].map(topk)

    rows = []
    for width in args.widths:
        sae = data_initialised_topk(model, hook, train[:64], width, args.k, args.seed)
        for ctx in args.contexts:
            rows.append(nces_row(model, sae, evaluation[:32], train[64:96], ctx, args, bos))
            print(f"[nces] d_sae {width} ctx {ctx}: {rows[-1]['seconds_per_latent']:.2f} s/latent")
    nces = pd.DataFrame(rows)

    out = args.out or RESULTS / f"overhead_{args.model}.json"
    result = {
        "benchmark": "overhead: training throughput / memory per architecture, NCES cost",
        "machine": machine(args.device),
        "settings": {**vars(args), "out": str(out), "hook": hook},
        "training": training.to_dict(orient="records"),
        "nces": nces.to_dict(orient="records"),
    }
    write_json(out, result)
    out.with_suffix(".md").write_text(
        "training (same runner, model, hook, tokens)\n\n"
        + training.to_markdown(index=False, floatfmt=".3g")
        + "\n\nNCES eval cost\n\n"
        + nces.to_markdown(index=False, floatfmt=("g", "g", ".3g", ".3g"))
        + "\n"
    )
    plot(training, nces, out.with_suffix(".png"))
    print(training.to_string(float_format="{:.3g}".format))
    print(nces.to_string(float_format="{:.3g}".format))
    print(f"written to {out} (.md, .png)")
    return result


if __name__ == "__main__":
    main()
