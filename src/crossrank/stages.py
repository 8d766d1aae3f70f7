"""Stage functions: read inputs, run one step of the pipeline, write outputs, log to MLflow.

The command line (and so `dvc.yaml`), the KFP components and the tests call these
functions with explicit paths; none of them reads `params.yaml` or parses arguments.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from crossrank import schema
from crossrank.bm25 import BM25Index, build_catalog
from crossrank.config import Params
from crossrank.errors import DataError
from crossrank.evaluation import evaluate_scores, random_baseline, results_table
from crossrank.ingest import ingest
from crossrank.split import SPLITS, split
from crossrank.tracking import stage_run
from crossrank.validate import validate, write_outputs

logger = logging.getLogger(__name__)


def read_table(path: Path) -> pd.DataFrame:
    """Read a Parquet table written by an earlier stage, or name the stage that writes it."""
    if not path.is_file():
        raise DataError(
            f"input table not found: {path}. Run the stage that writes it first "
            "(`dvc repro` runs every stage in order)."
        )
    return pd.read_parquet(path)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def write_json(values: dict[str, Any], path: Path) -> None:
    """Write a JSON document with sorted keys, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_ingest(params: Params, out: Path, root: Path = Path(".")) -> pd.DataFrame:
    """Read the raw judgments with the configured adapter into the canonical table."""
    with stage_run("ingest", params.tracking, params.profile, params.data.model_dump(), root) as run:
        started = time.perf_counter()
        frame = ingest(params.data, root)
        write_table(frame, out)

        run.log_metrics(
            {
                "num_judgments": len(frame),
                "num_queries": frame[schema.QUERY_ID].nunique(),
                "num_items": frame[schema.ITEM_ID].nunique(),
                "duration_s": time.perf_counter() - started,
            }
        )
    return frame


def run_validate(
    params: Params,
    judgments: Path,
    clean: Path,
    quarantine: Path,
    summary: Path,
    metrics: Path,
    root: Path = Path("."),
) -> dict[str, Any]:
    """Run the expectation suite; write clean rows, quarantined rows and the summary.

    `summary` gets every expectation's result; `metrics` gets the row counts only,
    for `dvc metrics show`.

    Raises DataError when the bad fraction is above validate.max_bad_fraction; the
    quarantine file is written first, and the MLflow run is marked failed.
    """
    config = params.validate_
    with stage_run("validate", params.tracking, params.profile, config.model_dump(), root) as run:
        frame = read_table(judgments)
        result = validate(frame, config, quarantine_path=quarantine)
        write_outputs(result, clean, quarantine, summary)

        counts = {key: result.summary[key] for key in ("num_rows", "num_clean", "num_quarantined", "bad_fraction")}
        write_json(counts, metrics)
        run.log_metrics(counts)
        run.log_artifact(summary)
        if len(result.quarantine):
            run.log_artifact(quarantine)
    return result.summary


def run_split(params: Params, clean: Path, splits_dir: Path, catalog: Path, root: Path = Path(".")) -> None:
    """Split clean judgments by query and write the catalog of every judged item."""
    with stage_run("split", params.tracking, params.profile, params.split.model_dump(), root) as run:
        frame = read_table(clean)
        parts = split(frame, params.split)
        for name, part in parts.items():
            write_table(part, splits_dir / f"{name}.parquet")
        write_table(build_catalog(frame), catalog)

        run.log_metrics(
            {
                f"{name}.{key}": value
                for name, part in parts.items()
                for key, value in (("num_judgments", len(part)), ("num_queries", part[schema.QUERY_ID].nunique()))
            }
        )


def run_bm25(params: Params, test: Path, catalog: Path, out: Path, root: Path = Path(".")) -> None:
    """Score each test judgment with BM25 over the whole catalog's product text."""
    with stage_run("bm25", params.tracking, params.profile, params.bm25.model_dump(), root) as run:
        started = time.perf_counter()
        frame = read_table(test)
        index = BM25Index(read_table(catalog), params.bm25)
        frame["bm25_score"] = index.score_pairs(frame[schema.QUERY], frame[schema.ITEM_ID])
        write_table(frame[[schema.QUERY_ID, schema.ITEM_ID, "bm25_score"]], out)

        run.log_metrics({"num_pairs": len(frame), "duration_s": time.perf_counter() - started})


def _attach_scores(test: pd.DataFrame, model: str, path: Path) -> pd.DataFrame:
    scores = read_table(path)
    column = f"{model}_score"
    if column not in scores.columns:
        raise DataError(f"{path} has no column {column!r}; re-run the stage that writes it")
    merged = test.merge(scores[[schema.QUERY_ID, schema.ITEM_ID, column]], on=[schema.QUERY_ID, schema.ITEM_ID], how="left")
    if merged[column].isna().any():
        num_missing = int(merged[column].isna().sum())
        raise DataError(
            f"{path} lacks scores for {num_missing} test judgments; re-run the stage that writes it "
            "on the current test split"
        )
    return merged


def run_evaluate(
    params: Params,
    test: Path,
    score_files: dict[str, tuple[Path, bool]],
    metrics_dir: Path,
    report: Path,
    root: Path = Path("."),
) -> dict[str, dict[str, Any]]:
    """Evaluate every model's test scores and a random order; write metrics and a table.

    `score_files` maps a model name to (Parquet file with `<model>_score`, whether the
    scores are calibrated probabilities). Each model's metrics go to
    `metrics_dir/<model>.json`; the Markdown results table goes to `report`.
    """
    with stage_run("evaluate", params.tracking, params.profile, params.evaluate.model_dump(), root) as run:
        frame = read_table(test)
        rows: dict[str, dict[str, Any]] = {"random": random_baseline(frame, params.evaluate)}
        for model, (path, calibrated) in score_files.items():
            scored = _attach_scores(frame, model, path)
            rows[model] = evaluate_scores(scored, f"{model}_score", params.evaluate, calibrated=calibrated)

        for model, metrics in rows.items():
            write_json(metrics, metrics_dir / f"{model}.json")
            run.log_metrics(metrics, prefix=f"{model}.")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(results_table(rows) + "\n", encoding="utf-8")
        run.log_artifact(report)
    return rows


__all__ = ["SPLITS", "run_bm25", "run_evaluate", "run_ingest", "run_split", "run_validate"]
