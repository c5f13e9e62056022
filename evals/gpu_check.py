"""One-shot GPU check: the whole plugin on CUDA, its numbers against the CPU, and its speed.

On one GPU, in under 8 minutes, this script

1. builds a model of the exact Gemma 3 270M architecture (``--model random-gemma3-arch``, the
   default: seeded random weights, the real tokenizer; the real weights exceed what can be
   sent to the GPU machine) or loads the embedded real one (``--model embedded``);
2. trains a causal SAE (KL and causal-verification terms on) and a TopK SAE through the
   runner on the device;
3. runs ``sae_bench run --eval core,nces --device <device>`` on both (the real command line, as
   ``python -m csae_plugin.cli``, on a local Hugging Face folder of the model);
4. times the NCES engine at the bench settings (``evals/bench_nces.py``: 4 sequences x 64 tokens,
   4 null draws) for two copy batch sizes, and on a 16,384-latent SAE, projecting the time for
   all its latents, with peak GPU memory;
5. reruns NCES on a few of the same latents on the CPU (same SAE, tokens and reference
   statistics) and checks that the per-latent effects agree (float32, relative 1e-3).

Every stage's result (or error) goes into one JSON file, rewritten atomically after each stage,
so a run cut short still leaves what it finished. Exit code 0 = PASS, 1 = FAIL, 2 = unusable
setup (e.g. ``--device cuda`` without CUDA).

    python evals/gpu_check.py                              # on the GPU (evals/GPU_CHECK.md)
    python evals/gpu_check.py --device cpu --quick         # the whole flow at toy scale, on a CPU
"""

from __future__ import annotations

import os

# no machine this runs on reaches a model hub: fail fast instead of retrying requests
for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("WANDB_MODE", "disabled"),
):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import lzma  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
EVALS_DIR = REPO / "evals"
RESULTS = EVALS_DIR / "results"
BUNDLE = REPO / ".devbundle"
MODEL_CONFIG = EVALS_DIR / "gpu_check_gemma3_270m_config.json"
"""Hugging Face config of the embedded Gemma 3 270M (its cached ``config.json``)."""

