"""What the NCES eval is asked to run on: SAEBench's ``selected_saes`` entries (the result name
of each, :func:`sae_id_of`, and its SAE, :func:`load_selected`), and the command line of
``python -m csae_plugin.evals.nces.main``: SAEBench's eval CLI contract (:func:`arg_parser`),
the two arguments the plugin adds (:func:`cli_arg_parser`) and the SAEs they name
(:func:`selected_saes`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_lens import SAE

from csae_plugin.evals import add_config_arguments
from csae_plugin.evals.nces.eval_config import NCESEvalConfig
from csae_plugin.saes.loading import load_sae, load_sae_from_folder

CUSTOM_SAE_ID = "custom_sae"
"""SAEBench's ``sae_id`` for an SAE passed in as an object (its result file name)."""


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


def selected_saes(args: argparse.Namespace) -> list[tuple[str, str | SAE]]:
    """The ``(release, sae_id)`` pairs ``args`` name: saved folders (release ``local``), then
    the SAELens releases and ids matching the regex patterns."""
    selected: list[tuple[str, str | SAE]] = [("local", path) for path in args.sae_paths]
    if args.sae_regex_pattern:
        from sae_bench.sae_bench_utils.sae_selection_utils import get_saes_from_regex

        selected += get_saes_from_regex(args.sae_regex_pattern, args.sae_block_pattern or ".*")
    return selected


def sae_id_of(sae_or_id: str | SAE) -> str:
    """The ``sae_id`` naming the result: SAEBench's for objects, the folder name for folders."""
    if isinstance(sae_or_id, SAE):
        return CUSTOM_SAE_ID
    folder = Path(sae_or_id).expanduser()
    return folder.resolve().name if folder.is_dir() else sae_or_id


def load_selected(release: str, sae_or_id: str | SAE, device: str) -> SAE:
    """The SAE of a ``selected_saes`` entry on ``device``: the object, the saved folder, or
    the SAELens release's SAE."""
    if isinstance(sae_or_id, SAE):
        return sae_or_id.to(device)
    folder = Path(sae_or_id).expanduser()
    if folder.is_dir():
        return load_sae_from_folder(folder, device=device)
    return load_sae(f"{release}:{sae_or_id}", device=device)[0]
