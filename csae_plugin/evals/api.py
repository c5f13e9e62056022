"""The Python API behind ``sae_bench``: run SAEBench's ``core`` and the plugin's ``nces`` on
SAEs, and read, tabulate and plot their results.

:func:`evaluate_saes` writes results in SAEBench's layout (``<output_dir>/<eval>/<release>_
<sae_id>_eval_results.json``), loads the model once, shared by every eval and SAE, and skips
finished SAEs unless ``force_rerun``; :func:`load_results` and :func:`plot_results` read any such
folders. ``csae_plugin.cli`` and ``csae_plugin.demo`` are front-ends over these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import csae_plugin  # noqa: F401  (registers the "causal" architecture with SAELens)
from csae_plugin import models
from csae_plugin._compat import no_progress_bars
from csae_plugin.evals import (
    RESULTS_SUFFIX,
    EvalInputError,
    pending_result,
    results_path,
    validate_inputs,
)
from csae_plugin.evals.nces.eval_config import EMBEDDED_DATASET, NCESEvalConfig
from csae_plugin.models import EMBEDDED_MODEL

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

EVALS = {
    "core": "SAEBench core: L0, explained variance, MSE, KL and CE loss scores of the SAE "
    "spliced into the model",
    "nces": "causal effect of each latent vs random directions shaped like it "
    "(nces_geomean, frac_verified, per-latent NCES)",
}
"""Evals :func:`evaluate_saes` knows, in the order they run, with one line each for
``sae_bench list``."""

SUMMARY_COLUMNS = (
    "l0",
    "explained_variance_centered",  # core.CENTERED_KEY: SAEBench's explained_variance is off
    "kl_div_score",
    "ce_loss_score",
    "nces_geomean",
    "frac_verified",
    "mean_effect_kl",
    "frac_dead",
)
"""Key metrics shown after ``sae_bench run`` and first in ``sae_bench compare``'s table.

Explained variance is the conventional one ``run_core`` adds (``csae_plugin.evals.core``),
labelled ``explained_variance_centered``; SAEBench's own stays in the full table (``--csv``)."""


