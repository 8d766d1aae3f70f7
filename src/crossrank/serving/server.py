"""Build and start KServe's ModelServer with the re-rank predictor: `crossrank serve`.

Routes (all from KServe's ModelServer): `POST /v1/models/NAME:predict`,
`POST /v2/models/NAME/infer`, `GET /v2/models/NAME` (metadata),
`GET /v1/models/NAME` and `GET /v2/health/ready` (readiness) and `GET /metrics`
(Prometheus text format, KServe's and crossrank's metrics).

Before KServe reads a POST body, `RequestBodyMiddleware` rejects bodies over
`max_body_bytes` (413), inflates `Content-Encoding: gzip` bodies within the same limit,
rejects V2 binary-extension bodies (415) and rejects JSON that does not parse (400,
naming the field for invalid Unicode). Bodies of KServe's JSON content types, or
without a content type, count as JSON, because KServe parses those as JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kserve
import orjson
from fastapi.responses import JSONResponse
from kserve.model_server import app
from kserve.protocol.dataplane import JSON_HEADERS
from pydantic import ValidationError

from crossrank.errors import ConfigError, CrossrankError
from crossrank.serving.predictor import (
    RequestError,
    RerankPredictor,
    ServingConfig,
    gunzip_limited,
    parse_json,
    serving_metrics,
)

logger = logging.getLogger(__name__)

# In a pod, ONNX Runtime's default of one thread per core counts the node's cores, not
# the CPU limit, so the manifests set the thread count through this variable.
INTRA_OP_THREADS_ENV = "CROSSRANK_INTRA_OP_THREADS"

# KServe's V2 binary extension: a JSON header of this length, then raw tensor bytes.
_BINARY_HEADER = b"inference-header-content-length"


async def _send_error(send: Any, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestBodyMiddleware:
    """ASGI middleware for POST bodies: size limit, gzip inflation and a JSON syntax check.

    The whole body is read here (at most `max_body_bytes`), so KServe's handlers get
    plain JSON with `Content-Encoding` removed and `Content-Length` set to the
    inflated size.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body, headers = await self._read(scope, receive)
        except RequestError as err:
            serving_metrics().rejected_requests.labels(str(err.status)).inc()
            logger.info("rejected %s %s with %d: %s", scope["method"], scope["path"], err.status, err.reason)
            await _send_error(send, err.status, err.reason)
            return

        scope = {**scope, "headers": headers}
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: dict[str, Any], receive: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(
                f"request body has {int(declared)} bytes, more than max_body_bytes={self.max_body_bytes}", 413
            )

        chunks = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError("client disconnected before sending the whole body", 400)
            chunks += message.get("body", b"")
            more = message.get("more_body", False)
            if len(chunks) > self.max_body_bytes:
                raise RequestError(f"request body has more than max_body_bytes={self.max_body_bytes} bytes", 413)
        body = bytes(chunks)

        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding == "gzip":
            body = gunzip_limited(body, self.max_body_bytes, "gzip request body")
        elif encoding != "identity":
            raise RequestError(f"Content-Encoding {encoding!r} is not supported; send gzip or identity", 415)

        # kserve 0.21 returns 500 (a KeyError) for some malformed binary-extension bodies.
        if _BINARY_HEADER in headers:
            raise RequestError(
                "the V2 binary data extension (Inference-Header-Content-Length) is not supported; "
                "send the tensors as JSON",
                415,
            )
        content_type = headers.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if content_type in JSON_HEADERS:
            parse_json(body, "request body")

        # A body without a content type was checked as JSON, so label it JSON: KServe's V2
        # route would otherwise take it for binary tensor data.
        replaced = (b"content-encoding", b"content-length", b"content-type")
        other_headers = [(name, value) for name, value in scope["headers"] if name not in replaced]
        content_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", headers.get(b"content-type", b"application/json")),
        ]
        return body, [*other_headers, *content_headers]


