"""A CI gate: a candidate SAE's results against a baseline's, metric by metric, with tolerances.

``sae_bench compare BASELINE CANDIDATE --fail-on-regression`` is the command line of
:func:`gate`; each side is a results folder (``sae_bench run``'s ``--output-dir``) or a CSV
written by ``sae_bench compare --csv``. SAEs are paired by name, or, when each side holds one,
with each other. A metric fails when it is worse than the baseline's by more than its tolerance
(``worse``), or absent from the candidate while the baseline has it (``missing``); with
``two_sided`` any move beyond the tolerance fails (``moved``), for checks that a rerun
reproduces a reference. L0 and metrics of no known direction are always two-sided: a change of
sparsity makes the other scores incomparable rather than worse. NCES results made with another
definition, null, intervention or number of null draws are ``not comparable``.

The default tolerances (:data:`DEFAULT_TOLERANCES`) are the project's CI tolerances, sized
from the measured spread of the same sweep rerun as other CPUs would run it
(``evals/ci_spread.py`` at commit 65eea3c; the numbers and the margins are in
``docs/ci_gate.md``). They bound machine noise for one training run, not seed-to-seed spread:
compare SAEs trained with the same seed, or widen them (``--tolerance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from csae_plugin.evals import EvalInputError


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move: ``value`` itself (absolute) or ``value`` x |baseline|."""

    kind: Literal["absolute", "relative"]
    value: float

    def limit(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.kind == "relative" else self.value

    def __str__(self) -> str:
        return f"{self.value:.3g}" if self.kind == "absolute" else f"{100 * self.value:.3g}%"


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "l0": Tolerance("relative", 0.02),
    "explained_variance_centered": Tolerance("absolute", 0.01),
    "ce_loss_score": Tolerance("absolute", 0.01),
    "kl_div_score": Tolerance("absolute", 0.01),
    "nces_geomean": Tolerance("relative", 0.15),
    "frac_verified": Tolerance("absolute", 0.15),
}
"""Metric -> tolerance gated by default (the measured spreads above)."""

HIGHER_IS_BETTER = frozenset(
    {
        "explained_variance_centered",
        "explained_variance",
        "ce_loss_score",
        "kl_div_score",
        "cossim",
        "nces_geomean",
        "nces_median",
        "nces_rank",
        "frac_verified",
        "frac_beats_null",
        "frac_alive",
    }
)
LOWER_IS_BETTER = frozenset({"mse", "frac_dead", "kl_div_with_sae", "ce_loss_with_sae"})
"""Metrics with a direction; any other (L0 among them) fails when it moves either way."""

SETTINGS = ("nces_definition", "null", "intervention", "null_draws")
"""Recorded NCES settings that must agree for NCES metrics to be compared."""

FAILING = ("worse", "moved", "missing", "not comparable")
"""Check results that fail the gate."""


@dataclass(frozen=True)
class Check:
    """One metric of one SAE pair (or a whole SAE missing: ``metric`` is ``""``)."""

    sae: str
    metric: str
    baseline: float | None
    candidate: float | None
    tolerance: Tolerance | None
    result: str  # "ok", "better", "no baseline", or one of FAILING

    @property
    def failed(self) -> bool:
        return self.result in FAILING


def parse_tolerance(text: str) -> tuple[str, Tolerance | None]:
    """``METRIC=0.02`` (absolute), ``METRIC=5%`` (relative) or ``METRIC=off`` (not gated)."""
    metric, sep, value = (part.strip() for part in text.partition("="))
    try:
        if not (metric and sep and value):
            raise ValueError
        if value == "off":
            return metric, None
        if value.endswith("%"):
            return metric, Tolerance("relative", _non_negative(float(value[:-1]) / 100))
        return metric, Tolerance("absolute", _non_negative(float(value)))
    except ValueError:
        raise EvalInputError(
            f"tolerance {text!r}: expected METRIC=VALUE (absolute), METRIC=VALUE% (relative) "
            "or METRIC=off, e.g. --tolerance ce_loss_score=0.02"
        ) from None


