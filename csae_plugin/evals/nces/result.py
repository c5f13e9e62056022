"""One SAE's NCES result in memory (:class:`NCESResult`) and as SAEBench's output object
(:func:`eval_output`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_lens_version
from sae_lens import SAE

from csae_plugin.causal.adaptive import copies_per_latent
from csae_plugin.causal.nces import nces_metrics, null_view, verified_fractions
from csae_plugin.evals import json_safe, sae_bench_version
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.evals.nces.eval_output import (
    NCESEvalOutput,
    NCESLatentDetail,
    NCESMetricCategories,
    NCESMetrics,
)


@dataclass
class NCESResult:
    """NCES of one SAE's latents: per-latent ``details`` (one row per latent, every null's
    columns), the flat metrics (``NCESMetrics`` fields) of each null run in
    ``metrics_by_null`` (in the config's order; the first is the headline, :attr:`metrics`),
    and, when ``screen:N`` chose the latents, the screen's scores of every latent."""

    details: pd.DataFrame
    metrics_by_null: dict[str, dict[str, Any]]
    screen: dict[str, Any] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The headline (first) null's metrics."""
        return dict(next(iter(self.metrics_by_null.values())))

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``metrics, details``, the pair ``evaluate_sae`` returned up to 0.3.0."""
        return iter((self.metrics, self.details))

    @classmethod
    def from_details(
        cls,
        details: pd.DataFrame,
        activation_weights: np.ndarray,
        config: NCESEvalConfig,
        screen: dict[str, Any] | None = None,
        round1: pd.DataFrame | None = None,
    ) -> NCESResult:
        """Each null's :func:`~csae_plugin.causal.nces.nces_metrics` over ``details``, with the
        settings that name the run (intervention, null draws, definition, null) and the
        average intervened copies per latent.

        An adaptive run passes its ``round1`` details: the per-SAE estimates come from round 1
        (the same design for every latent), the fractions verified from ``details``.
        """
        shared = {
            "intervention": config.intervention,
            "null_draws": config.null_draws,
            "nces_definition": config.nces_definition,
            "copies_per_latent": copies_per_latent(details),
        }
        by_null = {}
        for null in config.nulls:
            view = null_view(details, null)
            metrics = nces_metrics(
                view if round1 is None else null_view(round1, null),
                activation_weights,
                n_resamples=config.n_bootstrap,
                seed=config.random_seed,
            )
            if round1 is not None:  # the verdicts are the final ones, not round 1's
                metrics |= verified_fractions(view)
            by_null[null] = metrics | shared | {"null": null}
        return cls(details, by_null, screen)


def eval_output(
    config: NCESEvalConfig,
    sae: SAE,
    release: str,
    sae_id: str,
    result: NCESResult,
    eval_id: str | None = None,
) -> NCESEvalOutput:
    """The SAEBench output object for one SAE (NaN and inf become ``None``)."""
    return NCESEvalOutput(
        eval_config=config,
        eval_id=eval_id or get_eval_uuid(),
        datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=NCESMetricCategories(
            nces=NCESMetrics(**json_safe(result.metrics)),
            **{
                f"nces_{null}": NCESMetrics(**json_safe(values))
                for null, values in result.metrics_by_null.items()
            },
        ),
        eval_result_details=[
            NCESLatentDetail(**row) for row in json_safe(result.details.to_dict("records"))
        ],
        eval_result_unstructured=(
            None if result.screen is None else {"screen": json_safe(result.screen)}
        ),
        sae_bench_commit_hash=sae_bench_version(),
        sae_lens_id=sae_id,
        sae_lens_release_id=release,
        sae_lens_version=get_sae_lens_version(),
        sae_cfg_dict=sae.cfg.to_dict(),
    )
