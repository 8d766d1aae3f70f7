"""Drift of served scores: compare a window of the score log with the model's reference.

The reference is the JSON file that the gate writes into the model bundle:

    {"model_version": str, "scores": [float], "teacher_scores": [float],
     "query_num_tokens": [int], "num_missing_attributes": [int]}

Three columns are compared: `score`, `query_num_tokens` and `num_missing_attributes`.
`teacher_scores` is validated when present but not compared, because the server
returns student scores. Each column is tested by an Evidently 0.7 `ValueDrift` metric
with a method and threshold of `MonitorConfig`. While either sample is smaller than
`large_sample_size` the test is `small_method` (K-S by default). Once both are at
least that large it is `large_method` (normed Wasserstein distance by default),
because K-S flags negligible differences between large samples.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift
from scipy import stats

from crossrank.config import MonitorConfig, TrackingConfig
from crossrank.errors import ConfigError, DataError
from crossrank.monitoring.score_log import ScoreLog
from crossrank.tracking import stage_run

logger = logging.getLogger(__name__)

Verdict = Literal["drift", "no drift", "insufficient data"]

# Monitored column -> key of its values in the reference file.
REFERENCE_KEYS = {
    "score": "scores",
    "query_num_tokens": "query_num_tokens",
    "num_missing_attributes": "num_missing_attributes",
}
REPORT_NAME = "drift_report.html"
SUMMARY_NAME = "drift_summary.json"

# Evidently 0.7.23 floors the reference standard deviation at this value when it norms
# the Wasserstein distance (legacy/calculations/stattests/wasserstein_distance_norm.py);
# the fallback uses the same floor so its values are on the same scale.
_MIN_REFERENCE_STD = 0.001


@dataclass(frozen=True)
class ScoreReference:
    """Values of each monitored column in the reference sample of one model version."""

    model_version: str
    values: dict[str, np.ndarray]


@dataclass(frozen=True)
class ColumnDrift:
    """Outcome of one column's drift test.

    `fallback` is True when Evidently's value was not finite and `value` is the normed
    Wasserstein distance computed in its place (see `run_drift`).
    """

    method: str
    value: float
    threshold: float
    drift: bool
    num_current: int
    num_reference: int
    fallback: bool = False


@dataclass(frozen=True)
class DriftResult:
    """Verdict of one drift job, its per-column tests and the files it wrote."""

    verdict: Verdict
    num_records: int
    model_version: str
    window_start: float
    window_end: float
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    skipped_columns: dict[str, str] = field(default_factory=dict)
    summary_path: Path | None = None
    report_path: Path | None = None

    @property
    def exit_code(self) -> int:
        """Return 1 when drift was detected, else 0 ("insufficient data" included)."""
        return 1 if self.verdict == "drift" else 0

    def summary(self) -> dict[str, Any]:
        """Return the JSON summary: verdict, counts, window and per-column tests."""
        return {
            "verdict": self.verdict,
            "num_records": self.num_records,
            "model_version": self.model_version,
            "window_start": _iso_time(self.window_start),
            "window_end": _iso_time(self.window_end),
            "columns": {name: asdict(column) for name, column in self.columns.items()},
            "skipped_columns": dict(self.skipped_columns),
        }


def _iso_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat()


def _finite_numbers(raw: dict[str, Any], key: str, path: Path) -> np.ndarray:
    values = raw.get(key, [])
    if not isinstance(values, list) or not all(
        isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
    ):
        raise DataError(f"score reference {path}: `{key}` must be a list of numbers; regenerate it with the gate stage")
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise DataError(
            f"score reference {path}: `{key}` contains {int((~np.isfinite(array)).sum())} NaN or infinite values; "
            "regenerate it with the gate stage"
        )
    return array


def load_reference(path: str | Path) -> ScoreReference:
    """Read and validate a score reference file (format in the module docstring).

    Raises DataError when the file is missing or not JSON, when `model_version` is
    missing or `scores` is empty, or when a list contains anything but finite numbers.
    The token and attribute lists may be absent or empty; those columns are then
    skipped by `run_drift`.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(
            f"score reference not found: {path}; copy reference.json from the served model's bundle"
        ) from err
    except json.JSONDecodeError as err:
        raise DataError(f"score reference {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("model_version"), str) or not raw["model_version"]:
        raise DataError(f"score reference {path} must be a JSON object with a non-empty string `model_version`")

    values = {column: _finite_numbers(raw, key, path) for column, key in REFERENCE_KEYS.items()}
    _finite_numbers(raw, "teacher_scores", path)
    if values["score"].size == 0:
        raise DataError(f"score reference {path} has no `scores`; regenerate it with the gate stage")
    return ScoreReference(model_version=raw["model_version"], values=values)


def _choose_test(num_current: int, num_reference: int, config: MonitorConfig) -> tuple[str, float]:
    if min(num_current, num_reference) >= config.large_sample_size:
        return config.large_method, config.large_threshold
    return config.small_method, config.small_threshold


def _normed_wasserstein(current: np.ndarray, reference: np.ndarray) -> float:
    norm = max(float(np.std(reference)), _MIN_REFERENCE_STD)
    return float(stats.wasserstein_distance(reference, current)) / norm


def _run_report(
    current: pd.DataFrame, reference: pd.DataFrame, tests: dict[str, tuple[str, float]]
) -> tuple[Any, dict[str, tuple[float, bool]]]:
    """Run one Evidently report and return the snapshot and each column's (value, drift)."""
    definition = DataDefinition(numerical_columns=list(tests))
    report = Report(
        [
            ValueDrift(column=column, method=method, threshold=threshold)
            for column, (method, threshold) in tests.items()
        ],
        # The test of each ValueDrift compares the value with the threshold in the
        # method's own direction, and its status FAIL means drift.
        include_tests=True,
    )
    snapshot = report.run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )

    results = snapshot.dict()
    values = {metric["config"]["column"]: float(metric["value"]) for metric in results["metrics"]}
    drifted = {
        test["metric_config"]["params"]["column"]: test["status"].value == "FAIL" for test in results["tests"]
    }
    return snapshot, {column: (values[column], drifted[column]) for column in tests}