HOOK = "blocks.6.hook_resid_post"
RANDOM_WEIGHTS_NOTE = (
    "random, Gemma 3 270M architecture; real weights exceed the device transfer limit"
)
REAL_WEIGHTS_NOTE = "real: the embedded Gemma 3 270M (Q4_K_M GGUF dequantised to float32)"
RTOL = 1e-3
ATOL = 1e-9  # nats: below this an effect is float32 noise in a KL over 262,144 tokens
GOAL_MINUTES = 30.0
GOAL_LATENTS = 16384
PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "sae-lens",
    "sae-bench",
    "transformer-lens",
    "datasets",
    "pydantic",
    "pandas",
    "scipy",
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each stage is: full (the GPU run) or quick (a toy run to test the flow)."""

    train_context: int = 128
    d_sae: int = 2048
    k: int = 32
    training_tokens: int = 204_800
    batch_size_tokens: int = 1024
    kl_every: int = 10
    verify_every: int = 50
    verify_latents: int = 32
    norm_estimate_batches: int = 8
    # sae_bench run (core + nces)
    eval_context: int = 64
    n_eval_sequences: int = 128
    n_reference_sequences: int = 64
    cli_latents: int = 128
    seqs_per_latent: int = 4
    null_draws: int = 4
    copy_batch_size: int = 256
    llm_batch_size: int = 16
    cli_timeout_s: int = 300
    # engine timing at the bench settings
    timing_latents: int = 64
    timing_batch_sizes: tuple[int, ...] = (32, 256)
    timing_reference_seqs: int = 64
    big_d_sae: int = 16384
    big_latents: int = 128
    # GPU vs CPU
    agree_latents: int = 4
    agree_stats_seqs: int = 32


QUICK = Scale(
    train_context=64,
    d_sae=256,
    k=16,
    training_tokens=2048,
    batch_size_tokens=512,
    kl_every=2,
    verify_every=2,
    verify_latents=4,
    norm_estimate_batches=2,
    n_eval_sequences=8,
    n_reference_sequences=8,
    cli_latents=4,
    seqs_per_latent=2,
    null_draws=2,
    copy_batch_size=32,
    llm_batch_size=8,
    timing_latents=2,
    timing_batch_sizes=(8, 32),
    timing_reference_seqs=8,
    big_d_sae=1024,
    big_latents=2,
    agree_latents=2,
    agree_stats_seqs=4,
)


class SetupError(RuntimeError):
    """The run cannot be meaningful here (exit code 2)."""


class Skipped(RuntimeError):
    """A stage that cannot run because an earlier one failed."""


class Check:
    """Runs the stages, keeps the result dict and rewrites the JSON file after each stage."""

    def __init__(self, args: argparse.Namespace, scale: Scale):
        self.args = args
        self.scale = scale
        self.start = time.perf_counter()
        self.ctx: dict[str, Any] = {}
        self.out: Path | None = None
        self.result: dict[str, Any] = {
            "check": "csae-plugin GPU check (evals/gpu_check.py)",
            "status": "INCOMPLETE",
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "model": {"kind": args.model},
            "settings": {
                "device": args.device,
                "quick": args.quick,
                "hook": HOOK,
                "seed": args.seed,
                "float32_matmul": "highest (TF32 off)",
                **dataclasses.asdict(scale),
            },
            "stages": {},
            "checks": {},
        }

    def log(self, message: str) -> None:
        print(f"[gpu_check +{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self) -> None:
        if self.out is None:
            return
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        text = json.dumps(_json_safe(self.result), indent=2, default=str, allow_nan=False)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", dir=self.out.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.out)

    def stage(self, name: str, fn: Callable[[Check], dict[str, Any] | None]) -> bool:
        """Run one stage; its dict (or its error) lands in ``result["stages"][name]``."""
        entry: dict[str, Any] = {"status": "running"}
        self.result["stages"][name] = entry
        self.write()
        self.log(f"stage {name}: start")
        began = time.perf_counter()
        try:
            entry.update(fn(self) or {})
            entry["status"] = "ok"
        except Skipped as skip:
            entry.update(status="skipped", reason=str(skip))
        except SetupError:
            entry["status"] = "error"
            raise
        except Exception as err:  # one failing stage must not lose the others' results
            entry.update(
                status="error",
                error=f"{type(err).__name__}: {err}"[:2000],
                traceback=traceback.format_exc()[-6000:],
            )
            traceback.print_exc()
        finally:
            entry["seconds"] = round(time.perf_counter() - began, 2)
            if self.args.device.startswith("cuda"):
                import torch

                if torch.cuda.is_available():
                    entry["gpu_peak_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
            self.write()
            self.log(f"stage {name}: {entry['status']} in {entry['seconds']:.1f} s")
        return entry["status"] == "ok"

    def need(self, *keys: str) -> list[Any]:
        missing = [key for key in keys if key not in self.ctx]
        if missing:
            raise Skipped(f"needs {', '.join(missing)} from an earlier stage that failed")
        return [self.ctx[key] for key in keys]


# ---------------------------------------------------------------------------------- stages


def stage_environment(check: Check) -> dict[str, Any]:
    import torch

    device = check.args.device
    torch.manual_seed(check.args.seed)
    torch.set_float32_matmul_precision("highest")  # TF32 off: the CPU comparison is float32
    machine: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=_gib(props.total_memory),
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            nvidia_smi=_nvidia_smi(),
        )
    check.result["machine"] = machine
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(
            f"--device {device} but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}); this check needs the "
            "GPU: run it on the GPU machine, or pass --device cpu for a CPU-only dry run"
        )
    check.ctx["device"] = device
    return {"device": device, "gpu": machine.get("gpu")}


def stage_imports(check: Check) -> dict[str, Any]:
    started = time.perf_counter()
    import sae_bench.evals.core.main  # noqa: F401
    import sae_lens
    import transformer_lens  # noqa: F401

    import csae_plugin
    from csae_plugin import cli  # noqa: F401

    return {
        "seconds_to_import": round(time.perf_counter() - started, 2),
        "csae_plugin": str(Path(csae_plugin.__file__).parent),
        "sae_lens": str(Path(sae_lens.__file__).parent),
    }


def stage_model(check: Check) -> dict[str, Any]:
    import torch

    from csae_plugin.models import EMBEDDED_MODEL, load_model

    device = check.ctx["device"]
    info: dict[str, Any] = {}
    started = time.perf_counter()
    if check.args.model == "embedded":
        spec = EMBEDDED_MODEL
        model = load_model(spec, device=device)
        info["weights"] = REAL_WEIGHTS_NOTE
    else:
        folder = check.ctx["work"] / "random-gemma3-270m"
        tokenizer_dir = find_tokenizer(check.args.tokenizer)
        info["tokenizer_from"] = str(tokenizer_dir)
        info["build_seconds"] = build_random_model_folder(folder, tokenizer_dir, check.args.seed)
        spec = str(folder)
        model = load_model(spec, device=device)
        info["weights"] = RANDOM_WEIGHTS_NOTE
        info["init"] = (
            f"transformers' own initialisation of Gemma3ForCausalLM (normal, std "
            f"initializer_range), torch.manual_seed({check.args.seed})"
        )
    info["load_seconds"] = round(time.perf_counter() - started, 2)
    cfg = model.cfg
    info["cfg"] = {
        key: getattr(cfg, key, None)
        for key in (
            "model_name",
            "original_architecture",
            "n_layers",
            "d_model",
            "n_heads",
            "d_head",
            "n_key_value_heads",
            "d_mlp",
            "d_vocab",
            "n_ctx",
            "act_fn",
            "normalization_type",
            "positional_embedding_type",
            "output_logits_soft_cap",
            "dtype",
            "device",
        )
    }
    info["n_parameters"] = sum(p.numel() for p in model.parameters())
    info["parameter_device"] = str(next(model.parameters()).device)
    info["cli_model_arg"] = spec
    check.result["model"].update(weights=info["weights"], cli_model_arg=spec)
    check.ctx.update(model=model, model_spec=spec)

    # sanity: finite activations of a sensible size, finite and non-degenerate outputs
    tokenizer = model.tokenizer
    text = "The capital of Germany is Berlin. The standard library documents every module."
    tokens = tokenizer(text, return_tensors="pt")["input_ids"]
    if tokens[0, 0] != tokenizer.bos_token_id:
        tokens = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), tokens], dim=1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens.to(device), names_filter=[HOOK])
    x = cache[HOOK][0, 1:]
    logp = logits[0].float().log_softmax(-1)
    info["sanity"] = {
        "n_tokens": int(tokens.shape[1]),
        "activations_finite": bool(torch.isfinite(cache[HOOK]).all()),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "resid_norm_mean": float(x.norm(dim=-1).mean()),
        "resid_norm_max": float(x.norm(dim=-1).max()),
        "bos_resid_norm": float(cache[HOOK][0, 0].norm()),
        "entropy_mean_nats": float(-(logp.exp() * logp).sum(-1).mean()),
        "uniform_entropy_nats": math.log(cfg.d_vocab),
    }
    if not (info["sanity"]["activations_finite"] and info["sanity"]["logits_finite"]):
        raise RuntimeError(f"the model gives non-finite values: {info['sanity']}")
    return info


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
    real model). The tolerances of tests/test_interventions.py's bfloat16 test are shown.
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
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = fn()
        _sync(device)
        peak = _gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
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
    from evals.common import data_initialised_topk

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
        "sae": f"TopK d_sae={s.big_d_sae} k=32, data-initialised (evals/bench_nces.py), untrained",
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
    _sync(device)
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
            "effect_kl": _compare(effect_kl, [cli_rows[int(i)]["effect_kl"] for i in latents]),
            "null_kl": _compare(null_kl, [cli_rows[int(i)]["null_kl"] for i in latents]),
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
    effect = _compare(on_device.effect, on_cpu.effect)
    null = _compare(on_device.null_per_draw, on_cpu.null_per_draw)
    per_latent = _compare(np.nanmean(on_device.effect, 1), np.nanmean(on_cpu.effect, 1))
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
            "act_mean": _compare(stats_device.act_mean.numpy(), stats_cpu.act_mean.numpy()),
            "covariance_rel_frobenius": float(
                (sigma_device - sigma_cpu).norm() / sigma_cpu.norm().clamp(min=1e-30)
            ),
            "mean_act": _compare(stats_device.mean_act.numpy(), stats_cpu.mean_act.numpy()),
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


# --------------------------------------------------------------------------------- helpers


def find_tokenizer(explicit: str | None) -> Path:
    """A folder with Gemma 3's ``tokenizer.json`` (or ``.json.xz``) and ``tokenizer_config.json``."""
    from csae_plugin.models import embedded_cache_dir

    candidates = (
        [Path(explicit)] if explicit else [BUNDLE / "gemma3-tokenizer", embedded_cache_dir()]
    )
    for folder in candidates:
        has_json = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.json.xz").is_file()
        if has_json and (folder / "tokenizer_config.json").is_file():
            return folder
    raise SetupError(
        "no Gemma 3 tokenizer found in "
        + ", ".join(map(str, candidates))
        + " (build the bundle: bash evals/gpu_bundle.sh, or pass --tokenizer DIR)"
    )