def tolerances(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Tolerance]:
    """:data:`DEFAULT_TOLERANCES` with ``overrides`` (``parse_tolerance`` strings) applied."""
    chosen: dict[str, Tolerance | None] = dict(DEFAULT_TOLERANCES)
    chosen.update(parse_tolerance(text) for text in overrides)
    return {metric: tol for metric, tol in chosen.items() if tol is not None}


def read_table(path: str | Path) -> pd.DataFrame:
    """One side of the gate: a results folder, or a CSV from ``sae_bench compare --csv``."""
    from csae_plugin.evals.api import load_results

    source = Path(path).expanduser()
    if source.is_file() and source.suffix == ".csv":
        return pd.read_csv(source, index_col="sae")
    table = load_results([source])
    if table.empty:
        raise EvalInputError(f"no results under {str(source)!r}; run sae_bench run there first")
    return table


def gate(
    baseline: pd.DataFrame,
    candidate: pd.DataFrame,
    tolerance: dict[str, Tolerance] | None = None,
    two_sided: bool = False,
) -> list[Check]:
    """Every check of ``candidate`` against ``baseline`` (tables as ``load_results`` gives)."""
    tolerance = DEFAULT_TOLERANCES if tolerance is None else tolerance
    if len(baseline) == 1 and len(candidate) == 1:
        pairs = [(baseline.index[0], candidate.index[0])]
    else:
        pairs = [(name, name) for name in baseline.index if name in candidate.index]
    checks = [
        Check(str(name), "", None, None, None, "missing")
        for name in baseline.index
        if name not in {b for b, _ in pairs}
    ]
    for base_name, cand_name in pairs:
        label = str(cand_name) if base_name == cand_name else f"{cand_name} (vs {base_name})"
        base, cand = baseline.loc[base_name], candidate.loc[cand_name]
        for metric, tol in tolerance.items():
            b, c = _number(base.get(metric)), _number(cand.get(metric))
            checks.append(Check(label, metric, b, c, tol, _judge(metric, b, c, tol, two_sided)))
        differing = [
            f"{key} {base[key]} vs {cand[key]}"
            for key in SETTINGS
            if None not in (_value(base.get(key)), _value(cand.get(key)))
            and str(base[key]) != str(cand[key])
        ]
        if differing:  # NCES numbers of other settings measure something else
            checks.append(Check(label, "; ".join(differing), None, None, None, "not comparable"))
    return checks


def markdown(checks: list[Check]) -> str:
    """The checks as a Markdown table under a one-line verdict (for a CI job summary)."""
    failed = [c for c in checks if c.failed]
    verdict = f"FAILED: {len(failed)} of {len(checks)} checks" if failed else "passed"
    lines = [
        f"### SAE gate: {verdict}",
        "",
        "| SAE | metric | baseline | candidate | change | tolerance | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in checks:
        change = (
            "" if c.baseline is None or c.candidate is None else f"{c.candidate - c.baseline:+.4g}"
        )
        result = f"**{c.result}**" if c.failed else c.result
        lines.append(
            f"| {c.sae} | {c.metric or '(all metrics)'} | {_fmt(c.baseline)} | "
            f"{_fmt(c.candidate)} | {change} | {c.tolerance or ''} | {result} |"
        )
    return "\n".join(lines) + "\n"


def _judge(metric: str, b: float | None, c: float | None, tol: Tolerance, two_sided: bool) -> str:
    if b is None:
        return "no baseline"
    if c is None:
        return "missing"
    change, limit = c - b, tol.limit(b)
    if abs(change) <= limit:
        return "ok"
    if metric in HIGHER_IS_BETTER and not two_sided:
        return "better" if change > 0 else "worse"
    if metric in LOWER_IS_BETTER and not two_sided:
        return "better" if change < 0 else "worse"
    return "moved"


def _value(value: object) -> object:
    """``value``, or ``None`` for a missing one (NaN, None)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _number(value: object) -> float | None:
    """A finite number, or ``None`` (absent, null or NaN)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _non_negative(value: float) -> float:
    if not value >= 0:
        raise ValueError(value)
    return value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
