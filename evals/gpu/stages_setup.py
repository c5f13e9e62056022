"""The GPU check's first stages: the machine and its packages, the imports, and the model (a
seeded random Gemma 3 270M built from its config and the real tokenizer, or the embedded
real one) with a sanity check of its activations and outputs."""

from __future__ import annotations

import json
import lzma
import math
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from evals.common import HOOK, REPO, machine
from evals.gpu.runner import Check, SetupError, gib

BUNDLE = REPO / ".devbundle"
MODEL_CONFIG = Path(__file__).with_name("gemma3_270m_config.json")
"""Hugging Face config of the embedded Gemma 3 270M (its cached ``config.json``)."""
RANDOM_WEIGHTS_NOTE = (
    "random, Gemma 3 270M architecture; real weights exceed the device transfer limit"
)
REAL_WEIGHTS_NOTE = "real: the embedded Gemma 3 270M (Q4_K_M GGUF dequantised to float32)"
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


def stage_environment(check: Check) -> dict[str, Any]:
    import torch

    device = check.args.device
    torch.manual_seed(check.args.seed)
    torch.set_float32_matmul_precision("highest")  # TF32 off: the CPU comparison is float32
    info = machine(device) | {
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=gib(props.total_memory),
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            nvidia_smi=nvidia_smi(),
        )
    check.result["machine"] = info
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(
            f"--device {device} but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}); this check needs the "
            "GPU: run it on the GPU machine, or pass --device cpu for a CPU-only dry run"
        )
    check.ctx["device"] = device
    return {"device": device, "gpu": info.get("gpu")}


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
        + " (build the bundle: bash evals/gpu/bundle.sh, or pass --tokenizer DIR)"
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


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
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


def nvidia_smi() -> str | None:
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
