"""The `crossrank` command line: one subcommand per stage plus pipeline drivers.

`dvc.yaml` calls these subcommands; each loads `params.yaml` once, applies the
profile and calls the stage function in `crossrank.stages`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from crossrank import __version__
from crossrank.errors import CrossrankError

logger = logging.getLogger("crossrank")

Handler = Callable[[argparse.Namespace], int]


def _params(args: argparse.Namespace):
    from crossrank.config import load_params

    return load_params(args.params, args.profile)


def _layout(args: argparse.Namespace):
    from crossrank.paths import Layout

    return Layout(Path(args.root))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from crossrank.stages import run_ingest

    run_ingest(_params(args), _layout(args).judgments, Path(args.root))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from crossrank.stages import run_validate

    layout = _layout(args)
    run_validate(
        _params(args), layout.judgments, layout.clean, layout.quarantine,
        layout.validation_summary,
        layout.validation_metrics,
        Path(args.root),
    )
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from crossrank.stages import run_split

    layout = _layout(args)
    run_split(_params(args), layout.clean, layout.splits, layout.catalog, Path(args.root))
    return 0


def _cmd_bm25(args: argparse.Namespace) -> int:
    from crossrank.stages import run_bm25

    layout = _layout(args)
    run_bm25(_params(args), layout.split("test"), layout.catalog, layout.score_file("bm25"), Path(args.root))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from crossrank.stages import run_evaluate

    layout = _layout(args)
    score_files = {"bm25": (layout.score_file("bm25"), False)}
    for model in ("teacher", "student"):
        if model in args.models:
            score_files[model] = (layout.score_file(model), True)
    run_evaluate(_params(args), layout.split("test"), score_files, layout.metrics, layout.results_report, Path(args.root))
    return 0


def _cmd_repro(args: argparse.Namespace) -> int:
    from crossrank.tracking import PARENT_RUN_ENV, pipeline_run

    params = _params(args)
    command = ["dvc", "repro", *args.dvc_args]
    with pipeline_run(params.tracking, params.profile, Path(args.root)) as parent_run_id:
        logger.info("running %s under MLflow parent run %s", " ".join(command), parent_run_id)
        env = {**os.environ, PARENT_RUN_ENV: parent_run_id}
        completed = subprocess.run(command, cwd=args.root, env=env, check=False)
        if completed.returncode != 0:
            raise CrossrankError(f"`{' '.join(command)}` failed with exit status {completed.returncode}; see its output above")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="crossrank",
        description="Distill a cross-encoder re-ranker from human relevance labels, gate, export, serve and monitor it.",
    )
    parser.add_argument("--version", action="version", version=f"crossrank {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    common.add_argument(
        "--profile",
        choices=("smoke", "default", "full"),
        default=None,
        help="profile to apply (default: the `profile` key of the parameter file)",
    )
    common.add_argument("--root", default=".", help="project root that stage paths are relative to (default: .)")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    add("ingest", _cmd_ingest, "Read the raw judgments into artifacts/judgments.parquet.")
    add("validate", _cmd_validate, "Run the expectation suite; quarantine failing rows with their reasons.")
    add("split", _cmd_split, "Split clean judgments by query hash into train, validation and test.")
    add("bm25", _cmd_bm25, "Score the test judgments with BM25 over the catalog.")
    evaluate = add("evaluate", _cmd_evaluate, "Evaluate random order, BM25 and trained models on the test split.")
    evaluate.add_argument(
        "--models",
        nargs="*",
        default=[],
        choices=("teacher", "student"),
        help="trained models whose test scores are evaluated beside BM25",
    )
    repro = add("repro", _cmd_repro, "Run `dvc repro` under one MLflow parent run; extra arguments go to dvc.")
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments passed to `dvc repro`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; expected failures print one message and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CrossrankError as err:
        print(f"crossrank {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