async def _request_error_handler(_: Any, err: RequestError) -> JSONResponse:
    # Client errors are logged at INFO, without the traceback KServe's own handler adds.
    serving_metrics().rejected_requests.labels(str(err.status)).inc()
    logger.info("rejected request with %d: %s", err.status, err.reason)
    return JSONResponse(status_code=err.status, content={"error": err.reason})


class _ModelServer(kserve.ModelServer):
    """KServe's ModelServer, listening on `host` instead of always on 0.0.0.0."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self) -> None:
        # kserve 0.21 builds the REST server's uvicorn config with host 0.0.0.0 in
        # start() and binds after setup_event_loop() returns, so the host set here wins.
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        super().setup_event_loop()


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `crossrank serve` options."""
    defaults = {name: info.default for name, info in ServingConfig.model_fields.items()}
    parser = argparse.ArgumentParser(
        prog="crossrank serve", description="Serve a model bundle with KServe's ModelServer."
    )

    # What to serve, and where.
    parser.add_argument("--model-dir", required=True, type=Path, help="model bundle folder")
    parser.add_argument("--model-name", default=None, help="model name in the URL (default: the bundle's model_name)")
    parser.add_argument("--token-store", type=Path, default=None, help="token store file built for this bundle")
    parser.add_argument("--score-log", type=Path, default=None, help="SQLite score log that every served score is appended to")
    parser.add_argument("--score-cache", type=Path, default=None, help="score cache file")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP port")

    # Scoring and request limits.
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="pairs per ONNX Runtime call")
    parser.add_argument(
        "--max-items", type=int, default=defaults["max_items"], help="max items per request, over all instances"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults["max_body_bytes"],
        help="max request body in bytes, before and after gzip decompression",
    )
    for field in ("query", "title", "attribute", "description"):
        name = f"max_{field}_chars"
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=defaults[name], help=f"max characters of one {field} text"
        )

    # argparse converts a string default with `type`, so an invalid variable fails like an invalid option.
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=os.environ.get(INTRA_OP_THREADS_ENV),
        help=f"ONNX Runtime threads (default: ${INTRA_OP_THREADS_ENV}, else one per physical core)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """Return the serving config that the parsed options describe; raise ConfigError for invalid values."""
    try:
        return ServingConfig(
            model_dir=args.model_dir,
            model_name=args.model_name,
            token_store=args.token_store,
            score_log=args.score_log,
            score_cache=args.score_cache,
            batch_size=args.batch_size,
            max_items=args.max_items,
            max_body_bytes=args.max_body_bytes,
            max_query_chars=args.max_query_chars,
            max_title_chars=args.max_title_chars,
            max_attribute_chars=args.max_attribute_chars,
            max_description_chars=args.max_description_chars,
            intra_op_threads=args.intra_op_threads,
        )
    except ValidationError as err:
        problems = "; ".join(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}" for error in err.errors())
        raise ConfigError(f"invalid serve options: {problems}") from err


def serve(config: ServingConfig, host: str = "0.0.0.0", http_port: int = 8080) -> None:
    """Load the predictor and run KServe's ModelServer until it is stopped (SIGTERM, SIGINT).

    Only the HTTP server runs (no gRPC) with one worker: scale with replicas, since
    each worker process would load its own copy of the model.
    """
    predictor = RerankPredictor(config)
    predictor.load()

    app.add_middleware(RequestBodyMiddleware, max_body_bytes=config.max_body_bytes)
    # Starlette picks the handler of the closest class in the exception's MRO, so this
    # one wins over KServe's InvalidInput handler for RequestError.
    app.add_exception_handler(RequestError, _request_error_handler)

    server = _ModelServer(host, http_port=http_port, enable_grpc=False, workers=1)
    logger.info("serving %s on http://%s:%d (metrics on /metrics)", predictor.name, host, http_port)
    server.start([predictor])


def main(argv: Sequence[str] | None = None) -> int:
    """Run `crossrank serve`; return 2 with the message for a bundle or store that cannot be loaded."""
    args = build_parser().parse_args(argv)
    # A no-op when the crossrank command line configured logging already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(config_from_args(args), host=args.host, http_port=args.http_port)
    except CrossrankError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
