"""How large is the causal SAE's KL term's gradient next to the reconstruction's, on Gemma?

Trains the sweep's causal SAE (``evals/sweep.py`` preset ``cpu``, k 32) with SAELens's runner
and records, at every step, the gradient norm of the decoder and encoder weights just before
the optimizer steps, and Adam's second-moment estimate of the decoder. Steps where the KL term
is on (every ``kl_every``) carry reconstruction + KL gradients, the others reconstruction only,
so the ratio of their norms says how much the KL term dominates the steps it appears in, and
how much the spikes inflate Adam's normaliser for the steps in between.

    python evals/kl_gradients.py [--lambda-kl 1] [--kl-every 10] [--steps 40]

Writes ``evals/results/kl_gradients_<lambda>_<every>.json`` (per step, settings, machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from sweep import HOOK, PRESETS, machine

from csae_plugin.data import corpus_splits
from csae_plugin.models import load_model
from csae_plugin.training import TrainSpec, train_sae
from csae_plugin.training.runner import CausalSAETrainingRunner

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lambda-kl", type=float, default=1.0)
    parser.add_argument("--kl-every", type=int, default=10)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = PRESETS["cpu"]
    model = load_model("gemma-3-270m")
    splits = corpus_splits(model.tokenizer, 128, seed=args.seed)
    overrides = {**preset.causal, "lambda_kl": args.lambda_kl, "kl_every": args.kl_every}
    spec = TrainSpec("causal", preset.d_sae, args.k, overrides)
    rows: list[dict] = []
    parent_run = CausalSAETrainingRunner.run_trainer_with_interruption_handling

    def run_with_probe(runner, trainer):
        sae = runner.sae

        def record(optimizer, *_):
            state = optimizer.state.get(sae.W_dec, {})
            rows.append(
                {
                    "step": len(rows),
                    "kl_step": args.lambda_kl > 0 and len(rows) % args.kl_every == 0,
                    "grad_norm_W_dec": float(sae.W_dec.grad.norm()),
                    "grad_norm_W_enc": float(sae.W_enc.grad.norm()),
                    # Adam's normaliser before this step's update (0 at step 0)
                    "adam_v_W_dec_mean": float(state["exp_avg_sq"].mean()) if state else 0.0,
                }
            )

        handle = trainer.optimizer.register_step_pre_hook(record)
        try:
            return parent_run(runner, trainer)
        finally:
            handle.remove()

    CausalSAETrainingRunner.run_trainer_with_interruption_handling = run_with_probe
    try:
        with TemporaryDirectory() as tmp:
            train_sae(
                model,
                HOOK,
                splits.train,
                spec,
                training_tokens=args.steps * 1024,
                output_path=tmp,
                seed=args.seed,
                exclude_special_tokens=[model.tokenizer.bos_token_id],
            )
    finally:
        CausalSAETrainingRunner.run_trainer_with_interruption_handling = parent_run

    kl = [r["grad_norm_W_dec"] for r in rows if r["kl_step"] and r["step"] > 0]
    plain = [r["grad_norm_W_dec"] for r in rows if not r["kl_step"] and r["step"] > 0]
    summary = {
        "median_grad_norm_W_dec_kl_steps": statistics.median(kl) if kl else None,
        "median_grad_norm_W_dec_other_steps": statistics.median(plain) if plain else None,
    }
    if kl and plain:
        summary["ratio"] = summary["median_grad_norm_W_dec_kl_steps"] / statistics.median(plain)
    result = {
        "produced_by": " ".join(
            ["python evals/kl_gradients.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "settings": {**vars(args), "d_sae": preset.d_sae, "hook": HOOK, "lr": 1e-3},
        "machine": machine(),
        "summary": summary,
        "steps": rows,
    }
    out = RESULTS / f"kl_gradients_{args.lambda_kl:g}_{args.kl_every}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