def _select_samples(
    window: pd.DataFrame, reference: ScoreReference, config: MonitorConfig
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Return the (current, reference) values of each testable column and why the others are skipped."""
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for column in REFERENCE_KEYS:
        current = window[column].dropna().to_numpy(dtype=np.float64)
        reference_values = reference.values[column]
        if current.size < config.min_samples:
            skipped[column] = f"{current.size} values in the window, fewer than min_samples={config.min_samples}"
        elif reference_values.size == 0:
            skipped[column] = "the reference has no values for this column"
        else:
            samples[column] = (current, reference_values)
    for column, reason in skipped.items():
        logger.warning("drift of %s not tested: %s", column, reason)
    return samples, skipped


def _compare_columns(
    window: pd.DataFrame, reference: ScoreReference, config: MonitorConfig
) -> tuple[dict[str, ColumnDrift], dict[str, str], Any]:
    """Test every monitored column with enough values; return tests, skipped columns and the snapshot."""
    samples, skipped = _select_samples(window, reference, config)
    if not samples:
        return {}, skipped, None

    tests = {column: _choose_test(cur.size, ref.size, config) for column, (cur, ref) in samples.items()}
    # Columns can differ in length, so pandas pads the shorter ones with NaN, which
    # Evidently drops per column before testing.
    current_frame = pd.DataFrame({column: pd.Series(cur) for column, (cur, _) in samples.items()})
    reference_frame = pd.DataFrame({column: pd.Series(ref) for column, (_, ref) in samples.items()})
    snapshot, outcomes = _run_report(current_frame, reference_frame, tests)

    columns = {}
    for column, (current, reference_values) in samples.items():
        method, threshold = tests[column]
        value, drift = outcomes[column]
        fallback = not math.isfinite(value)
        if fallback:
            # Some tests are undefined for degenerate samples: a t-test of two constant
            # samples divides 0 by 0. The normed Wasserstein distance is finite for any
            # two non-empty finite samples, so it decides instead.
            logger.warning(
                "%s of %s returned %s; using the normed Wasserstein distance with threshold %g",
                method, column, value, config.fallback_threshold,
            )
            method, threshold = "wasserstein", config.fallback_threshold
            value = _normed_wasserstein(current, reference_values)
            drift = value >= threshold
        columns[column] = ColumnDrift(
            method=method,
            value=value,
            threshold=threshold,
            drift=bool(drift),
            num_current=int(current.size),
            num_reference=int(reference_values.size),
            fallback=fallback,
        )
    return columns, skipped, snapshot


def _resolve_window(
    window_start: float | None, window_end: float | None, config: MonitorConfig
) -> tuple[float, float]:
    end = time.time() if window_end is None else float(window_end)
    start = end - config.window_hours * 3600.0 if window_start is None else float(window_start)
    if not start < end:
        raise ConfigError(f"drift window is empty: start {_iso_time(start)} is not before end {_iso_time(end)}")
    return start, end


def _log_to_mlflow(
    result: DriftResult, config: MonitorConfig, tracking: TrackingConfig, profile: str, root: Path
) -> None:
    with stage_run("monitor_drift", tracking, profile, config.model_dump(), root) as run:
        # NOTE: tracking.StageRun has no tag method yet, so the tag goes through mlflow.
        mlflow.set_tag("crossrank.model_version", result.model_version)
        run.log_params({"window_start": _iso_time(result.window_start), "window_end": _iso_time(result.window_end)})
        run.log_metrics(
            {
                "num_records": result.num_records,
                "drift_detected": float(result.verdict == "drift"),
                "insufficient_data": float(result.verdict == "insufficient data"),
            }
        )
        for name, column in result.columns.items():
            run.log_metrics({"value": column.value, "drift": float(column.drift)}, prefix=f"drift.{name}.")
        for path in (result.summary_path, result.report_path):
            if path is not None:
                run.log_artifact(path)


def run_drift(
    log_path: str | Path,
    reference_path: str | Path,
    config: MonitorConfig,
    window_start: float | None = None,
    window_end: float | None = None,
    model_version: str | None = None,
    out_dir: str | Path = Path("drift"),
    *,
    tracking: TrackingConfig | None = None,
    profile: str = "default",
    root: Path = Path("."),
) -> DriftResult:
    """Compare the served scores of one window and model version with the reference.

    The window is `window_start <= time < window_end` in UTC epoch seconds; by default
    it ends now and spans `config.window_hours`. `model_version` defaults to the
    reference's version and must equal it. Writes `drift_summary.json` to `out_dir`
    and, unless the verdict is "insufficient data", Evidently's `drift_report.html`.
    When Evidently returns a non-finite value for a column (for example a t-test of two
    constant samples), the summary contains the normed Wasserstein distance instead, with
    `fallback: true`, while the HTML report still shows Evidently's value.

    The verdict is "insufficient data" when the window has fewer than
    `config.min_samples` records, or no column has that many values. Otherwise it is
    "drift" when any tested column drifted, else "no drift". The result is logged to an MLflow run named
    `monitor_drift` (`tracking` None uses the default `TrackingConfig`), tagged
    `crossrank.model_version`. Raises DataError for a missing score log or an invalid
    reference, ConfigError for an empty window.
    """
    log_path, out_dir = Path(log_path), Path(out_dir)

    # Load the reference and resolve the window.
    reference = load_reference(reference_path)
    version = model_version or reference.model_version
    if version != reference.model_version:
        raise DataError(
            f"score reference {reference_path} belongs to model version {reference.model_version!r}, "
            f"not {version!r}; pass the reference from the bundle of the served model"
        )
    start, end = _resolve_window(window_start, window_end, config)

    # Read the window's records; a missing log is an error, not an empty window.
    if not log_path.is_file():
        raise DataError(f"score log not found: {log_path}; point --log at the receiver's SQLite file")
    with ScoreLog(log_path) as log:
        window = log.read(start, end, version)
    logger.info(
        "drift window %s to %s: %d records of model version %s",
        _iso_time(start), _iso_time(end), len(window), version,
    )

    # Test the columns, unless the window is too small for any test.
    columns: dict[str, ColumnDrift] = {}
    skipped: dict[str, str] = {}
    snapshot = None
    if len(window) >= config.min_samples:
        columns, skipped, snapshot = _compare_columns(window, reference, config)
    if not columns:
        verdict: Verdict = "insufficient data"
        logger.warning(
            "insufficient data for a drift test: %d records in the window, min_samples=%d",
            len(window), config.min_samples,
        )
    else:
        verdict = "drift" if any(column.drift for column in columns.values()) else "no drift"

    # Write the report and the summary.
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = None
    if snapshot is not None:
        report_path = out_dir / REPORT_NAME
        # Evidently 0.7.23's Snapshot.save_html writes nothing when given a Path.
        snapshot.save_html(str(report_path))
    result = DriftResult(
        verdict=verdict,
        num_records=len(window),
        model_version=version,
        window_start=start,
        window_end=end,
        columns=columns,
        skipped_columns=skipped,
        summary_path=out_dir / SUMMARY_NAME,
        report_path=report_path,
    )
    # allow_nan=False makes a NaN that slipped through an error instead of invalid JSON.
    result.summary_path.write_text(json.dumps(result.summary(), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    _log_to_mlflow(result, config, tracking or TrackingConfig(), profile, root)
    logger.info(
        "drift verdict for model version %s: %s (%s)",
        version, verdict, ", ".join(f"{name} {c.method}={c.value:.4g}" for name, c in columns.items()) or "no tests",
    )
    return result
