"""SAEBench evals run by the plugin: ``nces`` (an eval folder in SAEBench's own layout) and
``core`` (SAEBench's core eval run on a model and tokens handed in, so no hub is needed).

This module holds the small plumbing both share: the one-line input error, SAEBench's result
file naming and resume rule (:func:`pending_result`), an atomic JSON writer that turns NaN into
``null``, and argparse flags generated from an eval config dataclass (as SAEBench's parsers
list their config fields). The token rows both run on are loaded by :mod:`.tokens`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from csae_plugin.causal.tail import activations_at, check_model_matches_sae
from csae_plugin.saes.loading import SAELoadError, check_sae_weights

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

RESULTS_SUFFIX = "_eval_results.json"
"""SAEBench's result file name is ``<release>_<sae_id>`` + this suffix."""


class EvalInputError(ValueError):
    """An eval's inputs are unusable; the one-line message says why and what to do."""


def results_path(output_path: str | Path, release: str, sae_id: str) -> Path:
    """``<output_path>/<release>_<sae_id>_eval_results.json`` with ``/`` replaced by ``_``.

    The same name as ``sae_bench.sae_bench_utils.general_utils.get_results_filepath``.
    """
    return Path(output_path) / f"{release}_{sae_id}{RESULTS_SUFFIX}".replace("/", "_")


def pending_result(
    output_path: str | Path, release: str, sae_id: str, force_rerun: bool = False, say: bool = True
) -> Path | None:
    """The result file to write for ``release``/``sae_id`` under ``output_path``, or ``None``
    when it exists and ``force_rerun`` is off: SAEBench's resume rule, said as SAEBench says
    it unless ``say`` is off (the one skip-if-exists check of core, nces and the API)."""
    path = results_path(output_path, release, sae_id)
    if path.exists() and not force_rerun:
        if say:
            print(f"Skipping {release}_{sae_id} as results already exist")
        return None
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None``, recursively.

    JSON has no NaN: SAEBench's core writes -1 instead, its other evals write bare ``NaN``
    (invalid JSON). ``null`` keeps "undefined" distinct from every real value.
    """
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block succeeds.

    The file appears complete or not at all (``os.replace``), so an interrupted run never
    leaves a half-written result that a rerun would mistake for a finished one; both the file
    and the rename are flushed to disk (``fsync``) before the block returns, so what a caller
    deletes next (the chunks a result was made of) is never the only copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are not
        _fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every system syncs a folder
            _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as JSON (NaN as ``null``) to ``path``, atomically."""
    text = json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def validate_inputs(
    model: HookedTransformer,
    sae: SAE,
    eval_tokens: torch.Tensor,
    reference_tokens: torch.Tensor | None = None,
) -> None:
    """Raise a one-line ``ValueError`` if the SAE, model and tokens cannot be evaluated.

    Checks the hook exists with width ``d_in``, that there are tokens, and that the model's
    activations at the hook are finite on the first evaluation sequences (cheap, so a bad
    model fails before any result is written).
    """
    hook_name = sae.cfg.metadata.hook_name
    if hook_name is None:
        raise EvalInputError(
            "the SAE has no hook_name in cfg.metadata; set it to the model hook the SAE reads"
        )
    check_model_matches_sae(model, hook_name, sae.cfg.d_in)
    try:
        check_sae_weights(sae, "the SAE")
    except SAELoadError as err:
        raise EvalInputError(str(err)) from None
    for what, tokens in (("evaluation", eval_tokens), ("reference", reference_tokens)):
        if tokens is None:
            continue
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise EvalInputError(
                f"zero {what} tokens: expected a non-empty [n_seq, context] tensor, got {shape}"
            )
        if tokens.shape[1] > model.cfg.n_ctx:
            raise EvalInputError(
                f"{what} token rows have {tokens.shape[1]} positions, more than model "
                f"{model.cfg.model_name}'s n_ctx={model.cfg.n_ctx}; pass shorter rows "
                f"(--context-size {model.cfg.n_ctx} or less)"
            )
    if not torch.isfinite(activations_at(model, hook_name, eval_tokens[:2])).all():
        raise EvalInputError(
            f"model {model.cfg.model_name} produced NaN activations at {hook_name!r}; "
            "check the model's weights and dtype"
        )


def sae_bench_version() -> str:
    """The installed SAEBench release, recorded as ``sae_bench_commit_hash`` in results.

    SAEBench's own helper runs ``git rev-parse`` in the working directory, which names the
    user's repository rather than SAEBench when SAEBench is installed from PyPI.
    """
    try:
        return f"sae-bench=={version('sae-bench')}"
    except PackageNotFoundError:
        return "unknown"


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    dashes: bool = False,
    skip: Iterable[str] = (),
) -> None:
    """One ``--flag`` per field of a pydantic config dataclass, help = the field description.

    Values stay strings (default ``None`` = the config's default); the config validates and
    converts them when built by :func:`config_from_args`. Both spellings are accepted
    (``--null-draws`` and ``--null_draws``, as SAEBench's scripts spell them); ``dashes``
    chooses which one the help shows first.
    """
    skipped = set(skip)
    for field in dataclasses.fields(config_cls):
        if field.name in skipped:
            continue
        info = field.default
        spellings = ["--" + field.name.replace("_", "-"), "--" + field.name]
        flags = dict.fromkeys(spellings if dashes else spellings[::-1])
        default = getattr(info, "default", None)
        description = getattr(info, "description", "") or ""
        parser.add_argument(
            *flags,
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            help=f"{description} (default: {default})".replace("%", "%%"),
        )


def config_from_args(config_cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build ``config_cls`` from the flags of :func:`add_config_arguments` that were given.

    Raises :class:`EvalInputError` with one line naming the first bad field.
    """
    from pydantic import ValidationError

    values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config_cls)
        if getattr(args, field.name, None) is not None
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return config_cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else config_cls.__name__
        given = values.get(where, first.get("input"))
        message = first["msg"].removeprefix("Value error, ")
        raise EvalInputError(f"bad value {given!r} for {where}: {message}") from err
