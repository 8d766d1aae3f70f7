"""HTTP receiver for KServe's payload logger: stores served scores in the score log.

KServe's logger posts every request and every response of an InferenceService as a
CloudEvent over HTTP (binary content mode: `ce-*` headers, JSON body). The two events of
one inference share `ce-id`; `ce-type` is `org.kubeflow.serving.inference.request` or
`org.kubeflow.serving.inference.response`. The receiver parses both binary and
structured events with the `cloudevents` package and stores one score record per result
of each response that is a crossrank re-rank response:

    {"model_version": str, "query": str, "query_num_tokens": int (optional),
     "results": [{"item_id": str | null, "score": float | null, "rank": int,
                  "num_missing_attributes": int (optional)}, ...]}

or a V1 protocol response `{"predictions": [<re-rank response>, ...]}`. Other keys
are ignored. Without `query_num_tokens` the receiver counts the whitespace tokens of
the normalized query. A result with a null score is an item the server could not
score, so it is skipped. A null `item_id` is an item sent as text only, stored with
item_id "". V2 protocol responses are rejected, because their body has no query.

Status codes:
- 202: a response was stored, or a request event was ignored.
- 400: the event is not a CloudEvent, has another `ce-type`, or its body is not JSON.
- 411 or 413: Content-Length is missing, or the body exceeds `MAX_BODY_BYTES`.
- 422: the response is not a re-rank response.
- 503: the score log cannot be written, so the logger may retry.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sqlite3
import threading
import time
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import from_http

from crossrank.errors import DataError
from crossrank.monitoring.score_log import ScoreLog, ScoreRecord, count_query_tokens

logger = logging.getLogger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
MAX_BODY_BYTES = 16 * 1024 * 1024


class EventError(DataError):
    """Report an event that the receiver rejects, with the HTTP status of the reply."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_count(container: dict[str, Any], key: str, where: str) -> int | None:
    value = container.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where}.{key} must be an integer >= 0, got {value!r}")
    return value


def _records_from_rerank(response: Any, served_at: float, where: str) -> list[ScoreRecord]:
    if not isinstance(response, dict):
        raise EventError(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"{where} must be a JSON object, got {type(response).__name__}"
        )
    model_version, query, results = response.get("model_version"), response.get("query"), response.get("results")
    if not isinstance(model_version, str) or not model_version:
        raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where}.model_version must be a non-empty string")
    if not isinstance(query, str):
        raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where}.query must be a string")
    if not isinstance(results, list):
        raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where}.results must be a list")
    query_num_tokens = _optional_count(response, "query_num_tokens", where)
    if query_num_tokens is None:
        query_num_tokens = count_query_tokens(query)

    records = []
    for position, result in enumerate(results):
        at = f"{where}.results[{position}]"
        if not isinstance(result, dict):
            raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{at} must be a JSON object")
        item_id, score = result.get("item_id"), result.get("score")
        if score is None:
            continue
        if item_id is None:
            item_id = ""
        if not isinstance(item_id, str):
            raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{at}.item_id must be a string or null, got {item_id!r}")
        if not _is_number(score) or not math.isfinite(score):
            raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{at}.score must be a finite number, got {score!r}")
        records.append(
            ScoreRecord(
                time=served_at,
                model_version=model_version,
                query=query,
                item_id=item_id,
                score=float(score),
                query_num_tokens=query_num_tokens,
                num_missing_attributes=_optional_count(result, "num_missing_attributes", at),
            )
        )
    return records


def records_from_response(payload: Any, served_at: float) -> list[ScoreRecord]:
    """Turn the body of a response event into score records.

    Accepts a re-rank response or a V1 `{"predictions": [...]}` of re-rank responses
    (format in the module docstring). Raises EventError (status 422) naming the first
    invalid field.
    """
    if isinstance(payload, dict) and "predictions" in payload:
        predictions = payload["predictions"]
        if not isinstance(predictions, list):
            raise EventError(HTTPStatus.UNPROCESSABLE_ENTITY, "predictions must be a list of re-rank responses")
        return [
            record
            for position, prediction in enumerate(predictions)
            for record in _records_from_rerank(prediction, served_at, f"predictions[{position}]")
        ]
    return _records_from_rerank(payload, served_at, "response")


