"""The GPU check's training and command-line stages: a causal and a TopK SAE trained through
the runner on the device, ``sae_bench run --eval core,nces`` on both, and the causal SAE's NCES
again with ``--llm-dtype bfloat16`` against float32."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from evals.common import HOOK, REPO
from evals.gpu.runner import Check


def stage_train(check: Check) -> dict[str, Any]:
    import torch

    from csae_plugin.data import corpus_splits
    from csae_plugin.training import TrainSpec, train_sae
    from csae_plugin.training.context import CausalTrainingContext

    (model,) = check.need("model")
    s, device = check.scale, check.ctx["device"]
    began = time.perf_counter()
    splits = corpus_splits(model.tokenizer, s.train_context, seed=check.args.seed)
    bos = model.tokenizer.bos_token_id
    out: dict[str, Any] = {
        "corpus_seconds": round(time.perf_counter() - began, 2),
        "corpus": {
            "train_sequences": int(splits.train.shape[0]),
            "eval_sequences": int(splits.eval.shape[0]),
            "context": s.train_context,
        },
        "saes": {},
    }
    kl_values: list[dict[str, Any]] = []
    original_kl_term = CausalTrainingContext.kl_term

    def counted_kl_term(self: CausalTrainingContext, sae: Any) -> torch.Tensor:
        value = original_kl_term(self, sae)
        kl_values.append({"kl": float(value.detach()), "device": str(value.device)})
        return value

    specs = [
        TrainSpec(
            "causal",
            s.d_sae,
            s.k,
            {
                "kl_estimator": "exact",
                "kl_finetune_fraction": 0.0,
                "lambda_kl": 1.0,
                "kl_every": s.kl_every,
                "verify_every": s.verify_every,
                "verify_latents": s.verify_latents,
                "verify_seqs_per_latent": 4,
                "verify_null_draws": 2,
            },
        ),
        TrainSpec("topk", s.d_sae, s.k),
    ]
    folders = {}
    CausalTrainingContext.kl_term = counted_kl_term  # type: ignore[method-assign]
    try:
        for spec in specs:
            kl_values.clear()
            folder = check.ctx["work"] / "saes" / spec.name
            check.log(f"training {spec.name} on {s.training_tokens:,} tokens ({device})")
            t0 = time.perf_counter()
            sae, runner = train_sae(
                model,
                HOOK,
                splits.train,
                spec,
                training_tokens=s.training_tokens,
                output_path=folder,
                batch_size_tokens=s.batch_size_tokens,
                seed=check.args.seed,
                exclude_special_tokens=[bos],
                device=device,
                norm_estimate_batches=s.norm_estimate_batches,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            context = getattr(runner.sae, "causal_context", None)
            entry: dict[str, Any] = {
                "seconds": round(seconds, 2),
                "steps": s.training_tokens // s.batch_size_tokens,
                "tokens_per_s": round(s.training_tokens / seconds, 1),
                "sae_device": str(sae.W_dec.device),
                "architecture": sae.cfg.architecture(),
                "d_sae": sae.cfg.d_sae,
            }
            if spec.architecture == "causal":
                history = [] if context is None else context.history
                entry.update(
                    kl_terms=len(kl_values),
                    kl_values=[round(v["kl"], 6) for v in kl_values],
                    kl_device=sorted({v["device"] for v in kl_values}),
                    verifications=history,
                )
                if not kl_values or not all(math.isfinite(v["kl"]) for v in kl_values):
                    raise RuntimeError(f"the KL term did not run or was not finite: {kl_values}")
                if not history:
                    raise RuntimeError("causal verification never ran during training")
            out["saes"][spec.name] = entry
            folders[spec.architecture] = folder
            del sae, runner
    finally:
        CausalTrainingContext.kl_term = original_kl_term  # type: ignore[method-assign]
    check.ctx.update(folders=folders, splits=splits)
    return out


def run_cli(
    check: Check, evals: str, folders: list[str], out_dir: Path, extra: list[str], log_name: str
) -> dict[str, Any]:
    """``sae_bench run --eval <evals>`` on ``folders`` at the check's NCES settings (+ ``extra``)."""
    from csae_plugin.evals.api import load_results

    spec = check.need("model_spec")[0]
    s = check.scale
    cmd = [
        sys.executable,
        "-m",
        "csae_plugin.cli",  # the `sae_bench` console command's module
        "run",
        "--eval",
        evals,
        "--sae",
        *[str(folder) for folder in folders],
        "--model",
        spec,
        "--device",
        check.ctx["device"],
        "--output-dir",
        str(out_dir),
        "--force-rerun",
        "--no-progress",
        "--context-size",
        str(s.eval_context),
        "--n-eval-sequences",
        str(s.n_eval_sequences),
        "--n-reference-sequences",
        str(s.n_reference_sequences),
        "--latents",
        str(s.cli_latents),
        "--seqs-per-latent",
        str(s.seqs_per_latent),
        "--null-draws",
        str(s.null_draws),
        "--copy-batch-size",
        str(s.copy_batch_size),
        "--llm-batch-size",
        str(s.llm_batch_size),
        "--random-seed",
        str(check.args.seed),
        *extra,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env["PYTHONUNBUFFERED"] = "1"
    check.log("running: sae_bench " + " ".join(cmd[4:]))
    log_path = check.ctx["work"] / log_name
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=s.cli_timeout_s,
            check=False,
        )
    seconds = time.perf_counter() - t0
    output = log_path.read_text(errors="replace")
    print(output[-4000:], flush=True)
    info: dict[str, Any] = {
        "command": "sae_bench " + " ".join(cmd[4:]),
        "invoked_as": f"{Path(sys.executable).name} -m csae_plugin.cli",
        "returncode": proc.returncode,
        "seconds": round(seconds, 2),
        "output_tail": output[-3000:],
    }
    if proc.returncode != 0:
        raise RuntimeError(f"sae_bench exited with {proc.returncode}: {output[-600:]}")
    table = load_results([out_dir])
    info["table"] = json.loads(table.to_json(orient="index"))
    details = {}
    for path in sorted((out_dir / "nces").glob("*_eval_results.json")):
        result = json.loads(path.read_text())
        details[result["sae_lens_id"]] = result["eval_result_details"]
    info["result_files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.json"))
    info["details"] = details
    return info


