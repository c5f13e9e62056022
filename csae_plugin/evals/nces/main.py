"""Run the NCES eval on SAEs and write SAEBench-format results.

:func:`evaluate_sae` scores one SAE on given tokens (no files); :func:`run_eval` is SAEBench's
contract: for each selected SAE, write ``<output_path>/<release>_<sae_id>_eval_results.json``
unless it already exists. Results are written atomically, so the SAE is the resume unit: an
interrupted run leaves the finished SAEs' files and no partial one, and a rerun skips them.

Evaluation sequences come from the corpus's held-out split (``data.corpus_splits(...).eval``),
reference sequences (null covariance, mean/resample/steer values) from its training split.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_lens_version
from sae_lens import SAE
from transformer_lens import HookedTransformer

from csae_plugin import models
from csae_plugin.causal import LatentEffects, latent_effects, reference_stats
from csae_plugin.causal.engine import estimate_seconds
from csae_plugin.causal.nces import effects_details, nces_metrics, null_view
from csae_plugin.causal.screen import SCREEN_INTERVENTIONS, nces_screen
from csae_plugin.data import corpus_splits
from csae_plugin.evals import (
    EvalInputError,
    add_config_arguments,
    config_from_args,
    json_safe,
    results_path,
    sae_bench_version,
    validate_inputs,
    write_json_atomic,
)
from csae_plugin.evals.nces import shards
from csae_plugin.evals.nces.eval_config import EMBEDDED_DATASET, NCESEvalConfig
from csae_plugin.evals.nces.eval_output import (
    NCESEvalOutput,
    NCESLatentDetail,
    NCESMetricCategories,
    NCESMetrics,
)
from csae_plugin.saes.loading import load_sae, load_sae_from_folder

CUSTOM_SAE_ID = "custom_sae"
"""SAEBench's ``sae_id`` for an SAE passed in as an object (its result file name)."""


AUTO_ALL_MAX = 512
"""``latents='auto'`` scores every latent up to this many, else ``screen:AUTO_SCREENED``."""

AUTO_SCREENED = 256