def evaluate_saes(
    evals: Sequence[str],
    sae_specs: Sequence[str],
    *,
    model: HookedTransformer | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    eval_tokens: torch.Tensor | None = None,
    reference_tokens: torch.Tensor | None = None,
    output_dir: str | Path = "eval_results",
    device: str = "cpu",
    force_rerun: bool = False,
    nces_config: NCESEvalConfig | None = None,
    nces_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Run ``evals`` on each SAE of ``sae_specs``; return the summary table of their results.

    Cheap checks (eval names, output folder, SAEs) come first; the model (``model``, else
    ``models.load_model(model_name)``) and the tokens (``eval_tokens``/``reference_tokens``,
    else the held-out and training splits of ``dataset``) are loaded once, only if some
    result is missing, and every SAE is checked against them before any eval starts.
    ``model_kwargs`` go to the model loader (the SAEs' ``model_from_pretrained_kwargs``).
    """
    from csae_plugin.evals.tokens import eval_and_reference_tokens
    from csae_plugin.saes.loading import load_sae

    names = check_evals(evals)
    check_device(device)
    if nces_config is None:
        name = model_name or (model.cfg.model_name if model is not None else EMBEDDED_MODEL)
        nces_config = NCESEvalConfig(
            model_name=name, dataset=dataset or EMBEDDED_DATASET, **(nces_overrides or {})
        )
    out = writable_dir(output_dir, create=False)  # made by the first result written
    saes = [load_sae(spec, device=device) for spec in sae_specs]
    _check_unique([(release, sae_id) for _, release, sae_id in saes])
    if "nces" in names:
        for sae, release, sae_id in saes:
            _check_latents(nces_config, sae.cfg.d_sae, sae_name(release, sae_id))
    pending = []
    for sae, release, sae_id in saes:
        todo = [
            e for e in names if pending_result(out / e, release, sae_id, force_rerun, say=False)
        ]
        for skipped in (e for e in names if e not in todo):
            path = results_path(out / skipped, release, sae_id)
            wanted = _settings(skipped, nces_config, eval_tokens, reference_tokens)
            other = _other_settings(path, wanted)
            if other:  # said even without progress: the table shows an older result
                print(
                    f"[sae_bench] [{skipped}] {sae_name(release, sae_id)}: result exists, made "
                    f"with other settings ({other}), skipped; pass --force-rerun to redo it",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                _say(f"[{skipped}] {sae_name(release, sae_id)}: result exists, skipped", progress)
        if todo:
            pending.append((sae, release, sae_id, todo))
    if pending:
        if model is None:
            _say(f"loading model {nces_config.model_name} on {device}", progress)
            with contextlib.nullcontext() if progress else no_progress_bars():
                model = models.load_model(
                    nces_config.model_name,
                    device=device,
                    dtype=nces_config.llm_dtype,
                    **(model_kwargs or {}),
                )
        eval_tokens, reference_tokens = eval_and_reference_tokens(
            model, nces_config, eval_tokens, reference_tokens, progress=progress
        )
        for sae, *_ in pending:
            validate_inputs(model, sae, eval_tokens, reference_tokens)
        # the result files record the tokens actually used, not the config's defaults
        nces_config = dataclasses.replace(
            nces_config,
            context_size=int(eval_tokens.shape[1]),
            n_eval_sequences=int(eval_tokens.shape[0]),
            n_reference_sequences=int(reference_tokens.shape[0]),
        )
    for sae, release, sae_id, todo in pending:
        for name in todo:
            _say(f"[{name}] {sae_name(release, sae_id)}", progress)
            _run_one(
                name,
                nces_config,
                model,
                sae,
                release,
                sae_id,
                out,
                eval_tokens,
                reference_tokens,
                progress,
            )
    from csae_plugin.evals.nces import shards

    if not shards.is_main_process():
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))  # rank 0 reports
    table = load_results([out])
    wanted = [sae_name(release, sae_id) for _, release, sae_id in saes]
    table = table.loc[[name for name in wanted if name in table.index]]
    return table[[c for c in SUMMARY_COLUMNS if c in table.columns]]


def _run_one(
    eval_name: str,
    config: NCESEvalConfig,
    model: HookedTransformer,
    sae: Any,
    release: str,
    sae_id: str,
    out: Path,
    eval_tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    progress: bool,
) -> None:
    """One eval on one SAE, its result written under ``out/<eval>/``."""
    if eval_name == "nces":
        from csae_plugin.evals.nces.main import evaluate_and_save

        evaluate_and_save(
            config,
            model,
            sae,
            release,
            sae_id,
            out / "nces",
            eval_tokens,
            reference_tokens,
            force_rerun=True,
            progress=progress,
        )
    else:
        from csae_plugin.evals.core import core_config, run_core
        from csae_plugin.evals.nces import shards

        if not shards.is_main_process():  # under torchrun core is not split: rank 0 runs it
            shards.barrier()
            return
        core_cfg = core_config(
            config.model_name,
            config.dataset,
            eval_tokens.shape[1],
            eval_tokens.shape[0],
            batch_size_prompts=config.llm_batch_size,
        )
        run_core(
            model,
            sae,
            eval_tokens,
            release=release,
            sae_id=sae_id,
            output_path=out / "core",
            config=core_cfg,
            force_rerun=True,
            progress=progress,
        )
        shards.barrier()


def check_evals(evals: Sequence[str] | str) -> list[str]:
    """Eval names from a list or a comma-separated string, in ``EVALS`` order; unknown -> error."""
    items = [evals] if isinstance(evals, str) else list(evals)
    names = {part.strip() for item in items for part in item.split(",") if part.strip()}
    unknown = sorted(names - set(EVALS))
    if unknown or not names:
        raise EvalInputError(
            f"unknown eval {unknown[0] if unknown else ''!r}; choose from {', '.join(EVALS)}"
        )
    return [name for name in EVALS if name in names]


def check_device(device: str) -> str:
    """``device`` if torch can use it on this machine; a one-line error naming the fix
    otherwise (before any SAE or model is loaded onto it)."""
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalInputError(
            f"unknown device {device!r}; pass --device cpu, cuda or cuda:N"
        ) from None
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EvalInputError(
                f"device {device!r}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                "False); pass --device cpu"
            )
        if kind.index is not None and kind.index >= count:
            raise EvalInputError(
                f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}; pass one of those"
            )
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise EvalInputError(f"device {device!r}: MPS is not available here; pass --device cpu")
    return device


def writable_dir(path: str | Path, create: bool = True) -> Path:
    """``path`` created if needed and checked writable (one-line error otherwise). With
    ``create=False`` only checked: its nearest existing folder must be writable, and nothing
    is created (so a run that fails before writing leaves no empty folder behind)."""
    folder = Path(path).expanduser()
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise EvalInputError(
            f"output folder {str(folder)!r} can't be written ({err.strerror or err}); "
            "pass --output-dir with a writable path"
        ) from err
    return folder


def sae_name(release: str, sae_id: str) -> str:
    """How an SAE is named in tables: its folder name if local, else ``release/sae_id``."""
    return sae_id if release == "local" else f"{release}/{sae_id}"


def load_results(dirs: Sequence[str | Path], bad_files: list[str] | None = None) -> pd.DataFrame:
    """All result files under ``dirs``: one row per SAE, one column per flat metric.

    Rows are named by :func:`sae_name` (prefixed by the folder's name when the same SAE is
    found under several folders); key metrics (:data:`SUMMARY_COLUMNS`) come first. NCES
    metrics are the headline null's; each null run also gives ``<metric>_<null>`` columns.

    A result file that cannot be read raises :class:`EvalInputError`; given ``bad_files``, it
    is left out instead and described there (one line each). When two files hold the same
    eval of the same SAE, the later one (in path order) is used and a note on stderr says so.
    """
    rows: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], Path] = {}
    for label, path, result in _results(dirs, bad_files):
        kind = str(result.get("eval_type_id") or path.parent.name)
        if (label, kind) in seen:
            print(
                f"[sae_bench] note: two {kind} results for {label}: {str(seen[label, kind])!r} "
                f"and {str(path)!r}; showing the second",
                file=sys.stderr,
                flush=True,
            )
        seen[label, kind] = path
        row = rows.setdefault(label, {})
        for category, metrics in result.get("eval_result_metrics", {}).items():
            null = category.removeprefix("nces_") if category.startswith("nces_") else None
            if null is not None and metrics.get("null") is None:
                continue  # a null that was not run
            suffix = "" if null is None else f"_{null}"
            row.update(
                {
                    f"{k}{suffix}": v
                    for k, v in metrics.items()
                    if v is None or isinstance(v, (int, float, str))
                }
            )
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "sae"
    first = [c for c in SUMMARY_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def plot_results(
    table: pd.DataFrame, plots_dir: str | Path, eval_dirs: Sequence[str | Path]
) -> list[Path]:
    """Write ``nces_hist.png`` (per-latent NCES of each SAE, from the nces details under
    ``eval_dirs``) and ``l0_vs_ce_loss_score.png`` (coloured by nces_geomean); return paths."""
    import numpy as np
    from matplotlib.figure import Figure

    folder = writable_dir(plots_dir)
    written = []
    details = {
        label: [d.get("nces") for d in result.get("eval_result_details") or []]
        for label, _, result in _results(eval_dirs, [])
        if result.get("eval_type_id") == "nces"
    }
    if details:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        logs = {}
        for label, values in details.items():
            nces = np.array([v for v in values if v is not None], dtype=float)
            logs[label] = np.log10(nces[np.isfinite(nces) & (nces > 0)])
        pooled = np.concatenate([*logs.values(), [0.0]])
        n_bins = int(np.clip(np.sqrt(len(pooled)), 8, 30))  # shared bins, few when few latents
        bins = np.linspace(pooled.min() - 0.05, pooled.max() + 0.05, n_bins + 1)
        for label, values in logs.items():
            if len(values):
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=label)
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("log10 NCES per latent (0 = a random direction's effect)")
        ax.set_ylabel("latents")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title("NCES of each evaluated latent")
        ax.legend(fontsize="small")
        written.append(folder / "nces_hist.png")
        fig.savefig(written[-1], dpi=120)
    if {"l0", "ce_loss_score"} <= set(table.columns):
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        colour = (
            table["nces_geomean"] if "nces_geomean" in table else pd.Series(np.nan, table.index)
        )
        points = ax.scatter(
            table["l0"],
            table["ce_loss_score"],
            c=colour.astype(float),
            cmap="viridis",
            s=60,
            edgecolors="black",
            plotnonfinite=True,
        )
        for name, row in table.iterrows():
            ax.annotate(
                str(name),
                (row["l0"], row["ce_loss_score"]),
                fontsize="small",
                xytext=(4, 4),
                textcoords="offset points",
            )
        fig.colorbar(points, ax=ax, label="nces_geomean")
        ax.set_xlabel("L0 (core)")
        ax.set_ylabel("ce_loss_score (core)")
        ax.set_title("Sparsity vs faithfulness, coloured by causal verification")
        written.append(folder / "l0_vs_ce_loss_score.png")
        fig.savefig(written[-1], dpi=120)
    return written


def _results(
    dirs: Sequence[str | Path], bad_files: list[str] | None = None
) -> list[tuple[str, Path, dict[str, Any]]]:
    """(row label, path, parsed result) for every readable result file under ``dirs``; an
    unreadable one raises, or, with ``bad_files``, is described there and left out."""
    found = []
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise EvalInputError(f"results folder {str(folder)!r} does not exist")
        for path in sorted(folder.rglob(f"*{RESULTS_SUFFIX}")):
            try:
                result = json.loads(path.read_text())
                name = _check_result(result)
            except (ValueError, KeyError, TypeError) as err:
                detail = " ".join(f"{type(err).__name__}: {err}".split())[:160]
                problem = (
                    f"result file {str(path)!r} is corrupt ({detail}); delete it and rerun "
                    "with --force-rerun"
                )
                if bad_files is None:
                    raise EvalInputError(problem) from err
                bad_files.append(problem)
                continue
            found.append((folder, path, name, result))
    folders_per_name: dict[str, set[Path]] = {}
    for folder, _, name, _ in found:
        folders_per_name.setdefault(name, set()).add(folder)
    return [
        (name if len(folders_per_name[name]) == 1 else f"{folder.name}:{name}", path, result)
        for folder, path, name, result in found
    ]


def _check_result(result: Any) -> str:
    """The SAE name of a parsed result file; ``TypeError`` or ``KeyError`` if it is not one."""
    if not isinstance(result, dict):
        raise TypeError(f"a JSON {type(result).__name__}, not a result object")
    metrics = result.get("eval_result_metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
        raise TypeError("eval_result_metrics is not an object of metric groups")
    details = result.get("eval_result_details") or []
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
        raise TypeError("eval_result_details is not a list of objects")
    return sae_name(result["sae_lens_release_id"], result["sae_lens_id"])


_COUNTS = ("n_eval_sequences", "n_reference_sequences")
"""Recorded as used: at most as asked (a corpus may hold fewer)."""


def _settings(
    eval_name: str,
    config: NCESEvalConfig,
    eval_tokens: torch.Tensor | None,
    reference_tokens: torch.Tensor | None,
) -> dict[str, Any]:
    """The ``eval_config`` fields an ``eval_name`` result made now would record (as far as
    known before the tokens are loaded)."""
    wanted = dataclasses.asdict(config)
    if eval_tokens is not None:
        wanted |= {"context_size": eval_tokens.shape[1], "n_eval_sequences": eval_tokens.shape[0]}
    if reference_tokens is not None:
        wanted["n_reference_sequences"] = reference_tokens.shape[0]
    if eval_name == "core":
        return {key: wanted[key] for key in ("model_name", "dataset", "context_size")}
    return wanted


def _other_settings(path: Path, wanted: dict[str, Any]) -> str:
    """How the result at ``path`` was made with settings other than ``wanted``, as
    "field recorded (now asked)" items; "" when the same (or unreadable: compare says so)."""
    try:
        recorded = json.loads(path.read_text())["eval_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not isinstance(recorded, dict):
        return ""
    changed = []
    for key, value in wanted.items():
        new = json.loads(json.dumps(value, default=str))
        old = recorded.get(key, new)
        if old == new or (key in _COUNTS and isinstance(old, int) and old < new):
            continue
        changed.append(f"{key} {old!r}, now {new!r}")
    return "; ".join(changed)


def _check_unique(names: list[tuple[str, str]]) -> None:
    seen = set()
    for release, sae_id in names:
        file_name = results_path(".", release, sae_id).name
        if file_name in seen:
            raise EvalInputError(
                f"two SAEs would share the result file {file_name!r}; give their folders "
                "different names"
            )
        seen.add(file_name)


def _check_latents(config: NCESEvalConfig, d_sae: int, name: str) -> None:
    """A latent list the SAE cannot score (an index past ``d_sae``, one listed twice) is
    refused before the model loads."""
    from csae_plugin.evals.nces.selection import check_latents

    try:
        check_latents(config, d_sae)
    except EvalInputError as err:
        raise EvalInputError(f"SAE {name}: {err}") from None


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"[sae_bench] {message}", file=sys.stderr, flush=True)
