"""Scores served by the real predictor reach the drift job, none missing."""

import json
import threading
from pathlib import Path

import pytest
from test_serving import products_of, serving_data, start_server, stop_server  # noqa: F401 (fixture)
from test_token_store import ServingData

from crossrank.bundle import load_bundle
from crossrank.config import MonitorConfig, TrackingConfig
from crossrank.monitoring.drift import run_drift
from crossrank.monitoring.score_log import ScoreLog, count_missing_attributes, count_query_tokens


def test_served_scores_reach_drift_job(serving_data: ServingData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    log_path = tmp_path / "scores.db"
    server = start_server(["--model-dir", str(serving_data.bundle), "--score-log", str(log_path)], tmp_path / "server.log")
    judgments = serving_data.judgments
    queries = judgments["query"].drop_duplicates().head(12).tolist()
    num_sent = 0
    errors: list[str] = []

    def send(chunk: list[str]) -> None:
        nonlocal num_sent
        for query in chunk:
            items = products_of(judgments[judgments["query"] == query])
            response = server.predict([{"query": query, "items": items}])
            if response.status_code != 200:
                errors.append(response.text)
            num_sent += len(items)

    try:
        # Two clients write while the drift job could be reading.
        threads = [threading.Thread(target=send, args=(queries[i::2],)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop_server(server)
    assert errors == []

    # The reference: the bundle's own scores of the same pairs, so no drift is expected.
    bundle = load_bundle(serving_data.bundle)
    sent = judgments[judgments["query"].isin(queries)]
    products = products_of(sent)
    reference = {
        "model_version": bundle.config.model_version,
        "scores": bundle.score(sent["query"].tolist(), products).tolist(),
        "teacher_scores": [0.5] * len(sent),
        "query_num_tokens": [count_query_tokens(q) for q in sent["query"]],
        "num_missing_attributes": [count_missing_attributes(p) for p in products],
    }
    (tmp_path / "reference.json").write_text(json.dumps(reference), encoding="utf-8")

    stored = ScoreLog(log_path).read(None, None, None)
    assert len(stored) == num_sent
    result = run_drift(
        log_path, tmp_path / "reference.json", MonitorConfig(min_samples=20), out_dir=tmp_path / "drift", tracking=TrackingConfig()
    )
    assert result.summary()["num_records"] == num_sent
    assert result.verdict == "no drift"
