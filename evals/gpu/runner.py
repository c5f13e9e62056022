"""The GPU check's runner: its scale (full or quick), the stage runner that keeps the result
dict and rewrites the JSON file after every stage, and the errors that set the exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evals.common import HOOK, plain


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
            "check": "csae-plugin GPU check (evals/gpu/check.py)",
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
        text = json.dumps(plain(self.result), indent=2, default=str, allow_nan=False)
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
                    entry["gpu_peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
            self.write()
            self.log(f"stage {name}: {entry['status']} in {entry['seconds']:.1f} s")
        return entry["status"] == "ok"

    def need(self, *keys: str) -> list[Any]:
        missing = [key for key in keys if key not in self.ctx]
        if missing:
            raise Skipped(f"needs {', '.join(missing)} from an earlier stage that failed")
        return [self.ctx[key] for key in keys]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)
