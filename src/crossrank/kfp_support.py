"""Glue that KFP components call inside their containers, so each component stays thin.

A component receives the text of `params.yaml`, the profile, the MLflow tracking URI
and the parent run id as parameters; `stage_params` turns them into `Params` and sets
the environment the stage functions read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crossrank.config import Params, parse_params
from crossrank.tracking import PARENT_RUN_ENV


def stage_params(params_yaml: str, profile: str, tracking_uri: str, parent_run_id: str, run_key: str = "") -> Params:
    """Parse the pipeline's parameters and point MLflow at the pipeline's parent run.

    Without `parent_run_id`, the parent run is looked up by `run_key`. Tasks inside a
    ParallelFor take that path: the kfp 2.17 local runner hands them the loop item in
    place of other tasks' output parameters.
    """
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    params = parse_params(params_yaml, profile or None, source="the params_yaml pipeline parameter")
    if not parent_run_id and run_key:
        from crossrank.tracking import find_pipeline_run

        parent_run_id = find_pipeline_run(params.tracking, run_key) or ""
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
    return params


def log_json_metrics(metrics: Any, path: Path, prefix: str = "") -> None:
    """Copy the numeric leaves of a JSON metrics file into a KFP Metrics artifact."""
    from crossrank.tracking import flatten

    values = json.loads(Path(path).read_text(encoding="utf-8"))
    for key, value in flatten(values).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"{prefix}{key}", float(value))