def stage_cli(check: Check) -> dict[str, Any]:
    folders = check.need("folders")[0]
    out_dir = check.ctx["work"] / "eval_results"
    info = run_cli(check, "core,nces", list(folders.values()), out_dir, [], "sae_bench.log")
    details = info.pop("details")
    expected = {Path(folder).name for folder in folders.values()}
    found = {
        Path(p).name.split("_eval_results")[0].removeprefix("local_") for p in info["result_files"]
    }
    if not expected <= found or len(info["result_files"]) < 2 * len(expected):
        raise RuntimeError(f"missing result files: expected core and nces for {sorted(expected)}")
    check.ctx["cli_details"] = details
    return info


def stage_bfloat16(check: Check) -> dict[str, Any]:
    """``sae_bench run --eval nces --llm-dtype bfloat16`` on the causal SAE, against float32.

    The same latents, sequences and draws as the float32 sae_bench stage; reported, not gating
    (on random weights the effects are small, so bfloat16's rounding weighs more than on the
    real model). The tolerances of tests/causal/test_engine.py's bfloat16 test are shown.
    """
    import numpy as np

    folders = check.need("folders")[0]
    fp32 = check.ctx.get("cli_details", {})
    name = Path(folders["causal"]).name
    info = run_cli(
        check,
        "nces",
        [folders["causal"]],
        check.ctx["work"] / "eval_results_bf16",
        ["--llm-dtype", "bfloat16"],
        "sae_bench_bf16.log",
    )
    bf16 = info.pop("details")
    rows32 = {row["latent"]: row for row in fp32.get(name, [])}
    rows16 = {row["latent"]: row for row in bf16.get(name, [])}
    both = sorted(
        i
        for i in set(rows32) & set(rows16)
        if not rows32[i]["dead"] and rows32[i]["effect_kl"] and rows16[i]["effect_kl"]
    )
    if not both:
        raise RuntimeError("no latent live in both the float32 and the bfloat16 result")
    out: dict[str, Any] = {"command": info["command"], "seconds": info["seconds"]}
    out["latents_compared"] = len(both)
    for field, tolerance in (("effect_kl", 0.05), ("nces", 0.15)):
        a = np.array([rows16[i][field] for i in both], dtype=np.float64)
        b = np.array([rows32[i][field] for i in both], dtype=np.float64)
        rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
        out[field] = {
            "median_rel_diff": float(np.nanmedian(rel)),
            "max_rel_diff": float(np.nanmax(rel)),
            "test_tolerance": tolerance,
            "frac_within_test_tolerance": float(np.mean(rel <= tolerance)),
        }
    check.result["checks"]["bf16_effect_kl_median_rel_diff"] = out["effect_kl"]["median_rel_diff"]
    return out
