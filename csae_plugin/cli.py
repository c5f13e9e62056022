"""``sae_bench``: SAEBench's ``core`` and the plugin's ``nces`` eval on any SAELens SAE.

Subcommands: ``run`` (evaluate SAEs; results in SAEBench's layout, ``<output-dir>/<eval>/
<release>_<sae_id>_eval_results.json``), ``list`` (available evals), ``compare`` (tables and
plots from result folders; with ``--fail-on-regression`` a CI gate of a candidate's results
on a baseline's, ``csae_plugin.evals.gate``) and ``demo`` (``csae_plugin.demo``). The model is loaded once and
shared by both evals; finished SAEs are skipped on a rerun unless ``--force-rerun``.

Every failure, an interrupt included, ends as one line ``sae_bench: error: ...`` on stderr and
exit code 2; result files are written atomically, so none is ever half-written. ``compare``
shows the readable results and names each unreadable file on its own error line (exit code 1);
its gate exits 1 on a regression. This module only parses arguments and reports; the work is done by ``csae_plugin.evals.api``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from csae_plugin.evals import (
    RESULTS_SUFFIX,
    EvalInputError,
    add_config_arguments,
    config_from_args,
    gate,
)
from csae_plugin.evals.api import (
    EVALS,
    SUMMARY_COLUMNS,
    check_device,
    evaluate_saes,
    load_results,
    plot_results,
    writable_dir,
)
from csae_plugin.evals.nces.eval_config import EMBEDDED_DATASET, NCESEvalConfig
from csae_plugin.models import EMBEDDED_MODEL

if TYPE_CHECKING:
    import pandas as pd

PROG = "sae_bench"


class _UsageError(EvalInputError):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors become one-line errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def arg_parser() -> argparse.ArgumentParser:
    """The ``sae_bench`` parser with its subcommands."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="evaluate SAEs", description="Evaluate SAEs.")
    run.add_argument(
        "--eval",
        default="core,nces",
        help="evals to run, comma-separated: " + ", ".join(EVALS) + " (default: %(default)s)",
    )
    run.add_argument(
        "--sae",
        "--sae_paths",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="saved SAE folders or SAELens 'release:sae_id' pairs",
    )
    run.add_argument(
        "--sae_regex_pattern",
        "--sae-regex-pattern",
        help="SAELens release names matching this regex (with --sae_block_pattern), as "
        "SAEBench's scripts select SAEs",
    )
    run.add_argument(
        "--sae_block_pattern",
        "--sae-block-pattern",
        default=".*",
        help="SAE ids matching this regex within the selected releases (default: %(default)s)",
    )
    run.add_argument(
        "--model",
        "--model_name",
        default=None,
        help="TransformerLens name (hub), local Hugging Face folder, or the embedded "
        f"'{EMBEDDED_MODEL}' (default: the SAEs' own model_name, else {EMBEDDED_MODEL})",
    )
    run.add_argument(
        "--dataset",
        default=EMBEDDED_DATASET,
        help="Hugging Face dataset or local data file, or the embedded '%(default)s' (default)",
    )
    run.add_argument(
        "--output-dir", "--output_folder", default="eval_results", help="default: %(default)s"
    )
    run.add_argument("--device", default=_default_device(), help="default: %(default)s")
    run.add_argument(
        "--force-rerun", "--force_rerun", action="store_true", help="redo SAEs with results"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(
        run.add_argument_group("NCES eval config"),  # type: ignore[arg-type]
        NCESEvalConfig,
        dashes=True,
        skip=("model_name", "dataset"),
    )
    run.set_defaults(func=_cmd_run)

    listing = commands.add_parser("list", help="list the available evals")
    listing.set_defaults(func=_cmd_list)

    compare = commands.add_parser(
        "compare",
        help="compare result folders side by side, or gate a candidate on a baseline",
        description="Table (and optional CSV and plots) of the core and nces results found "
        "under the given folders. With --fail-on-regression: BASELINE CANDIDATE, a Markdown "
        "table of each gated metric, exit code 1 when one is worse than the baseline's by "
        "more than its tolerance or missing.",
    )
    compare.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="result folders (with --fail-on-regression: BASELINE CANDIDATE, each a folder "
        "or a CSV written by --csv)",
    )
    compare.add_argument("--csv", help="write the full table to this CSV file")
    compare.add_argument("--plots", metavar="DIR", help="write plots (PNG) to this folder")
    gating = compare.add_argument_group("gate (CI)")
    gating.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="compare CANDIDATE with BASELINE; exit 1 on a regression or a missing metric",
    )
    gating.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="override or add a tolerance: absolute (ce_loss_score=0.02), relative "
        "(nces_geomean=20%%) or off (l0=off); repeatable. Defaults: "
        + ", ".join(f"{k}={v}" for k, v in gate.DEFAULT_TOLERANCES.items()).replace("%", "%%"),
    )
    gating.add_argument(
        "--two-sided",
        action="store_true",
        help="also fail when a metric improves beyond its tolerance (a rerun that must "
        "reproduce its reference)",
    )
    gating.add_argument(
        "--summary",
        metavar="FILE",
        help='append the Markdown table to FILE too (e.g. "$GITHUB_STEP_SUMMARY")',
    )
    compare.set_defaults(func=_cmd_compare)

    commands.add_parser(
        "demo",
        help="train a causal SAE and a TopK baseline and compare them (see demo --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae_bench`` console command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            from csae_plugin import demo

            return demo.main(argv[1:]) or 0
        args = arg_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as exit_:  # --help, or a parser that exits by itself
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except KeyboardInterrupt:
        _error("interrupted; finished results are kept and a rerun resumes after them")
        return 130  # the shell's code for Ctrl-C
    except (ValueError, OSError) as err:
        return _error(_one_line(err))
    except Exception as err:  # torch, datasets, ...: still one line, never a traceback
        return _error(f"{type(err).__name__}: {_one_line(err)}")


def _error(message: str) -> int:
    """Print the one error line and give the exit code for every failure (2)."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _cmd_run(args: argparse.Namespace) -> int:
    from csae_plugin.saes.loading import sae_model

    specs = list(args.sae)
    if args.sae_regex_pattern:
        from sae_bench.sae_bench_utils.sae_selection_utils import get_saes_from_regex

        found = get_saes_from_regex(args.sae_regex_pattern, args.sae_block_pattern)
        if not found:
            raise _UsageError(
                f"no SAELens release matches --sae_regex_pattern {args.sae_regex_pattern!r} "
                f"and --sae_block_pattern {args.sae_block_pattern!r}"
            )
        specs += [f"{release}:{sae_id}" for release, sae_id in found]
    if not specs:
        raise _UsageError("no SAE given; pass --sae FOLDER|release:sae_id or --sae_regex_pattern")
    trained_on = {spec: sae_model(spec) for spec in specs}
    names = {name for name, _ in trained_on.values() if name}
    kwargs = [kw for _, kw in trained_on.values() if kw]
    if any(kw != kwargs[0] for kw in kwargs):
        raise _UsageError(
            "the SAEs need the model loaded differently (model_from_pretrained_kwargs "
            f"{kwargs[0]} vs {next(kw for kw in kwargs if kw != kwargs[0])}); run them separately"
        )
    model_name = args.model
    if model_name is None:
        if len(names) > 1:
            raise _UsageError(
                f"the SAEs were trained on different models ({', '.join(sorted(names))}); "
                "run them separately or pass --model"
            )
        if names:
            model_name, source = names.pop(), "the SAEs' own model_name"
        else:
            model_name, source = EMBEDDED_MODEL, "the default: the SAEs record no model"
        print(f"[{PROG}] model: {model_name} ({source}; --model overrides)", flush=True)
    if kwargs:
        print(f"[{PROG}] model loaded with the SAEs' {kwargs[0]}", flush=True)
    config = config_from_args(NCESEvalConfig, args, model_name=model_name, dataset=args.dataset)
    from csae_plugin.evals.nces import shards

    check_device(args.device)
    device = shards.init_from_env(args.device)  # under torchrun: join its process group
    table = evaluate_saes(
        args.eval,
        specs,
        output_dir=args.output_dir,
        device=device,
        force_rerun=args.force_rerun,
        nces_config=config,
        progress=not args.no_progress,
        model_kwargs=kwargs[0] if kwargs else None,
    )
    if shards.is_main_process():
        print(_format(table))
        print(f"results in {args.output_dir}/<eval>/")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for name, description in EVALS.items():
        print(f"{name:<6}{description}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """The table of the readable results; each unreadable file named on its own error line
    (exit code 1 if there is any). With ``--fail-on-regression``, the gate instead."""
    if args.fail_on_regression:
        return _cmd_gate(args)
    if args.tolerance or args.two_sided or args.summary:
        raise _UsageError("--tolerance, --two-sided and --summary need --fail-on-regression")
    bad: list[str] = []
    table = load_results(args.dirs, bad_files=bad)
    if table.empty and not bad:
        raise EvalInputError(f"no *{RESULTS_SUFFIX} files under {', '.join(args.dirs)}")
    if not table.empty:
        print(_format(table[[c for c in SUMMARY_COLUMNS if c in table.columns]]))
        if args.csv:
            csv = Path(args.csv).expanduser()
            writable_dir(csv.parent)
            table.to_csv(csv)
            print(f"table: {csv}")
        if args.plots:
            for path in plot_results(table, args.plots, eval_dirs=args.dirs):
                print(f"plot: {path}")
    for problem in bad:
        _error(problem)
    return 1 if bad else 0


def _cmd_gate(args: argparse.Namespace) -> int:
    """``compare BASELINE CANDIDATE --fail-on-regression``: exit code 1 on a failed check."""
    if len(args.dirs) != 2:
        raise _UsageError(
            f"--fail-on-regression compares two result folders, BASELINE CANDIDATE; got "
            f"{len(args.dirs)}"
        )
    chosen = gate.tolerances(args.tolerance)
    checks = gate.gate(*map(gate.read_table, args.dirs), chosen, two_sided=args.two_sided)
    if not checks:
        raise EvalInputError("nothing to gate: every tolerance is off")
    report = gate.markdown(checks)
    print(report, end="")
    if args.summary:
        with Path(args.summary).expanduser().open("a") as summary:
            summary.write(report + "\n")
    return 1 if any(check.failed for check in checks) else 0


def _format(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split())
    return text or type(err).__name__


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
