"""Tests of the score log (SQLite in WAL mode) and of the KServe payload receiver."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from crossrank.errors import DataError
from crossrank.monitoring.receiver import (
    MAX_BODY_BYTES,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    ReceiverServer,
    make_receiver,
)
from crossrank.monitoring.score_log import (
    ScoreLog,
    ScoreRecord,
    count_missing_attributes,
    count_query_tokens,
)


def _record(time: float, item_id: str = "100001", score: float = 0.5, version: str = "v1") -> ScoreRecord:
    return ScoreRecord(time=time, model_version=version, query="Angle  Bracket", item_id=item_id, score=score)


# --- score log ---------------------------------------------------------------------


def test_append_read_roundtrip(tmp_path: Path) -> None:
    with ScoreLog(tmp_path / "scores.db") as log:
        stored = log.append(
            [
                ScoreRecord(
                    10.0, "v1", "  Deck   SCREWS ", "100002", 0.25, query_num_tokens=2, num_missing_attributes=1
                ),
                _record(11.0),
            ]
        )
        frame = log.read()

    assert stored == 2
    assert list(frame.columns) == [
        "time", "model_version", "query", "item_id", "score", "query_num_tokens", "num_missing_attributes"
    ]
    assert frame["query"].tolist() == ["deck screws", "angle bracket"]
    assert frame["score"].tolist() == [0.25, 0.5]
    assert frame["query_num_tokens"].dtype == "Int64"
    assert frame["query_num_tokens"].tolist()[0] == 2
    assert pd.isna(frame["query_num_tokens"].iloc[1])
    assert frame["num_missing_attributes"].tolist()[0] == 1


def test_read_filters_window_and_version(tmp_path: Path) -> None:
    with ScoreLog(tmp_path / "scores.db") as log:
        log.append([_record(float(t)) for t in range(10)] + [_record(5.0, version="v2")])

        window = log.read(start=3.0, end=6.0)
        v1_window = log.read(start=3.0, end=6.0, model_version="v1")
        assert log.count() == 11

    assert window["time"].tolist() == [3.0, 4.0, 5.0, 5.0]
    assert v1_window["time"].tolist() == [3.0, 4.0, 5.0]
    assert set(v1_window["model_version"]) == {"v1"}


def test_append_rejects_invalid_batch(tmp_path: Path) -> None:
    with ScoreLog(tmp_path / "scores.db") as log:
        with pytest.raises(DataError) as raised:
            log.append([_record(1.0), _record(2.0, item_id="100009", score=float("nan"))])
        count = log.count()

    assert str(raised.value) == "invalid score record at position 1 (item_id '100009'): score must be finite, got nan"
    assert count == 0


def test_schema_version_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "scores.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 7")
    connection.close()

    with pytest.raises(DataError) as raised:
        ScoreLog(path)

    assert str(raised.value) == (
        f"score log {path} has schema version 7, but this crossrank reads version 1; "
        "use a new log file or a matching crossrank version"
    )


def test_closed_log_raises(tmp_path: Path) -> None:
    log = ScoreLog(tmp_path / "scores.db")
    log.close()

    with pytest.raises(DataError, match="is closed"):
        log.count()


def test_log_uses_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "scores.db"
    ScoreLog(path).close()

    connection = sqlite3.connect(path)
    mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()

    assert mode == "wal"


def test_count_helpers() -> None:
    assert count_query_tokens("  Angle   Bracket 2in ") == 3
    assert count_query_tokens("") == 0
    assert count_missing_attributes({"product_type": "Screw", "brand": "", "color": None}) == 3
    assert count_missing_attributes({"product_type": "a", "brand": "b", "color": "c", "gender": "d"}) == 0


def test_concurrent_writers_and_reader(tmp_path: Path) -> None:
    num_writers, num_batches, batch_size = 4, 40, 10
    log = ScoreLog(tmp_path / "scores.db")
    errors: list[BaseException] = []
    partial_reads: list[int] = []
    done = threading.Event()

    def write(writer: int) -> None:
        try:
            for batch in range(num_batches):
                log.append(
                    [_record(float(batch), item_id=f"w{writer}-b{batch}-r{row}") for row in range(batch_size)]
                )
        except BaseException as err:  # handed to the main thread, which fails the test
            errors.append(err)

    def read() -> None:
        while not done.is_set():
            num_rows = len(log.read())
            if num_rows % batch_size:
                partial_reads.append(num_rows)

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(writer,)) for writer in range(num_writers)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    frame = log.read()
    log.close()

    expected = {
        f"w{writer}-b{batch}-r{row}"
        for writer in range(num_writers)
        for batch in range(num_batches)
        for row in range(batch_size)
    }
    assert errors == []
    assert partial_reads == []
    assert len(frame) == len(expected)
    assert set(frame["item_id"]) == expected


_WRITER_SCRIPT = """
import sys
from crossrank.monitoring.score_log import ScoreLog, ScoreRecord

