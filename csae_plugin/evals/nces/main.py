"""Run the NCES eval on SAEs and write SAEBench-format results.

:func:`evaluate_sae` scores one SAE on given tokens (no files); :func:`run_eval` is SAEBench's
contract: for each selected SAE, write ``<output_path>/<release>_<sae_id>_eval_results.json``
unless it already exists. Results are written atomically, so the SAE is the resume unit: an
interrupted run leaves the finished SAEs' files and no partial one, and a rerun skips them.
Which latents are scored: :mod:`.selection`; the tokens: :mod:`csae_plugin.evals.tokens`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sae_bench.sae_bench_utils import get_eval_uuid
from sae_lens import SAE
from transformer_lens import HookedTransformer

from csae_plugin import models
from csae_plugin.causal import LatentEffects, ReferenceStats, latent_effects, reference_stats
from csae_plugin.causal.adaptive import (
    adaptive_details,
    continues,
    merge_rounds,
    round1_p_values,
    subset,
)
from csae_plugin.causal.engine import estimate_seconds
from csae_plugin.causal.interventions import decoder_directions, neuron_concentrated
from csae_plugin.causal.nces import effects_details
from csae_plugin.evals import config_from_args, pending_result, validate_inputs, write_json_atomic
from csae_plugin.evals.nces import shards
from csae_plugin.evals.nces.arguments import (
    CUSTOM_SAE_ID,
    RUNTIME_ARGUMENTS,
    arg_parser,
    cli_arg_parser,
    load_selected,
    sae_id_of,
    selected_saes,
)
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.nces.result import NCESResult, eval_output
from csae_plugin.evals.nces.selection import (
    AUTO_ALL_MAX,
    AUTO_SCREENED,
    choose_latents,
    resolve_latents,
    select_latents,
    stratified_by_screen,
)
from csae_plugin.evals.tokens import eval_and_reference_tokens, load_tokens

__all__ = [  # with the names that moved out, still importable from here
    "AUTO_ALL_MAX",
    "AUTO_SCREENED",
    "CUSTOM_SAE_ID",
    "NCESResult",
    "RUNTIME_ARGUMENTS",
    "arg_parser",
    "cli_arg_parser",
    "eval_output",
    "evaluate_and_save",
    "evaluate_sae",
    "load_tokens",
    "resolve_latents",
    "run_eval",
    "select_latents",
    "stratified_by_screen",
]


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
) -> NCESResult | None:
    """NCES of ``sae``'s latents (:class:`~csae_plugin.evals.nces.result.NCESResult`: per-latent
    details and each null's flat metrics), on the latents ``config.latents`` picks
    (:mod:`.selection`).

    ``bos_token_id`` defaults to the model tokenizer's; a BOS at position 0 is never
    intervened on nor scored. Token rows longer than ``config.context_size`` are cut to it
    (their first ``context_size`` tokens), so the same tokens can serve core and a cheaper NCES.

    Latents run in chunks of ``config.latents_per_chunk`` (:mod:`.shards`): with ``work_dir``
    each finished chunk is kept there, so a rerun resumes, and under torch.distributed the
    chunks are shared among the ranks; only rank 0 gets the result (the others ``None``).
    """
    eval_tokens = eval_tokens[:, : config.context_size]
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
    chosen = choose_latents(
        model, sae, eval_tokens, stats, config, bos_token_id=bos_token_id, progress=progress
    )
    latents = chosen.latents
    if progress:
        seconds = estimate_seconds(
            model,
            sae,
            eval_tokens,
            len(latents),
            config.seqs_per_latent,
            1 + len(config.engine_nulls) * config.null_draws,
            config.copy_batch_size,
            bos_token_id,
        )
        print(
            f"[nces] scoring {len(latents)} of {sae.cfg.d_sae} latents exactly ({chosen.how}); "
            f"estimated at most {seconds / shards.rank_and_world()[1] / 60:.1f} min here",
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
        budget = None if config.memory_budget_mb is None else config.memory_budget_mb * 2**20

        def compute(
            ids: np.ndarray,
            seqs: int = config.seqs_per_latent,
            draws: int = config.null_draws,
            **second_round: int | bool,
        ) -> LatentEffects:
            return latent_effects(
                model,
                sae,
                eval_tokens,
                ids,
                stats,
                intervention=config.intervention,
                null_draws=draws,
                seqs_per_latent=seqs,
                alpha=config.steer_alpha,
                batch_size=config.copy_batch_size,
                seed=config.random_seed,
                bos_token_id=bos_token_id,
                progress=progress and len(ids) == len(latents),
                null=config.engine_nulls,
                memory_budget_bytes=budget,
                **second_round,
            )

        effects = shards.chunked_effects(
            compute, latents, work_dir, key, config.latents_per_chunk, progress
        )
        # the result names each null as asked (0.2.0's 'matched' is drawn as 'matched_eigen')
        effects = None if effects is None else replace(effects, nulls=config.nulls)
        detail_options = dict(
            definition=config.nces_definition,
            fdr_level=config.fdr_level,
            n_resamples=config.n_bootstrap,
            seed=config.random_seed,
        )
        round1 = None if effects is None else effects_details(effects, **detail_options)
        if round1 is not None:
            round1["n_null_draws"] = config.null_draws
            if "matched" in config.engine_nulls:
                round1["neuron_null"] = neuron_nulls(sae, stats, round1["latent"].to_numpy())
        if config.adaptive:
            final = _second_round(
                config, compute, latents, effects, round1, work_dir, key, progress
            )
    if effects is None:
        return None  # another rank than 0: rank 0 merges and reports
    if not config.adaptive:
        return NCESResult.from_details(
            round1, stats.mean_act.cpu().numpy(), config, _screen(chosen)
        )
    details = adaptive_details(round1, final, **detail_options)
    if "neuron_null" in round1:
        by_latent = round1.set_index("latent")["neuron_null"]
        details["neuron_null"] = by_latent.reindex(details["latent"]).to_numpy()
    return NCESResult.from_details(
        details, stats.mean_act.cpu().numpy(), config, _screen(chosen), round1=round1
    )


def neuron_nulls(sae: SAE, stats: ReferenceStats, latents: np.ndarray) -> np.ndarray:
    """Per latent, whether the ``matched`` null permutes its coordinates (bool array)."""
    directions = decoder_directions(sae, torch.as_tensor(latents, dtype=torch.long)).detach()
    return np.array([neuron_concentrated(stats, d) for d in directions], dtype=bool)


def _screen(chosen) -> dict[str, Any] | None:
    return None if chosen.screen is None else chosen.screen.as_dict()


def _second_round(
    config: NCESEvalConfig,
    compute: Callable[..., LatentEffects],
    latents: np.ndarray,
    effects: LatentEffects | None,
    round1: pd.DataFrame | None,
    work_dir: str | Path | None,
    key: str,
    progress: bool,
) -> LatentEffects | None:
    """The adaptive second round (:mod:`csae_plugin.causal.adaptive`): the latents round 1
    leaves undecided, scored up to ``adaptive_seqs_per_latent`` x ``adaptive_null_draws`` in
    all (``None`` on ranks other than 0). Its two parts, the next sequences (own copy and
    round 1's draws) and the new draws on all sequences, are chunked and resumable like
    round 1, in folders of ``work_dir``."""
    keep = None
    if effects is not None:
        keep = continues(round1_p_values(round1, config.nulls), config.adaptive_futility)
    keep = shards.broadcast(keep)  # rank 0's round 1 decides for every rank
    ids = latents[keep]
    s1, k1 = config.seqs_per_latent, config.null_draws
    s2, k2 = config.adaptive_seqs_per_latent, config.adaptive_null_draws
    parts = {
        "round2_sequences": (s2 > s1, dict(seqs=s2 - s1, first_sequence=s1)),
        "round2_draws": (k2 > k1, dict(seqs=s2, draws=k2 - k1, draw_round=1, real=False)),
    }
    done = {}
    for name, (needed, kwargs) in parts.items():
        if not needed or not len(ids):
            done[name] = None
            continue
        if progress:
            print(f"[nces] second round for {len(ids)} undecided latents: {name}", flush=True)
        folder = None if work_dir is None else Path(work_dir) / name
        part = shards.chunked_effects(
            functools.partial(compute, **kwargs),
            ids,
            folder,
            shards.fingerprint(key, name, ids.tolist(), s2, k2),
            config.latents_per_chunk,
            progress,
        )
        done[name] = None if part is None else replace(part, nulls=config.nulls)
    if effects is None:
        return None
    return merge_rounds(subset(effects, keep), done["round2_sequences"], done["round2_draws"])


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
    path = pending_result(output_path, release, sae_id, force_rerun)
    if path is None:
        return None
    validate_inputs(model, sae, eval_tokens, reference_tokens)
    work_dir = path.with_name(f".{path.stem}.chunks")
    with shards.exclusive(work_dir):  # a second run on this result refuses
        result = evaluate_sae(
            model,
            sae,
            eval_tokens,
            reference_tokens,
            config,
            progress and shards.is_main_process(),
            bos_token_id=bos_token_id,
            work_dir=work_dir,
        )
        if result is None:  # not rank 0
            shards.barrier()
            return None
        written = asdict(eval_output(config, sae, release, sae_id, result, eval_id))
        write_json_atomic(path, written)
        shards.remove_chunks(work_dir)  # only now: an interrupt before keeps them
    shards.barrier()  # every rank sees the result before moving on
    return written


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
    todo = [
        (release, sae_id_of(sae_or_id), sae_or_id)
        for release, sae_or_id in selected_saes
        if pending_result(output_path, release, sae_id_of(sae_or_id), force_rerun) is not None
    ]
    if not todo:
        return {}
    if model is None:
        model = models.load_model(config.model_name, device=device, dtype=config.llm_dtype)
    eval_tokens, reference_tokens = eval_and_reference_tokens(
        model, config, eval_tokens, reference_tokens
    )
    eval_id = get_eval_uuid()
    return {
        f"{release}_{sae_id}": evaluate_and_save(
            config,
            model,
            load_selected(release, sae_or_id, model.cfg.device),
            release,
            sae_id,
            output_path,
            eval_tokens,
            reference_tokens,
            force_rerun=True,
            eval_id=eval_id,
        )
        for release, sae_id, sae_or_id in todo
    }


if __name__ == "__main__":
    """
    python -m csae_plugin.evals.nces.main --sae_paths path/to/sae_folder \
        --model_name gemma-3-270m --latents 64 --null_draws 8
    """
    from sae_bench.sae_bench_utils.general_utils import setup_environment

    args = cli_arg_parser().parse_args()
    device = shards.init_from_env(args.device or setup_environment())
    config = config_from_args(NCESEvalConfig, args)
    start_time = time.time()
    run_eval(config, selected_saes(args), device, args.output_folder, args.force_rerun)
    print(f"Finished evaluation in {time.time() - start_time:.1f} seconds")
