"""One-shot GPU check: the whole plugin on CUDA, its numbers against the CPU, and its speed.

On one GPU, in under 8 minutes, this script

1. builds a model of the exact Gemma 3 270M architecture (``--model random-gemma3-arch``, the
   default: seeded random weights, the real tokenizer; the real weights exceed what can be
   sent to the GPU machine) or loads the embedded real one (``--model embedded``)
   (``stages_setup``);
2. trains a causal SAE (KL and causal-verification terms on) and a TopK SAE through the
   runner on the device (``stages_run``);
3. runs ``sae_bench run --eval core,nces --device <device>`` on both (the real command line, as
   ``python -m csae_plugin.cli``, on a local Hugging Face folder of the model) (``stages_run``);
4. reruns NCES on a few of the same latents on the CPU (same SAE, tokens and reference
   statistics) and checks that the per-latent effects agree (float32, relative 1e-3)
   (``stages_engine``);
5. times the NCES engine at the bench settings (``evals/benchmarks/nces.py``: 4 sequences x 64
   tokens, 4 null draws) for two copy batch sizes, and on a 16,384-latent SAE, projecting the
   time for all its latents, with peak GPU memory (``stages_engine``);
6. reruns the causal SAE's NCES with ``--llm-dtype bfloat16`` against float32 (reported, not
   gating) (``stages_run``).

Every stage's result (or error) goes into one JSON file, rewritten atomically after each stage
(``runner``), so a run cut short still leaves what it finished. Exit code 0 = PASS, 1 = FAIL,
2 = unusable setup (e.g. ``--device cuda`` without CUDA).

    python -m evals.gpu.check                        # on the GPU (evals/gpu/README.md)
    python -m evals.gpu.check --device cpu --quick   # the whole flow at toy scale, on a CPU
"""

from __future__ import annotations

import os

# no machine this runs on reaches a model hub: fail fast instead of retrying requests (set
# before anything imports the hub's libraries; the stages import them when they run)
for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("WANDB_MODE", "disabled"),
):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from evals.common import RESULTS, plain  # noqa: E402
from evals.gpu.runner import QUICK, Check, Scale, SetupError  # noqa: E402
from evals.gpu.stages_engine import stage_agreement, stage_timing  # noqa: E402
from evals.gpu.stages_run import stage_bfloat16, stage_cli, stage_train  # noqa: E402
from evals.gpu.stages_setup import stage_environment, stage_imports, stage_model  # noqa: E402


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
    print(json.dumps(plain(check.result), indent=2, default=str))
    check.log(f"{check.result['status']}; results in {check.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
