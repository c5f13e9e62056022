"""What the eval scripts share: where results go, the machine a result was measured on, JSON
result files, the model and tokens they run on, a data-initialised TopK SAE, and the clocks
that time training steps and peak memory.

Heavy libraries (SAELens, TransformerLens, psutil) are imported where they are used, so the GPU
check can set its offline environment before any of them loads.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_lens import TopKSAE
    from transformer_lens import HookedTransformer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "evals" / "results"
"""Where every eval script writes its results (the study's activation cache included:
``RESULTS / "study_cpu" / "cache"``, ignored by git)."""
MODEL = "gemma-3-270m"
HOOK = "blocks.6.hook_resid_post"
"""The hook every script reads on Gemma 3 270M: layer 6's residual stream."""
TINY_HOOK = "blocks.1.hook_resid_post"
"""The hook on :func:`tiny_setup`'s model."""


def machine(device: str | None = None) -> dict[str, Any]:
    """The machine a result was measured on, for the result file: platform, CPU, threads,
    library versions, GPU (None without CUDA), ``device`` and the load average (1, 5, 15 min)
    when the dict is made."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()),
    }
    if device is not None:
        info["device"] = device
    return info


def plain(value: object) -> object:
    """``value`` as strict JSON: numpy and torch scalars as Python numbers, arrays and tuples as lists,
    paths as strings, NaN as null, infinities as "inf" / "-inf" (an infinite ratio is a result,
    not a gap)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return plain(value.tolist())  # numpy arrays and tensors
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value: object) -> Path:
    """Write ``value`` (through :func:`plain`) as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(value), indent=2, default=str) + "\n")
    return path


def gemma_setup(
    device: str = "cpu", context_size: int = 128, seed: int = 0
) -> tuple[HookedTransformer, torch.Tensor, torch.Tensor, int]:
    """The embedded Gemma 3 270M and the embedded stdlib-documentation corpus split into
    training and held-out sequences of ``context_size`` tokens: (model, train, eval, BOS id)."""
    from csae_plugin.data import corpus_splits
    from csae_plugin.models import load_model

    model = load_model(MODEL, device=device)
    splits = corpus_splits(model.tokenizer, context_size, seed=seed)
    return model, splits.train, splits.eval, model.tokenizer.bos_token_id


def tiny_setup(
    context_size: int, rows: int = 256, eval_rows: int = 128
) -> tuple[HookedTransformer, torch.Tensor, torch.Tensor, int]:
    """A 3-layer random model and random tokens (BOS = 0 first), ``rows`` sequences of which
    the last ``eval_rows`` are held out: a seconds-long smoke run."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_vocab=512,
        n_ctx=max(context_size, 32),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.d_vocab, (rows, context_size), generator=gen)
    tokens[:, 0] = 0
    return model, tokens[:-eval_rows], tokens[-eval_rows:], 0


def data_initialised_topk(
    model: HookedTransformer,
    hook: str,
    tokens: torch.Tensor,
    d_sae: int,
    k: int,
    seed: int = 0,
) -> TopKSAE:
    """A SAELens TopK SAE initialised from data, not trained: each decoder row is an activation
    of ``tokens`` (BOS positions left out) minus the mean activation, normalised; the encoder is
    its transpose and ``b_dec`` the mean. Every token then fires its k best-matching latents, so
    latents fire on realistic subsets of tokens: for measuring speed, not SAE quality."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    acts = []
    with torch.no_grad():
        for batch in tokens.to(model.cfg.device).split(8):
            model.run_with_hooks(
                batch,
                return_type=None,
                fwd_hooks=[(hook, lambda act, hook: acts.append(act.detach()))],
            )
    x = torch.cat(acts)
    x = x.reshape(x.shape[0], x.shape[1], -1)[:, 1:].reshape(-1, x[0].numel() // x.shape[1])
    if x.shape[0] < d_sae:
        raise ValueError(
            f"need at least d_sae={d_sae} tokens to initialise the SAE, got {x.shape[0]}"
        )
    mean = x.mean(0)
    gen = torch.Generator().manual_seed(seed)
    rows = x[torch.randperm(x.shape[0], generator=gen)[:d_sae]] - mean
    w_dec = rows / rows.norm(dim=1, keepdim=True)
    cfg = TopKSAEConfig(
        d_in=x.shape[1],
        d_sae=d_sae,
        k=k,
        device=str(model.cfg.device),
        metadata=SAEMetadata(hook_name=hook),
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean)
    return sae


class StepClock:
    """Times SAELens's training steps: first step's start to last step's end, their count, and
    each step's seconds (``durations``: a one-off cost in the first step shows there)."""

    def __enter__(self) -> StepClock:
        from sae_lens.training.sae_trainer import SAETrainer

        self.first: float | None = None
        self.last = 0.0
        self.steps = 0
        self.durations: list[float] = []
        self._trainer = SAETrainer
        self._original = SAETrainer._train_step
        clock = self

        def timed(trainer: SAETrainer, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if clock.first is None:
                clock.first = start
            out = clock._original(trainer, *args, **kwargs)
            clock.last = time.perf_counter()
            clock.durations.append(clock.last - start)
            clock.steps += 1
            return out

        SAETrainer._train_step = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._trainer._train_step = self._original  # type: ignore[method-assign]

    @property
    def seconds(self) -> float:
        return self.last - (self.first or self.last)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak_bytes = 0

    def __enter__(self) -> PeakRSS:
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.peak_bytes = self.peak - self.base
