"""The `crossrank` command line: one subcommand per stage plus pipeline drivers.

`dvc.yaml` calls these subcommands; each loads `params.yaml` once, applies the
profile and calls the stage function in `crossrank.stages`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
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


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from crossrank.stages import run_train_teacher

    layout = _layout(args)
    run_train_teacher(
        _params(args),
        layout.split("train"),
        layout.split("validation"),
        layout.split("test"),
        layout.checkpoint("teacher"),
        layout.score_file("teacher"),
        layout.training_metrics("teacher"),
        layout.training_curve("teacher"),
        Path(args.root),
    )
    return 0


def _cmd_label_augmented(args: argparse.Namespace) -> int:
    from crossrank.stages import run_label_augmented

    layout = _layout(args)
    run_label_augmented(
        _params(args),
        layout.split("train"),
        layout.catalog,
        layout.checkpoint("teacher"),
        layout.augmented_shards,
        layout.labeled_pairs,
        Path(args.root),
    )
    return 0


def _cmd_distill_student(args: argparse.Namespace) -> int:
    from crossrank.stages import run_distill_student

    layout = _layout(args)
    run_distill_student(
        _params(args),
        layout.labeled_pairs,
        layout.split("validation"),
        layout.split("test"),
        layout.checkpoint("student"),
        layout.score_file("student"),
        layout.training_metrics("student"),
        layout.training_curve("student"),
        layout.checkpoint("teacher"),
        Path(args.root),
    )
    return 0


def _cmd_gate_export(args: argparse.Namespace) -> int:
    from crossrank.stages import run_gate_export

    layout = _layout(args)
    verdict = run_gate_export(
        _params(args),
        layout.checkpoint("student"),
        layout.split("validation"),
        layout.split("test"),
        layout.score_file("teacher"),
        layout.metrics,
        layout.bundle,
        layout.gate_decision,
        layout.model_card,
        Path(args.root),
    )
    print(f"gate verdict: {verdict}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from crossrank.stages import run_register

    layout = _layout(args)
    registered = run_register(_params(args), layout.bundle, layout.gate_decision, layout.model_card, layout.registry, Path(args.root))
    print(f"registered {registered['registered_model']} version {registered['version']}" + (" as champion" if registered["champion"] else " as challenger"))
    return 0


def _cmd_build_serving_stores(args: argparse.Namespace) -> int:
    from crossrank.stages import run_build_serving_stores, write_json

    layout = _layout(args)
    stats = run_build_serving_stores(
        _params(args), layout.catalog, layout.clean, layout.bundle, layout.token_store, layout.score_cache, Path(args.root)
    )
    write_json(stats, layout.serving_stats)
    return 0


def _dvc_executable() -> str:
    """Return dvc from PATH, else the one installed beside this Python (a venv not activated)."""
    found = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if found is None:
        raise CrossrankError(
            f"dvc not found on PATH nor in {Path(sys.executable).parent}; install the project "
            "(pip install -e .) or activate its virtual environment"
        )
    return found


def _cmd_repro(args: argparse.Namespace) -> int:
    from crossrank.tracking import PARENT_RUN_ENV, pipeline_run

    params = _params(args)
    command = [_dvc_executable(), "repro", *args.dvc_args]
    with pipeline_run(params.tracking, params.profile, Path(args.root)) as parent_run_id:
        logger.info("running %s under MLflow parent run %s", " ".join(command), parent_run_id)
        # Stage commands call `crossrank` by name, so this install's scripts go first on
        # PATH. Then the stages run this install even when its venv is not activated.
        # An empty PATH gets no empty entry, which would search the working directory.
        path = [str(Path(sys.executable).parent), *filter(None, os.environ.get("PATH", "").split(os.pathsep))]
        env = {**os.environ, PARENT_RUN_ENV: parent_run_id, "PATH": os.pathsep.join(path)}
        # dvc and its stage commands get a process group of their own, so a SIGTERM
        # or Ctrl-C here reaches all of them and every MLflow run ends FAILED.
        process = subprocess.Popen(command, cwd=args.root, env=env, start_new_session=True)
        try:
            returncode = process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
        if returncode != 0:
            raise CrossrankError(f"`{' '.join(command)}` failed with exit status {returncode}; see its output above")
    return 0


def _cmd_pipeline_compile(args: argparse.Namespace) -> int:
    from crossrank.kfp_driver import compile_pipeline

    path = compile_pipeline(Path(args.output), args.image)
    print(f"wrote {path}")
    return 0


def _cmd_pipeline_run(args: argparse.Namespace) -> int:
    from crossrank.kfp_driver import run_local

    if not args.local:
        raise CrossrankError("only local runs are started from here: pass --local, or use `crossrank pipeline submit --host URL`")
    params_path = Path(args.params)
    run_local(params_path.read_text(encoding="utf-8"), args.profile or "", args.data_path, Path(args.pipeline_root), Path(args.root))
    return 0


def _cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from crossrank.kfp_driver import submit

    params_path = Path(args.params)
    run_id = submit(
        args.host,
        params_path.read_text(encoding="utf-8"),
        args.profile or "",
        args.data_path,
        args.image,
        args.experiment,
        args.run_name,
        args.tracking_uri,
        args.timeout_s,
    )
    print(f"submitted run {run_id} to {args.host}")
    return 0


def _cmd_monitor_drift(args: argparse.Namespace) -> int:
    import time

    from crossrank.monitoring.drift import run_drift

    params = _params(args)
    end = args.end if args.end is not None else time.time()
    hours = args.window_hours if args.window_hours is not None else params.monitor.window_hours
    start = args.start if args.start is not None else end - hours * 3600
    result = run_drift(
        args.log,
        args.reference,
        params.monitor,
        start,
        end,
        args.model_version,
        args.out,
        tracking=params.tracking,
        profile=params.profile,
        root=Path(args.root),
    )
    print(f"drift verdict: {result.verdict} ({result.summary_path})")
    return result.exit_code


def _cmd_monitor_receive(args: argparse.Namespace) -> int:
    from crossrank.monitoring.receiver import serve_receiver

    serve_receiver(args.host, args.port, args.log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="crossrank",
        description="Distill a cross-encoder re-ranker from human relevance labels, gate, export, serve and monitor it.",
    )
    parser.add_argument("--version", action="version", version=f"crossrank {__version__}")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    common = argparse.ArgumentParser(add_help=False, parents=[verbose])
    common.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    common.add_argument(
        "--profile",
        choices=("smoke", "default", "full"),
        default=None,
        help="profile to apply (default: the `profile` key of the parameter file)",
    )
    common.add_argument("--root", default=".", help="project root that stage paths are relative to (default: .)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    add("ingest", _cmd_ingest, "Read the raw judgments into artifacts/judgments.parquet.")
    add("validate", _cmd_validate, "Run the expectation suite; quarantine failing rows with their reasons.")
    add("split", _cmd_split, "Split clean judgments by query hash into train, validation and test.")
    add("bm25", _cmd_bm25, "Score the test judgments with BM25 over the catalog.")
    add("train-teacher", _cmd_train_teacher, "Fine-tune the teacher with BCE on soft labels; score the test split.")
    add(
        "label-augmented",
        _cmd_label_augmented,
        "Generate pairs for training queries and label them with the teacher, in resumable shards.",
    )
    add("distill-student", _cmd_distill_student, "Train the student with margin-MSE on teacher logits; score the test split.")
    evaluate = add("evaluate", _cmd_evaluate, "Evaluate random order, BM25 and trained models on the test split.")
    evaluate.add_argument(
        "--models",
        nargs="*",
        default=[],
        choices=("teacher", "student"),
        help="trained models whose test scores are evaluated beside BM25",
    )
    pipeline = commands.add_parser(
        "pipeline", help="Compile, run locally or submit the Kubeflow pipeline.", description="Kubeflow pipeline commands."
    )
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    def add_pipeline(
        name: str, handler: Handler, summary: str, parents: Sequence[argparse.ArgumentParser] = (common,)
    ) -> argparse.ArgumentParser:
        sub = pipeline_commands.add_parser(name, parents=list(parents), help=summary, description=summary)
        sub.set_defaults(handler=handler)
        return sub

    image_help = "container image of every component, built from the Dockerfile"
    compile_cmd = add_pipeline(
        "compile",
        _cmd_pipeline_compile,
        "Write the pipeline as KFP v2 IR YAML. Its inputs params_yaml (the text of a params.yaml) "
        "and data_path are set per run, e.g. by `crossrank pipeline submit`.",
        parents=(verbose,),
    )
    compile_cmd.add_argument("--output", default="crossrank_pipeline.yaml", help="output file (default: crossrank_pipeline.yaml)")
    compile_cmd.add_argument("--image", default="ghcr.io/crossrank/crossrank:0.1.0", help=image_help)
    run_cmd = add_pipeline("run", _cmd_pipeline_run, "Run the pipeline with the kfp local runner in this environment.")
    run_cmd.add_argument("--local", action="store_true", help="run with kfp's SubprocessRunner (required)")
    run_cmd.add_argument("--data-path", default="data/homedepot", help="raw data folder (default: data/homedepot)")
    run_cmd.add_argument("--pipeline-root", default="artifacts/kfp", help="where task outputs go (default: artifacts/kfp)")
    submit_cmd = add_pipeline("submit", _cmd_pipeline_submit, "Submit the pipeline to a KFP API server.")
    submit_cmd.add_argument("--host", required=True, help="KFP API server URL, e.g. http://127.0.0.1:8888")
    submit_cmd.add_argument("--image", default="ghcr.io/crossrank/crossrank:0.1.0", help=image_help)
    submit_cmd.add_argument("--data-path", required=True, help="raw data folder as the cluster's pods see it")
    submit_cmd.add_argument("--experiment", default="crossrank", help="KFP experiment name (default: crossrank)")
    submit_cmd.add_argument("--run-name", default=None, help="KFP run name (default: crossrank-<profile>-<time>)")
    submit_cmd.add_argument("--tracking-uri", default="", help="MLflow tracking URI that the pods can reach")
    submit_cmd.add_argument("--timeout-s", type=float, default=10.0, help="seconds to wait for the server (default: 10)")

    add("gate-export", _cmd_gate_export, "Export the student to an ONNX bundle and run the offline gate.")
    add("register", _cmd_register, "Register the bundle in MLflow; move `champion` only if the gate accepted it.")
    monitor = commands.add_parser("monitor", help="Watch served scores for drift.", description="Drift monitoring commands.")
    monitor_commands = monitor.add_subparsers(dest="monitor_command", required=True, metavar="ACTION")
    drift = monitor_commands.add_parser(
        "drift",
        parents=[common],
        help="Compare a window of served scores with the bundle's reference; exit 1 on drift.",
        description="Compare a window of served scores with the bundle's reference; exit 1 on drift.",
    )
    drift.set_defaults(handler=_cmd_monitor_drift)
    drift.add_argument("--log", required=True, help="score log (SQLite file) written by the server or the receiver")
    drift.add_argument("--reference", required=True, help="reference.json of the served bundle")
    drift.add_argument("--out", default="reports/drift", help="folder for the HTML report and JSON summary")
    drift.add_argument("--model-version", default=None, help="served model version to check (default: the reference's)")
    drift.add_argument("--window-hours", type=float, default=None, help="window length in hours (default: monitor.window_hours)")
    drift.add_argument("--start", type=float, default=None, help="window start, Unix time in seconds")
    drift.add_argument("--end", type=float, default=None, help="window end, Unix time in seconds (default: now)")
    receive = monitor_commands.add_parser(
        "receive",
        parents=[common],
        help="Receive KServe payload-logger CloudEvents and append their scores to the score log.",
        description="Receive KServe payload-logger CloudEvents and append their scores to the score log.",
    )
    receive.set_defaults(handler=_cmd_monitor_receive)
    receive.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    receive.add_argument("--port", type=int, default=8090, help="port to listen on (default: 8090)")
    receive.add_argument("--log", required=True, help="score log (SQLite file) to append to")

    serve = commands.add_parser(
        "serve",
        help="Start the KServe predictor over a model bundle (see `crossrank serve --help`).",
        description="Start the KServe predictor over a model bundle.",
        add_help=False,
    )
    serve.add_argument("server_args", nargs=argparse.REMAINDER, help="options of the predictor, such as --model-dir")

    add(
        "build-serving-stores",
        _cmd_build_serving_stores,
        "Build or refresh the item token store and the head-query score cache for the bundle.",
    )
    repro = add("repro", _cmd_repro, "Run `dvc repro` under one MLflow parent run; extra arguments go to dvc.")
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments passed to `dvc repro`")
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; expected failures print one message and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The predictor parses its own options; argparse's REMAINDER would take none that start with "--".
        from crossrank.serving.server import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Python's default SIGTERM action ends the process at once; SystemExit unwinds the
    # MLflow run contexts instead, so a stopped stage is recorded as FAILED.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