log = ScoreLog(sys.argv[1])
batch = 0
while True:
    log.append([ScoreRecord(float(batch), "v1", "q", f"b{batch}-r{row}", 0.5) for row in range(25)])
    print(f"committed {batch}", flush=True)
    batch += 1
"""


def test_records_survive_kill(tmp_path: Path) -> None:
    path = tmp_path / "scores.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        reported = [writer.stdout.readline() for _ in range(5)]
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()

    with ScoreLog(path) as log:
        frame = log.read()

    assert writer.returncode == -signal.SIGKILL
    assert reported == [f"committed {batch}\n" for batch in range(5)]
    # Batches committed after the fifth report may be there too, but only whole ones.
    assert len(frame) >= 5 * 25
    assert len(frame) % 25 == 0
    assert {f"b{batch}-r{row}" for batch in range(5) for row in range(25)} <= set(frame["item_id"])


# --- receiver ----------------------------------------------------------------------


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[ReceiverServer]:
    log = ScoreLog(tmp_path / "scores.db")
    server = make_receiver("127.0.0.1", 0, log)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    log.close()


def _post(server: ReceiverServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _event_headers(event_type: str = RESPONSE_TYPE, event_id: str = "0009174a") -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-type": event_type,
        "ce-source": "http://localhost:9081/",
        "ce-time": "2026-03-02T10:15:30.123456789Z",
        "ce-inferenceservicename": "crossrank",
        "Content-Type": "application/json",
    }


# The shape of the predictor's V1 prediction, with the optional count of one result.
_RERANK = {
    "model_name": "crossrank-reranker",
    "model_version": "v7",
    "query": "Deck  Screws",
    "results": [
        {
            "item_id": "100001",
            "index": 0,
            "score": 2.5,
            "rank": 1,
            "source": "token_store",
            "num_missing_attributes": 1,
        },
        {"item_id": "100002", "index": 1, "score": -0.75, "rank": 2, "source": "cache"},
    ],
}


def test_receiver_stores_response(receiver: ReceiverServer) -> None:
    status, reply = _post(receiver, json.dumps(_RERANK).encode(), _event_headers())
    frame = receiver.log.read()

    assert status == 202
    assert reply == {"num_records": 2}
    assert frame["item_id"].tolist() == ["100001", "100002"]
    assert frame["score"].tolist() == [2.5, -0.75]
    assert frame["query"].tolist() == ["deck screws", "deck screws"]
    assert frame["model_version"].tolist() == ["v7", "v7"]
    assert frame["query_num_tokens"].tolist() == [2, 2]
    assert frame["num_missing_attributes"].tolist()[0] == 1
    assert pd.isna(frame["num_missing_attributes"].iloc[1])
    # ce-time 2026-03-02T10:15:30.123456789Z, cut to microseconds.
    assert frame["time"].tolist() == [1772446530.123456, 1772446530.123456]


def test_receiver_skips_unscored_items(receiver: ReceiverServer) -> None:
    prediction = {
        **_RERANK,
        "results": [
            {"item_id": None, "index": 0, "score": 0.25, "rank": 1, "source": "text"},
            {"item_id": "100404", "index": 1, "score": None, "rank": None, "error": "item not found"},
        ],
    }

    status, reply = _post(receiver, json.dumps({"predictions": [prediction]}).encode(), _event_headers())
    frame = receiver.log.read()

    assert status == 202
    assert reply == {"num_records": 1}
    assert frame["item_id"].tolist() == [""]
    assert frame["score"].tolist() == [0.25]


def test_receiver_accepts_v1_predictions(receiver: ReceiverServer) -> None:
    second = {**_RERANK, "query": "angle bracket", "query_num_tokens": 5}
    body = json.dumps({"predictions": [_RERANK, second]}).encode()

    status, reply = _post(receiver, body, _event_headers())
    frame = receiver.log.read()

    assert status == 202
    assert reply == {"num_records": 4}
    assert frame["query_num_tokens"].tolist() == [2, 2, 5, 5]


def test_receiver_accepts_structured_event(receiver: ReceiverServer) -> None:
    envelope = {
        "specversion": "1.0",
        "id": "structured-1",
        "type": RESPONSE_TYPE,
        "source": "http://localhost:9081/",
        "datacontenttype": "application/json",
        "data": _RERANK,
    }

    status, reply = _post(
        receiver, json.dumps(envelope).encode(), {"Content-Type": "application/cloudevents+json"}
    )

    assert status == 202
    assert reply == {"num_records": 2}
    assert receiver.log.count() == 2


def test_receiver_ignores_request_event(receiver: ReceiverServer) -> None:
    body = json.dumps({"query": "deck screws", "item_ids": ["100001"]}).encode()

    status, reply = _post(receiver, body, _event_headers(REQUEST_TYPE))

    assert status == 202
    assert reply == {"num_records": 0}
    assert receiver.log.count() == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b'{"a": 1}', {"Content-Type": "application/json"}, 400, "not a CloudEvent: "),
        (b"{not json", _event_headers(), 400, "response body is not JSON: "),
        (b'{"a": 1}', _event_headers("com.example.other"), 400, "unsupported ce-type 'com.example.other'"),
        (b'{"query": "q", "results": []}', _event_headers(), 422, "response.model_version must be a non-empty string"),
        (
            b'{"model_version": "v1", "query": "q", "results": [{"item_id": "1", "score": NaN}]}',
            _event_headers(),
            422,
            "response.results[0].score must be a finite number, got nan",
        ),
        (b'{"predictions": [17]}', _event_headers(), 422, "predictions[0] must be a JSON object, got int"),
    ],
    ids=["no-ce-headers", "body-not-json", "unknown-type", "no-model-version", "nan-score", "bad-prediction"],
)
def test_receiver_rejects_malformed_event(
    receiver: ReceiverServer, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    rejected_status, reply = _post(receiver, body, headers)
    # The server keeps serving after a rejection.
    accepted_status, _ = _post(receiver, json.dumps(_RERANK).encode(), _event_headers())

    assert rejected_status == status
    assert reply["error"].startswith(message)
    assert accepted_status == 202
    assert receiver.log.count() == 2


def test_receiver_health_endpoint(receiver: ReceiverServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", receiver.server_address[1], timeout=10)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()

    assert response.status == 200
    assert body == {"status": "ok"}


def test_receiver_rejects_oversized_body(receiver: ReceiverServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", receiver.server_address[1], timeout=10)
    # Only the header is sent; the receiver replies without reading a body.
    connection.putrequest("POST", "/")
    for name, value in _event_headers().items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()

    assert response.status == 413
    assert body == {"error": f"body of {MAX_BODY_BYTES + 1} bytes exceeds {MAX_BODY_BYTES}"}


_SERVE_SCRIPT = """
import logging, sys
from crossrank.monitoring.receiver import serve_receiver

logging.basicConfig(level=logging.INFO)
serve_receiver("127.0.0.1", int(sys.argv[1]), sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_receiver_stops_on_sigterm(tmp_path: Path) -> None:
    port, path = _free_port(), tmp_path / "scores.db"
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE_SCRIPT, str(port), str(path)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("POST", "/", body=json.dumps(_RERANK).encode(), headers=_event_headers())
                status = connection.getresponse().status
                connection.close()
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    with ScoreLog(path) as log:
        count = log.count()

    assert status == 202
    assert server.returncode == 0
    assert "score receiver stopped" in stderr
    assert count == 2
