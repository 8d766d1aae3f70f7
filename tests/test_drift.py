"""Tests of the drift job: verdicts on real-looking score streams, NaN handling, report and CronJob."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from kubernetes.client import ApiClient
from PIL import Image

from crossrank.config import MonitorConfig
from crossrank.errors import DataError
from crossrank.monitoring.drift import DriftResult, load_reference, run_drift
from crossrank.monitoring.score_log import ScoreLog, ScoreRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
WINDOW = {"window_start": 0.0, "window_end": 1_000_000.0}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store per module, so MLflow creates its tables once.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def tracking_env(monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("CROSSRANK_PARENT_RUN_ID", raising=False)


def _served_sample(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    # Beta(2, 5) looks like the sigmoid scores of a re-ranker: most items are weak
    # matches, a few are strong. Queries have 1 to 8 tokens, items miss 0 to 4 attributes.
    return {
        "score": rng.beta(2.0, 5.0, size),
        "query_num_tokens": rng.integers(1, 9, size),
        "num_missing_attributes": rng.choice(5, size, p=[0.6, 0.2, 0.1, 0.06, 0.04]),
    }


def _write_reference(path: Path, sample: dict[str, np.ndarray], version: str = "v1") -> Path:
    path.write_text(
        json.dumps(
            {
                "model_version": version,
                "scores": sample["score"].tolist(),
                "teacher_scores": (sample["score"] * 4.0 - 2.0).tolist(),
                "query_num_tokens": sample["query_num_tokens"].tolist(),
                "num_missing_attributes": sample["num_missing_attributes"].tolist(),
            }
        ),
        encoding="utf-8",
    )
    return path


def _write_log(path: Path, sample: dict[str, np.ndarray], version: str = "v1", with_counts: bool = True) -> Path:
    records = [
        ScoreRecord(
            time=1000.0 + position,
            model_version=version,
            query="deck screws",
            item_id=f"{100000 + position}",
            score=float(score),
            query_num_tokens=int(sample["query_num_tokens"][position]) if with_counts else None,
            num_missing_attributes=int(sample["num_missing_attributes"][position]) if with_counts else None,
        )
        for position, score in enumerate(sample["score"])
    ]
    with ScoreLog(path) as log:
        log.append(records)
    return path


def _run(tmp_path: Path, current: dict[str, np.ndarray], reference: dict[str, np.ndarray], **options) -> DriftResult:
    config = options.pop("config", MonitorConfig())
    log = _write_log(tmp_path / "scores.db", current, with_counts=options.pop("with_counts", True))
    reference_path = _write_reference(tmp_path / "score_reference.json", reference)
    return run_drift(log, reference_path, config, out_dir=tmp_path / "drift", **WINDOW, **options)


def _assert_finite(result: DriftResult) -> None:
    for name, column in result.columns.items():
        assert math.isfinite(column.value), f"{name}: {column.value}"


def test_same_distribution_no_drift(tmp_path: Path) -> None:
    reference = _served_sample(np.random.default_rng(13), 600)

    result = _run(tmp_path, reference, reference)
    summary = json.loads((tmp_path / "drift" / "drift_summary.json").read_text())

    assert result.verdict == "no drift"
    assert result.exit_code == 0
    assert result.num_records == 600
    assert result.model_version == "v1"
    assert {name: (c.method, c.value, c.drift) for name, c in result.columns.items()} == {
        "score": ("ks", 1.0, False),
        "query_num_tokens": ("ks", 1.0, False),
        "num_missing_attributes": ("ks", 1.0, False),
    }
    assert summary == result.summary()
    assert summary["verdict"] == "no drift"
    assert summary["columns"]["score"] == {
        "method": "ks",
        "value": 1.0,
        "threshold": 0.05,
        "drift": False,
        "num_current": 600,
        "num_reference": 600,
        "fallback": False,
    }
    assert (tmp_path / "drift" / "drift_report.html").stat().st_size > 100_000


def test_fresh_sample_no_drift(tmp_path: Path) -> None:
    reference = _served_sample(np.random.default_rng(13), 800)
    current = _served_sample(np.random.default_rng(14), 400)

    result = _run(tmp_path, current, reference)

    assert result.verdict == "no drift"
    assert all(column.value > 0.05 for column in result.columns.values())


def test_shifted_stream_drift(tmp_path: Path) -> None:
    reference = _served_sample(np.random.default_rng(13), 800)
    current = _served_sample(np.random.default_rng(14), 400)
    # A model or traffic change that pushes scores up: Beta(3, 4) has mean 0.43, not 0.29.
    current["score"] = np.random.default_rng(15).beta(3.0, 4.0, 400)

    result = _run(tmp_path, current, reference)

    assert result.verdict == "drift"
    assert result.exit_code == 1
    assert result.columns["score"].drift is True
    assert result.columns["score"].value < 1e-6
    assert result.columns["query_num_tokens"].drift is False
    assert json.loads(result.summary_path.read_text())["verdict"] == "drift"


def test_drift_logged_to_mlflow(tmp_path: Path, mlflow_uri: str) -> None:
    reference = _served_sample(np.random.default_rng(13), 300)
    current = _served_sample(np.random.default_rng(14), 200)
    current["score"] = current["score"] + 0.2

    result = _run(tmp_path, current, reference)
    runs = mlflow.MlflowClient(mlflow_uri).search_runs(
        [mlflow.get_experiment_by_name("crossrank").experiment_id],
        filter_string="tags.`mlflow.runName` = 'monitor_drift'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )

    assert result.verdict == "drift"
    assert runs[0].data.tags["crossrank.model_version"] == "v1"
    assert runs[0].data.metrics["drift_detected"] == 1.0
    assert runs[0].data.metrics["num_records"] == 200.0
    assert runs[0].data.metrics["drift.score.value"] == result.columns["score"].value
    assert runs[0].data.metrics["drift.score.drift"] == 1.0


@pytest.mark.parametrize(("shift", "verdict"), [(0.0, "no drift"), (0.05, "drift")])
def test_large_sample_uses_wasserstein(tmp_path: Path, shift: float, verdict: str) -> None:
    reference = _served_sample(np.random.default_rng(13), 1500)
    current = _served_sample(np.random.default_rng(14), 1200)
    current["score"] = current["score"] + shift

    result = _run(tmp_path, current, reference)

    assert result.columns["score"].method == "wasserstein"
    assert result.columns["score"].threshold == 0.1
    assert result.verdict == verdict


def test_insufficient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = _served_sample(np.random.default_rng(13), 600)
    current = _served_sample(np.random.default_rng(14), 99)

    with caplog.at_level(logging.WARNING, logger="crossrank.monitoring.drift"):
        result = _run(tmp_path, current, reference)

    assert result.verdict == "insufficient data"
    assert result.exit_code == 0
    assert result.num_records == 99
    assert result.columns == {}
    assert result.report_path is None
    assert not (tmp_path / "drift" / "drift_report.html").exists()
    assert json.loads(result.summary_path.read_text())["verdict"] == "insufficient data"
    assert "insufficient data for a drift test: 99 records in the window, min_samples=100" in caplog.messages


def test_missing_counts_skip_columns(tmp_path: Path) -> None:
    reference = _served_sample(np.random.default_rng(13), 600)

    result = _run(tmp_path, reference, reference, with_counts=False)

    assert result.verdict == "no drift"
    assert list(result.columns) == ["score"]
    assert result.skipped_columns == {
        "query_num_tokens": "0 values in the window, fewer than min_samples=100",
        "num_missing_attributes": "0 values in the window, fewer than min_samples=100",
    }


@pytest.mark.parametrize(
    ("reference_kind", "verdict"), [("constant", "no drift"), ("varied", "drift")]
)
def test_constant_stream_finite(tmp_path: Path, reference_kind: str, verdict: str) -> None:
    constant = {
        "score": np.full(200, 0.5),
        "query_num_tokens": np.full(200, 2),
        "num_missing_attributes": np.zeros(200, dtype=int),
    }
    reference = constant if reference_kind == "constant" else _served_sample(np.random.default_rng(13), 600)

    result = _run(tmp_path, constant, reference)
    summary_text = result.summary_path.read_text()

    assert result.verdict == verdict
    _assert_finite(result)
    assert "NaN" not in summary_text
    assert all(not column.fallback for column in result.columns.values())


def test_nan_method_falls_back(tmp_path: Path) -> None:
    # scipy's t-test of two constant samples returns NaN (0 / 0), and so does Evidently.
    constant = {
        "score": np.full(200, 0.5),
        "query_num_tokens": np.full(200, 2),
        "num_missing_attributes": np.zeros(200, dtype=int),
    }
    shifted = {**constant, "score": np.full(200, 0.6)}
    config = MonitorConfig(small_method="t_test")

    same = _run(tmp_path / "same", constant, constant, config=config)
    moved = _run(tmp_path / "moved", shifted, constant, config=config)

    assert same.verdict == "no drift"
    assert same.columns["score"].fallback is True
    assert (same.columns["score"].method, same.columns["score"].value) == ("wasserstein", 0.0)
    # Two different constants give a t-test p-value of 0, which needs no fallback.
    assert moved.verdict == "drift"
    assert moved.columns["score"].fallback is False
    assert (moved.columns["score"].method, moved.columns["score"].value) == ("t_test", 0.0)
    _assert_finite(same)
    _assert_finite(moved)


def test_reference_version_mismatch(tmp_path: Path) -> None:
    sample = _served_sample(np.random.default_rng(13), 200)
    log = _write_log(tmp_path / "scores.db", sample, version="v2")
    reference_path = _write_reference(tmp_path / "score_reference.json", sample, version="v1")

    with pytest.raises(DataError) as raised:
        run_drift(log, reference_path, MonitorConfig(), model_version="v2", out_dir=tmp_path / "drift", **WINDOW)

    assert str(raised.value) == (
        f"score reference {reference_path} belongs to model version 'v1', not 'v2'; "
        "pass the reference from the bundle of the served model"
    )


def test_missing_log_raises(tmp_path: Path) -> None:
    reference_path = _write_reference(tmp_path / "ref.json", _served_sample(np.random.default_rng(13), 10))

    with pytest.raises(DataError) as raised:
        run_drift(tmp_path / "absent.db", reference_path, MonitorConfig(), out_dir=tmp_path / "drift", **WINDOW)

    assert str(raised.value) == (
        f"score log not found: {tmp_path / 'absent.db'}; point --log at the receiver's SQLite file"
    )
    assert not (tmp_path / "absent.db").exists()


def test_reference_without_scores(tmp_path: Path) -> None:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"model_version": "v1", "scores": []}))

    with pytest.raises(DataError) as raised:
        load_reference(path)

    assert str(raised.value) == f"score reference {path} has no `scores`; regenerate it with the gate stage"


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not found; install it with `apt-get install -y --no-install-recommends chromium`")
    reference = _served_sample(np.random.default_rng(13), 600)
    current = _served_sample(np.random.default_rng(14), 300)
    result = _run(tmp_path, current, reference)
    screenshot = tmp_path / "report.png"

    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,2000",
            result.report_path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    num_colors = len(np.unique(pixels, axis=0))
    non_white_share = float((pixels.min(axis=1) < 240).mean())

    # A blank page or one whose scripts failed is one or two colors; the plotted report
    # has hundreds (anti-aliased lines, fills, text).
    assert num_colors > 200
    assert non_white_share > 0.05


def _render_monitoring() -> list[dict]:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO_ROOT / "monitoring")], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return list(yaml.safe_load_all(rendered))


class _JsonResponse:
    """The one attribute of a REST response that ApiClient.deserialize reads."""

    def __init__(self, document: dict) -> None:
        self.data = json.dumps(document)


def test_cronjob_renders_valid() -> None:
    documents = _render_monitoring()

    assert [document["kind"] for document in documents] == ["CronJob"]
    cronjob = documents[0]
    # The generated models of the Kubernetes Python client reject missing required
    # fields; a field they drop on the round trip is misspelled or unknown.
    client = ApiClient()
    parsed = client.deserialize(_JsonResponse(cronjob), "V1CronJob")
    assert client.sanitize_for_serialization(parsed) == cronjob

    assert cronjob["apiVersion"] == "batch/v1"
    assert cronjob["metadata"]["namespace"] == "monitoring"
    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["image"] == "crossrank:0.1.0"
    assert container["command"][:3] == ["crossrank", "monitor", "drift"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert [variable["name"] for variable in container["env"]] == ["MLFLOW_TRACKING_URI"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    claims = {volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]}
    assert claims["score-log"] == "crossrank-score-log"
    assert container["command"][container["command"].index("--log") + 1].startswith(mounts["score-log"] + "/")