def _event_time(value: Any, received_at: float) -> float:
    """Return the CloudEvent `time` in epoch seconds, or `received_at` without a usable one."""
    if not isinstance(value, str):
        return received_at
    try:
        # Python 3.11 accepts "Z" and more than six fractional digits (Go's RFC 3339 nanoseconds).
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return received_at
    # A time without an offset cannot be placed in UTC; the arrival time is close enough.
    return parsed.timestamp() if parsed.tzinfo is not None else received_at


class _WarningLimiter:
    """Log at most one WARNING per interval and count the ones left out."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = -math.inf
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        logger.warning(message + " (%d similar warnings suppressed)", *args, suppressed)


class _Handler(BaseHTTPRequestHandler):
    server: ReceiverServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/healthz", "/readyz"):
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; POST CloudEvents to /"})

    def do_POST(self) -> None:
        received_at = time.time()
        try:
            body = self._read_body()
            status, reply = self.server.handle_event(dict(self.headers.items()), body, received_at)
        except EventError as err:
            self.server.warnings.warning(
                "rejected event %s from %s with %d: %s",
                self.headers.get("ce-id", "without ce-id"), self.client_address[0], err.status, err,
            )
            status, reply = err.status, {"error": str(err)}
        except Exception:
            # A bug must not cost the client its reply; the server goes on either way.
            logger.exception("handling event %s failed", self.headers.get("ce-id", "without ce-id"))
            status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the receiver's log"}
        self._reply(status, reply)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            # The body stays unread, so the connection cannot be reused.
            self.close_connection = True
            if not length.isdigit():
                raise EventError(HTTPStatus.LENGTH_REQUIRED, f"Content-Length header missing or invalid: {length!r}")
            raise EventError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes exceeds {MAX_BODY_BYTES}")
        return self.rfile.read(int(length))

    def _reply(self, status: HTTPStatus, reply: dict[str, Any]) -> None:
        body = json.dumps(reply).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes one line per request to stderr; keep it at DEBUG.
        logger.debug("%s %s", self.client_address[0], format % args)


class ReceiverServer(ThreadingHTTPServer):
    """HTTP server that stores score records from KServe response events in a ScoreLog."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], log: ScoreLog) -> None:
        super().__init__(address, _Handler)
        self.log = log
        self.warnings = _WarningLimiter()

    def handle_event(
        self, headers: dict[str, str], body: bytes, received_at: float
    ) -> tuple[HTTPStatus, dict[str, Any]]:
        """Parse one CloudEvent, store the records of a response and return the status and JSON reply."""
        try:
            # The identity unmarshaller leaves the body as bytes (str in structured
            # mode), so a body that is not JSON gets its own message below.
            event = from_http(headers, body, data_unmarshaller=lambda data: data)
        except CloudEventError as err:
            raise EventError(HTTPStatus.BAD_REQUEST, f"not a CloudEvent: {err}") from err

        if event["type"] == REQUEST_TYPE:
            return HTTPStatus.ACCEPTED, {"num_records": 0}
        if event["type"] != RESPONSE_TYPE:
            raise EventError(
                HTTPStatus.BAD_REQUEST,
                f"unsupported ce-type {event['type']!r}; expected {RESPONSE_TYPE!r} or {REQUEST_TYPE!r}",
            )
        try:
            payload = json.loads(event.data) if event.data else None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EventError(HTTPStatus.BAD_REQUEST, f"response body is not JSON: {err}") from err

        records = records_from_response(payload, _event_time(event.get("time"), received_at))
        try:
            self.log.append(records)
        except sqlite3.Error as err:
            logger.error(
                "score log %s: storing %d records of event %s failed: %s", self.log.path, len(records), event["id"], err
            )
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "score log unavailable; retry later"}
        return HTTPStatus.ACCEPTED, {"num_records": len(records)}


def make_receiver(host: str, port: int, log: ScoreLog) -> ReceiverServer:
    """Bind a receiver to host:port (0 picks a free port); call serve_forever to run it."""
    return ReceiverServer((host, port), log)


def serve_receiver(host: str, port: int, log_path: str | Path) -> None:
    """Run the receiver until SIGTERM or Ctrl-C, storing records in the SQLite file at log_path."""
    log = ScoreLog(log_path)
    server = make_receiver(host, port, log)
    if threading.current_thread() is threading.main_thread():
        # Kubernetes stops a pod with SIGTERM; shut down between requests. shutdown()
        # waits for serve_forever, so it must run on another thread than the handler.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    logger.info("score receiver listening on %s:%d, writing %s", host, server.server_address[1], log.path)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("score receiver interrupted")
    finally:
        server.server_close()
        log.close()
        logger.info("score receiver stopped")
