"""The GPU check's engine stages: the NCES engine's speed at the bench settings and on a
16,384-latent SAE (projected to all its latents), and the per-latent effects on the device
against the CPU's."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals.common import HOOK, data_initialised_topk
from evals.gpu.runner import Check, gib, sync

RTOL = 1e-3
ATOL = 1e-9  # nats: below this an effect is float32 noise in a KL over 262,144 tokens
GOAL_MINUTES = 30.0
GOAL_LATENTS = 16384


def stage_timing(check: Check) -> dict[str, Any]:
    """s/latent of the engine at the bench settings; a 16k-latent SAE projected to all latents."""
    import numpy as np
    import torch

    from csae_plugin import causal as iv
    from csae_plugin.data import corpus_splits
    from csae_plugin.saes.loading import load_sae_from_folder

    model, folders = check.need("model", "folders")
    s, device = check.scale, check.ctx["device"]
    bench_context, bench_seqs, bench_null = 64, 4, 4
    splits = corpus_splits(model.tokenizer, bench_context, seed=check.args.seed)
    reference = splits.train[: s.timing_reference_seqs]
    evaluation = splits.eval
    bos = model.tokenizer.bos_token_id
    rng = np.random.default_rng(check.args.seed)
    out: dict[str, Any] = {
        "bench_settings": {
            "context": bench_context,
            "seqs_per_latent": bench_seqs,
            "null_draws": bench_null,
            "intervention": "zero",
            "reference_seqs": int(reference.shape[0]),
            "eval_seqs": int(evaluation.shape[0]),
        }
    }

    def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = fn()
        sync(device)
        peak = gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
        return value, time.perf_counter() - t0, peak

    def engine(sae: Any, stats: Any, latents: np.ndarray, batch_size: int) -> Any:
        return iv.latent_effects(
            model,
            sae,
            evaluation,
            latents,
            stats,
            null_draws=bench_null,
            seqs_per_latent=bench_seqs,
            batch_size=batch_size,
            seed=check.args.seed,
            bos_token_id=bos,
            progress=False,
        )

    # the trained causal SAE (d_sae of the training stage)
    sae = load_sae_from_folder(folders["causal"], device=device)
    stats, stats_s, _ = timed(
        lambda: iv.reference_stats(model, sae, reference, bos_token_id=bos, seed=check.args.seed)
    )
    alive = np.nonzero(stats.firing_freq.numpy() > 0)[0]
    latents = np.sort(rng.choice(alive, size=min(s.timing_latents, len(alive)), replace=False))
    engine(sae, stats, latents[:2], s.timing_batch_sizes[-1])  # warm-up: CUDA context, kernels
    runs = []
    for batch_size in s.timing_batch_sizes:
        effects, seconds, peak = timed(lambda b=batch_size: engine(sae, stats, latents, b))
        evaluated = int((effects.n_sequences > 0).sum())
        runs.append(
            {
                "copy_batch_size": batch_size,
                "latents": evaluated,
                "copies": int(effects.n_sequences.sum()) * (1 + bench_null),
                "seconds": round(seconds, 3),
                "s_per_latent": seconds / max(evaluated, 1),
                "peak_gpu_allocated_gib": peak,
            }
        )
        check.log(f"engine d_sae={sae.cfg.d_sae} batch {batch_size}: {runs[-1]}")
    out["trained_sae"] = {
        "d_sae": sae.cfg.d_sae,
        "alive_fraction": float(len(alive) / sae.cfg.d_sae),
        "reference_stats_seconds": round(stats_s, 3),
        "runs": runs,
    }
    check.result["timings"] = {"engine_trained_sae": out["trained_sae"]}
    check.write()
    sae = stats = None  # free their memory before the large SAE

    # a 16,384-latent SAE: time a uniform sample of its latents, project all of them
    n_init = -(-2 * s.big_d_sae // (bench_context - 1))  # twice d_sae non-BOS tokens
    init_tokens = splits.train[s.timing_reference_seqs : s.timing_reference_seqs + n_init]
    t0 = time.perf_counter()
    big = data_initialised_topk(model, HOOK, init_tokens, s.big_d_sae, k=32, seed=check.args.seed)
    init_s = time.perf_counter() - t0
    big_stats, big_stats_s, _ = timed(
        lambda: iv.reference_stats(model, big, reference, bos_token_id=bos, seed=check.args.seed)
    )
    sample = np.sort(rng.choice(s.big_d_sae, size=s.big_latents, replace=False))
    best = min(runs, key=lambda run: run["s_per_latent"])["copy_batch_size"]
    big_runs = []
    for batch_size in sorted({best, s.timing_batch_sizes[-1]}):
        effects, seconds, peak = timed(lambda b=batch_size: engine(big, big_stats, sample, b))
        projected = big_stats_s + seconds / len(sample) * GOAL_LATENTS
        big_runs.append(
            {
                "copy_batch_size": batch_size,
                "latents_timed": len(sample),
                "latents_alive_in_sample": int((effects.n_sequences > 0).sum()),
                "seconds": round(seconds, 3),
                "s_per_latent": seconds / len(sample),
                "projected_all_latents_minutes": projected / 60,
                "peak_gpu_allocated_gib": peak,
            }
        )
        check.log(f"engine d_sae={s.big_d_sae} batch {batch_size}: {big_runs[-1]}")
    fastest = min(big_runs, key=lambda run: run["projected_all_latents_minutes"])
    out["sae_16k"] = {
        "sae": f"TopK d_sae={s.big_d_sae} k=32, data-initialised (evals/common.py), untrained",
        "d_sae": s.big_d_sae,
        "init_seconds": round(init_s, 2),
        "reference_stats_seconds": round(big_stats_s, 3),
        "sampled_latents": "uniform over all latents (dead ones included), seeded",
        "runs": big_runs,
        "projection": "reference_stats_seconds + s_per_latent x 16384",
        "projected_all_latents_minutes": fastest["projected_all_latents_minutes"],
        "goal": f"all {GOAL_LATENTS} latents in <= {GOAL_MINUTES:.0f} min on one GPU",
        "goal_met": bool(fastest["projected_all_latents_minutes"] <= GOAL_MINUTES),
    }
    # the second-order screen of all 16k latents (what latents="screen:N" runs first)
    from csae_plugin.causal.screen import nces_screen

    _, screen_s, screen_peak = timed(
        lambda: nces_screen(
            model,
            big,
            evaluation[:24],
            big_stats,
            samples=8,
            seed=check.args.seed,
            bos_token_id=bos,
            progress=False,
        )
    )
    out["sae_16k"]["screen_all_latents"] = {
        "sequences": 24,
        "samples": 8,
        "seconds": round(screen_s, 3),
        "peak_gpu_allocated_gib": screen_peak,
    }
    check.log(f"screen d_sae={s.big_d_sae}: {out['sae_16k']['screen_all_latents']}")
    check.result["timings"]["engine_16k_sae"] = out["sae_16k"]
    check.result["checks"]["nces_16k_goal_met"] = out["sae_16k"]["goal_met"]
    return out


def stage_agreement(check: Check) -> dict[str, Any]:
    """The same latents, SAE, tokens and reference statistics: effects on the device vs CPU."""
    import numpy as np
    import torch

    from csae_plugin import causal as iv
    from csae_plugin.evals.nces.eval_config import NCESEvalConfig
    from csae_plugin.evals.nces.main import load_tokens, select_latents
    from csae_plugin.saes.loading import load_sae_from_folder

    model, folders, spec = check.need("model", "folders", "model_spec")
    s, device, seed = check.scale, check.ctx["device"], check.args.seed
    config = NCESEvalConfig(  # what the sae_bench stage ran with
        model_name=spec,
        context_size=s.eval_context,
        n_eval_sequences=s.n_eval_sequences,
        n_reference_sequences=s.n_reference_sequences,
        latents=s.cli_latents,
        seqs_per_latent=s.seqs_per_latent,
        null_draws=s.null_draws,
        copy_batch_size=s.copy_batch_size,
        llm_batch_size=s.llm_batch_size,
        random_seed=seed,
    )
    eval_tokens, reference_tokens = load_tokens(model, config)
    sae = load_sae_from_folder(folders["causal"], device=device)
    stats = iv.reference_stats(
        model, sae, reference_tokens, batch_size=config.llm_batch_size, seed=seed
    )
    name = Path(folders["causal"]).name
    cli_rows = {row["latent"]: row for row in check.ctx.get("cli_details", {}).get(name, [])}
    if cli_rows:  # the largest effects: far above float32 noise, so 1e-3 is a fair bar
        live = [row for row in cli_rows.values() if not row["dead"] and row["effect_kl"]]
        live.sort(key=lambda row: -row["effect_kl"])
        chosen = [row["latent"] for row in live[: s.agree_latents]]
        source = "the sae_bench run's evaluated latents with the largest effect_kl"
    else:
        ids = select_latents(config.latents, sae.cfg.d_sae, seed)
        chosen = [int(i) for i in ids if stats.firing_freq[int(i)] > 0][: s.agree_latents]
        source = "select_latents of the same config (the sae_bench stage gave no details)"
    latents = np.array(sorted(chosen), dtype=np.int64)
    if len(latents) == 0:
        raise RuntimeError("no live latent to compare")

    def run(on_model: Any, on_sae: Any) -> Any:
        return iv.latent_effects(
            on_model,
            on_sae,
            eval_tokens,
            latents,
            stats,
            intervention=config.intervention,
            null_draws=config.null_draws,
            seqs_per_latent=config.seqs_per_latent,
            batch_size=config.copy_batch_size,
            seed=seed,
            progress=False,
        )

    t0 = time.perf_counter()
    on_device = run(model, sae)
    sync(device)
    device_s = time.perf_counter() - t0
    sub = reference_tokens[: s.agree_stats_seqs]
    stats_device = iv.reference_stats(model, sae, sub, batch_size=config.llm_batch_size, seed=seed)

    out: dict[str, Any] = {
        "latents": latents.tolist(),
        "latents_from": source,
        "seqs_per_latent": config.seqs_per_latent,
        "null_draws": config.null_draws,
        "device_seconds": round(device_s, 3),
        "tolerance": f"|a - b| <= {ATOL} + {RTOL} |b| (b = CPU), float32, TF32 off",
    }
    if cli_rows:  # the in-process device run against the sae_bench result file
        effect_kl = np.nanmean(on_device.effect, axis=1)
        null_kl = np.nanmean(on_device.null, axis=1)
        out["inprocess_vs_sae_bench_file"] = {
            "effect_kl": compare_values(
                effect_kl, [cli_rows[int(i)]["effect_kl"] for i in latents]
            ),
            "null_kl": compare_values(null_kl, [cli_rows[int(i)]["null_kl"] for i in latents]),
        }

    check.log(f"moving the model to the CPU for the rerun ({torch.get_num_threads()} threads)")
    model.to("cpu", print_details=False)
    try:
        sae_cpu = load_sae_from_folder(folders["causal"], device="cpu")
        t0 = time.perf_counter()
        on_cpu = run(model, sae_cpu)
        cpu_s = time.perf_counter() - t0
        stats_cpu = iv.reference_stats(
            model, sae_cpu, sub, batch_size=config.llm_batch_size, seed=seed
        )
    finally:
        model.to(device, print_details=False)
    same_sequences = bool(np.array_equal(on_device.sequences, on_cpu.sequences))
    same_positions = bool(np.array_equal(on_device.n_positions, on_cpu.n_positions))
    effect = compare_values(on_device.effect, on_cpu.effect)
    null = compare_values(on_device.null_per_draw, on_cpu.null_per_draw)
    per_latent = compare_values(np.nanmean(on_device.effect, 1), np.nanmean(on_cpu.effect, 1))
    sigma_device = stats_device.cov_factor @ stats_device.cov_factor.T
    sigma_cpu = stats_cpu.cov_factor @ stats_cpu.cov_factor.T
    out.update(
        cpu_seconds=round(cpu_s, 3),
        cpu_threads=torch.get_num_threads(),
        same_sequences=same_sequences,
        same_intervened_positions=same_positions,
        effect=effect,
        null_per_draw=null,
        per_latent_effect_kl=per_latent,
        device_effect=on_device.effect.tolist(),
        cpu_effect=on_cpu.effect.tolist(),
        reference_stats={
            "sequences": int(sub.shape[0]),
            "act_mean": compare_values(stats_device.act_mean.numpy(), stats_cpu.act_mean.numpy()),
            "covariance_rel_frobenius": float(
                (sigma_device - sigma_cpu).norm() / sigma_cpu.norm().clamp(min=1e-30)
            ),
            "mean_act": compare_values(stats_device.mean_act.numpy(), stats_cpu.mean_act.numpy()),
            "firing_freq_max_abs_diff": float(
                (stats_device.firing_freq - stats_cpu.firing_freq).abs().max()
            ),
        },
    )
    agree = same_sequences and same_positions and effect["allclose"] and null["allclose"]
    out["pass"] = bool(agree)
    check.result["checks"]["gpu_cpu_effects_agree"] = bool(agree)
    check.result["checks"]["gpu_cpu_max_rel_diff"] = {
        "effect": effect["max_rel"],
        "null": null["max_rel"],
    }
    return out


def compare_values(device_values: Any, cpu_values: Any) -> dict[str, Any]:
    import numpy as np

    a = np.asarray(device_values, dtype=np.float64)
    b = np.array(
        [np.nan if v is None else v for v in np.ravel(np.asarray(cpu_values, dtype=object))]
    )
    b = b.astype(np.float64).reshape(np.shape(cpu_values))
    both = np.isfinite(a) & np.isfinite(b)
    same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
    diff = np.abs(a[both] - b[both])
    rel = diff / np.maximum(np.abs(b[both]), 1e-30)
    return {
        "n": int(both.sum()),
        "same_missing": same_nan,
        "max_abs": float(diff.max()) if diff.size else None,
        "max_rel": float(rel.max()) if rel.size else None,
        "min_value": float(np.abs(b[both]).min()) if diff.size else None,
        "allclose": bool(same_nan and both.any() and (diff <= ATOL + RTOL * np.abs(b[both])).all()),
    }