def build_random_model_folder(folder: Path, tokenizer_dir: Path, seed: int) -> float:
    """A Hugging Face folder holding a seeded random Gemma 3 270M and the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config_dict = json.loads(MODEL_CONFIG.read_text())
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.to(torch.float32).save_pretrained(folder)
    del hf_model
    shutil.copy(tokenizer_dir / "tokenizer_config.json", folder)
    packed = tokenizer_dir / "tokenizer.json.xz"
    if packed.is_file():
        with lzma.open(packed) as src, open(folder / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copy(tokenizer_dir / "tokenizer.json", folder)
    return round(time.perf_counter() - started, 2)


def _compare(device_values: Any, cpu_values: Any) -> dict[str, Any]:
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return os.environ.get("CSAE_GIT_COMMIT")


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(key): _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _json_safe(obj.item())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    name = "cpu"
    if args.device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-cuda"
    suffix = "_quick" if args.quick else ""
    return Path(args.out_dir) / f"gpu_check_{_slug(name)}{suffix}.json"


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="default: %(default)s")
    parser.add_argument(
        "--model",
        default="random-gemma3-arch",
        choices=["random-gemma3-arch", "embedded"],
        help="seeded random weights of the Gemma 3 270M architecture (default), or the "
        "embedded real Gemma 3 270M",
    )
    parser.add_argument("--quick", action="store_true", help="toy scale: tests the flow only")
    parser.add_argument("--tokenizer", help="folder with Gemma 3's tokenizer files")
    parser.add_argument("--out", help="result JSON (default: OUT_DIR/gpu_check_<gpu>.json)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="default: %(default)s")
    parser.add_argument("--work-dir", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420,
        help="stages not started by then are skipped (default: %(default)s)",
    )
    return parser


STAGES: tuple[tuple[str, Callable[[Check], dict[str, Any] | None]], ...] = (
    ("environment", stage_environment),
    ("imports", stage_imports),
    ("model", stage_model),
    ("train", stage_train),
    ("sae_bench", stage_cli),
    ("gpu_vs_cpu", stage_agreement),
    ("timing", stage_timing),
    ("bfloat16", stage_bfloat16),
)
GATING = ("environment", "imports", "model", "train", "sae_bench", "gpu_vs_cpu")
"""Stages that must succeed for PASS (the timing stage reports, it does not gate)."""


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    check = Check(args, QUICK if args.quick else Scale())
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    check.ctx["work"] = work
    code = 0
    try:
        for name, fn in STAGES:
            if name in skip:
                check.result["stages"][name] = {"status": "skipped", "reason": "--skip"}
                continue
            if check.elapsed() > args.budget_s:
                reason = f"time budget of {args.budget_s:.0f} s spent"
                check.result["stages"][name] = {"status": "skipped", "reason": reason}
                continue
            if check.out is None and name != "environment":
                check.out = output_path(args)
                check.log(f"results: {check.out}")
            check.stage(name, fn)
    except SetupError as err:
        check.out = check.out or output_path(args)
        check.result["status"] = "SETUP ERROR"
        check.result["error"] = str(err)
        check.write()
        print(f"gpu_check: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    stages = check.result["stages"]
    gating_ok = all(stages.get(name, {}).get("status") == "ok" for name in GATING)
    agree = check.result["checks"].get("gpu_cpu_effects_agree", False)
    check.result["checks"]["all_gating_stages_ok"] = gating_ok
    check.result["status"] = "PASS" if gating_ok and agree else "FAIL"
    code = 0 if check.result["status"] == "PASS" else 1
    check.write()
    print(json.dumps(_json_safe(check.result), indent=2, default=str))
    check.log(f"{check.result['status']}; results in {check.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