def select_latents(latents: str | int | list[int], d_sae: int, seed: int) -> np.ndarray:
    """The latent indices to evaluate: all, a seeded random subset of a count, or a list (each
    index once, below ``d_sae``; a one-line error otherwise)."""
    if latents == "all":
        return np.arange(d_sae)
    if isinstance(latents, int):
        if latents >= d_sae:
            return np.arange(d_sae)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(d_sae, size=latents, replace=False))
    ids = np.asarray(latents, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= d_sae:
        raise EvalInputError(
            f"latent index {int(ids.max())} out of range: the SAE has d_sae={d_sae} latents; "
            f"pass indices from 0 to {d_sae - 1}"
        )
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = int(np.argmax(counts > 1))
        raise EvalInputError(
            f"latent {int(values[repeated])} is listed {int(counts[repeated])} times in "
            "latents; list each latent once"
        )
    return ids


def resolve_latents(latents: str | int | list[int], d_sae: int) -> str | int | list[int]:
    """``'auto'`` made concrete for an SAE of ``d_sae`` latents; anything else unchanged."""
    if latents != "auto":
        return latents
    return "all" if d_sae <= AUTO_ALL_MAX else f"screen:{AUTO_SCREENED}"


def stratified_by_screen(scores: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` latents, one drawn uniformly from each of ``n`` equal strata of the latents
    ordered by ``scores`` (NaN, never fired on the screened tokens, last): every latent has
    the same chance n / d_sae, so per-SAE fractions over the sample stay unbiased, and the
    sample spans the screen's range."""
    d_sae = len(scores)
    if n >= d_sae:
        return np.arange(d_sae)
    order = np.argsort(np.where(np.isnan(scores), np.inf, scores), kind="stable")
    rng = np.random.default_rng(seed)
    return np.sort([rng.choice(stratum) for stratum in np.array_split(order, n)])


def load_tokens(
    model: HookedTransformer, config: NCESEvalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(evaluation, reference) token rows for ``config`` from the model's tokenizer.

    Evaluation: the first ``n_eval_sequences`` of the held-out split; reference: the first
    ``n_reference_sequences`` of the training split (both splits are already shuffled).
    """
    if model.tokenizer is None:
        raise EvalInputError(
            f"model {model.cfg.model_name} has no tokenizer; pass eval_tokens and "
            "reference_tokens as token tensors"
        )
    dataset = None if config.dataset == EMBEDDED_DATASET else config.dataset
    splits = corpus_splits(model.tokenizer, config.context_size, dataset=dataset)
    return splits.eval[: config.n_eval_sequences], splits.train[: config.n_reference_sequences]


def evaluate_sae(
    model: HookedTransformer,
    sae: SAE,
    eval_tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    config: NCESEvalConfig,
    progress: bool = True,
    *,
    bos_token_id: int | None = None,
    work_dir: str | Path | None = None,
) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """NCES of ``sae``'s latents: flat metrics (``NCESMetrics`` fields) and per-latent details.

    The metrics are the first null's; ``details.attrs["metrics_by_null"]`` holds each null's.

    ``bos_token_id`` defaults to the model tokenizer's; a BOS at position 0 is never
    intervened on nor scored. Token rows longer than ``config.context_size`` are cut to it
    (their first ``context_size`` tokens), so the same tokens can serve core and a cheaper NCES.

    Latents run in chunks of ``config.latents_per_chunk`` (:mod:`.shards`): with ``work_dir``
    each finished chunk is kept there, so a rerun resumes, and under torch.distributed the
    chunks are shared among the ranks; only rank 0 gets the result (the others ``None``).
    """
    eval_tokens = eval_tokens[:, : config.context_size]
    d_sae = sae.cfg.d_sae
    spec = resolve_latents(config.latents, d_sae)
    with torch.no_grad():
        stats = reference_stats(
            model,
            sae,
            reference_tokens,
            batch_size=config.llm_batch_size,
            seed=config.random_seed,
            bos_token_id=bos_token_id,
            progress=progress,
        )
    screen = None
    if isinstance(spec, str) and spec.startswith("screen:"):
        screen = nces_screen(
            model,
            sae,
            eval_tokens[: config.screen_sequences],
            stats,
            intervention=config.intervention
            if config.intervention in SCREEN_INTERVENTIONS
            else "zero",
            null=config.engine_nulls[0],
            samples=config.screen_samples,
            alpha=config.steer_alpha,
            seed=config.random_seed,
            bos_token_id=bos_token_id,
            progress=progress,
        )
        latents = stratified_by_screen(screen.nces, int(spec.split(":")[1]), config.random_seed)
        how = f"drawn across the screen's range ({spec}; the screen scored all {d_sae})"
    else:
        latents = select_latents(spec, d_sae, config.random_seed)
        how = "all" if spec == "all" else "as asked"
    if progress:
        seconds = (
            estimate_seconds(
                model,
                sae,
                eval_tokens,
                len(latents),
                config.seqs_per_latent,
                1 + len(config.engine_nulls) * config.null_draws,
                config.copy_batch_size,
                bos_token_id,
            )
            / shards.rank_and_world()[1]
        )
        print(
            f"[nces] scoring {len(latents)} of {d_sae} latents exactly ({how}); "
            f"estimated at most {seconds / 60:.1f} min here",
            flush=True,
        )
    with torch.no_grad():
        key = shards.fingerprint(
            asdict(config),
            sae.cfg.to_dict(),
            sae.state_dict(),  # every parameter and buffer
            eval_tokens,
            reference_tokens,
            model.cfg.model_name,
            latents.tolist(),
            bos_token_id,
        )

        def compute(ids: np.ndarray) -> LatentEffects:
            return latent_effects(
                model,
                sae,
                eval_tokens,
                ids,
                stats,
                intervention=config.intervention,
                null_draws=config.null_draws,
                seqs_per_latent=config.seqs_per_latent,
                alpha=config.steer_alpha,
                batch_size=config.copy_batch_size,
                seed=config.random_seed,
                bos_token_id=bos_token_id,
                progress=progress and len(ids) == len(latents),
                null=config.engine_nulls,
                memory_budget_bytes=(
                    None if config.memory_budget_mb is None else config.memory_budget_mb * 2**20
                ),
            )

        effects = shards.chunked_effects(
            compute, latents, work_dir, key, config.latents_per_chunk, progress
        )
    if effects is None:
        return None  # another rank than 0: rank 0 merges and reports
    # the result names each null as asked (0.2.0's 'matched' is drawn as 'matched_eigen')
    effects = replace(effects, nulls=config.nulls)
    details = effects_details(
        effects,
        definition=config.nces_definition,
        fdr_level=config.fdr_level,
        n_resamples=config.n_bootstrap,
        seed=config.random_seed,
    )
    weights = stats.mean_act.cpu().numpy()
    shared = {
        "intervention": config.intervention,
        "null_draws": config.null_draws,
        "nces_definition": config.nces_definition,
    }
    by_null = {
        null: nces_metrics(
            null_view(details, null),
            weights,
            n_resamples=config.n_bootstrap,
            seed=config.random_seed,
        )
        | shared
        | {"null": null}
        for null in config.nulls
    }
    details.attrs["metrics_by_null"] = by_null
    if screen is not None:
        details.attrs["screen"] = screen.as_dict()
    return dict(by_null[config.nulls[0]]), details


def eval_output(
    config: NCESEvalConfig,
    sae: SAE,
    release: str,
    sae_id: str,
    metrics: dict[str, Any],
    details: pd.DataFrame,
    eval_id: str | None = None,
) -> NCESEvalOutput:
    """The SAEBench output object for one SAE (NaN and inf become ``None``)."""
    return NCESEvalOutput(
        eval_config=config,
        eval_id=eval_id or get_eval_uuid(),
        datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=NCESMetricCategories(
            nces=NCESMetrics(**json_safe(metrics)),
            **{
                f"nces_{null}": NCESMetrics(**json_safe(values))
                for null, values in details.attrs.get("metrics_by_null", {}).items()
            },
        ),
        eval_result_details=[
            NCESLatentDetail(**row) for row in json_safe(details.to_dict("records"))
        ],
        eval_result_unstructured=(
            {"screen": json_safe(details.attrs["screen"])} if "screen" in details.attrs else None
        ),
        sae_bench_commit_hash=sae_bench_version(),
        sae_lens_id=sae_id,
        sae_lens_release_id=release,
        sae_lens_version=get_sae_lens_version(),
        sae_cfg_dict=sae.cfg.to_dict(),
    )


def evaluate_and_save(
    config: NCESEvalConfig,
    model: HookedTransformer,
    sae: SAE,
    release: str,
    sae_id: str,
    output_path: str | Path,
    eval_tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    *,
    force_rerun: bool = False,
    progress: bool = True,
    bos_token_id: int | None = None,
    eval_id: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate one SAE and write its result file; ``None`` if it exists and not forced."""
    path = results_path(output_path, release, sae_id)
    if path.exists() and not force_rerun:
        print(f"Skipping {release}_{sae_id} as results already exist")
        return None
    validate_inputs(model, sae, eval_tokens, reference_tokens)
    work_dir = path.with_name(f".{path.stem}.chunks")
    with shards.exclusive(work_dir):  # a second run on this result refuses
        scored = evaluate_sae(
            model,
            sae,
            eval_tokens,
            reference_tokens,
            config,
            progress and shards.is_main_process(),
            bos_token_id=bos_token_id,
            work_dir=work_dir,
        )
        if scored is None:  # not rank 0
            shards.barrier()
            return None
        metrics, details = scored
        result = asdict(eval_output(config, sae, release, sae_id, metrics, details, eval_id))
        write_json_atomic(path, result)
        shards.remove_chunks(work_dir)  # only now: an interrupt before keeps them
    shards.barrier()  # every rank sees the result before moving on
    return result


def run_eval(
    config: NCESEvalConfig,
    selected_saes: list[tuple[str, str | SAE]],
    device: str,
    output_path: str,
    force_rerun: bool = False,
    model: HookedTransformer | None = None,
    eval_tokens: torch.Tensor | None = None,
    reference_tokens: torch.Tensor | None = None,
) -> dict[str, dict[str, Any]]:
    """SAEBench's eval contract: evaluate each SAE, write its result, return them by name.

    ``selected_saes`` holds ``(release, sae_id)`` pairs (a SAELens release, or any release
    name with a saved SAE folder as the id) or ``(name, SAE)`` pairs (saved as
    ``<name>_custom_sae``, as SAEBench does). The model is loaded from ``config.model_name``
    and the tokens from ``config.dataset`` only when not passed in, and only if some SAE
    has no result yet.
    """
    Path(output_path).mkdir(parents=True, exist_ok=True)
    todo = []
    for release, sae_or_id in selected_saes:
        sae_id = _sae_id(sae_or_id)
        if results_path(output_path, release, sae_id).exists() and not force_rerun:
            print(f"Skipping {release}_{sae_id} as results already exist")
            continue
        todo.append((release, sae_id, sae_or_id))
    if not todo:
        return {}
    if model is None:
        model = models.load_model(config.model_name, device=device, dtype=config.llm_dtype)
    if eval_tokens is None or reference_tokens is None:
        loaded_eval, loaded_reference = load_tokens(model, config)
        eval_tokens = loaded_eval if eval_tokens is None else eval_tokens
        reference_tokens = loaded_reference if reference_tokens is None else reference_tokens
    eval_id = get_eval_uuid()
    results = {}
    for release, sae_id, sae_or_id in todo:
        sae = _load(release, sae_or_id, model.cfg.device)
        result = evaluate_and_save(
            config,
            model,
            sae,
            release,
            sae_id,
            output_path,
            eval_tokens,
            reference_tokens,
            force_rerun=True,
            eval_id=eval_id,
        )
        results[f"{release}_{sae_id}"] = result
    return results


def _sae_id(sae_or_id: str | SAE) -> str:
    """The ``sae_id`` naming the result: SAEBench's for objects, the folder name for folders."""
    if isinstance(sae_or_id, SAE):
        return CUSTOM_SAE_ID
    folder = Path(sae_or_id).expanduser()
    return folder.resolve().name if folder.is_dir() else sae_or_id


def _load(release: str, sae_or_id: str | SAE, device: str) -> SAE:
    if isinstance(sae_or_id, SAE):
        return sae_or_id.to(device)
    folder = Path(sae_or_id).expanduser()
    if folder.is_dir():
        return load_sae_from_folder(folder, device=device)
    return load_sae(f"{release}:{sae_or_id}", device=device)[0]


def arg_parser() -> argparse.ArgumentParser:
    """SAEBench's eval CLI contract, nothing more: its common arguments (SAEs by SAELens regex,
    output folder, force rerun) and one flag per config field, so SAEBench's
    ``validate_eval_cli_interface(arg_parser(), NCESEvalConfig)`` passes. The command line
    (:func:`cli_arg_parser`) adds two arguments that set no result."""
    parser = argparse.ArgumentParser(description="Run the NCES causal-effect evaluation")
    _add_contract_arguments(parser)
    return parser


RUNTIME_ARGUMENTS = ("sae_paths", "device")
"""What ``python -m csae_plugin.evals.nces.main`` takes beyond SAEBench's contract: which SAEs
(saved folders, beside the regex) and where to run; neither is recorded in the result."""


def cli_arg_parser() -> argparse.ArgumentParser:
    """:func:`arg_parser` and :data:`RUNTIME_ARGUMENTS`: the parser of ``python -m``."""
    parser = argparse.ArgumentParser(description="Run the NCES causal-effect evaluation")
    _add_contract_arguments(parser)
    parser.add_argument("--sae_paths", "--sae", nargs="+", default=[], help="Saved SAE folders")
    parser.add_argument("--device", default=None, help="Device (default: cuda if available)")
    return parser


def _add_contract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sae_regex_pattern",
        "--sae-regex-pattern",
        help="Regex pattern for SAELens release names (with --sae_block_pattern)",
    )
    parser.add_argument(
        "--sae_block_pattern", "--sae-block-pattern", help="Regex pattern for SAELens SAE ids"
    )
    parser.add_argument(
        "--output_folder", "--output-dir", default="eval_results/nces", help="Output folder"
    )
    parser.add_argument(
        "--force_rerun", "--force-rerun", action="store_true", help="Force rerun of experiments"
    )
    add_config_arguments(parser, NCESEvalConfig)


if __name__ == "__main__":
    """
    python -m csae_plugin.evals.nces.main --sae_paths path/to/sae_folder \
        --model_name gemma-3-270m --latents 64 --null_draws 8
    """
    from sae_bench.sae_bench_utils.general_utils import setup_environment
    from sae_bench.sae_bench_utils.sae_selection_utils import get_saes_from_regex

    args = cli_arg_parser().parse_args()
    device = shards.init_from_env(args.device or setup_environment())
    config = config_from_args(NCESEvalConfig, args)
    selected: list[tuple[str, str | SAE]] = [("local", path) for path in args.sae_paths]
    if args.sae_regex_pattern:
        selected += get_saes_from_regex(args.sae_regex_pattern, args.sae_block_pattern or ".*")
    start_time = time.time()
    run_eval(config, selected, device, args.output_folder, args.force_rerun)
    print(f"Finished evaluation in {time.time() - start_time:.1f} seconds")
