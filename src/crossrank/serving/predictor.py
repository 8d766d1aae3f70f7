"""KServe predictor that re-ranks candidate items for a query with an ONNX model bundle.

V1, `POST /v1/models/NAME:predict`:

    {"instances": [{"query": "cordless drill",
                    "items": ["100095", {"item_id": "100283", "title": "...", "brand": "..."},
                              {"title": "text-only item", "color": "red"}]}]}

An item is an `item_id` string or an object with an optional `item_id` and the
product fields of the bundle's input spec (`title`, `product_type`, `brand`, `color`,
`gender` for the student). `{"instances_b64gz": "<base64 of gzip of the instances JSON
array>"}` is accepted in place of `instances`, and the server inflates bodies sent with
`Content-Encoding: gzip` before they get here. The response has one prediction per
instance:

    {"predictions": [{"model_name": ..., "model_version": ..., "query": ...,
                      "results": [{"item_id": "100283", "index": 1, "score": 0.93,
                                   "rank": 1, "source": "token_store"}, ...]}]}

`results` is sorted by score, highest first; `index` is the item's position in the
request, which identifies text-only items (their `item_id` is null). `source` names
where the product tokens came from: `cache` (a precomputed score, no model call),
`token_store` or `text`. Results scored by the model also carry
`num_missing_attributes`, which the monitoring receiver stores with the score.

V2, `POST /v2/models/NAME/infer`: BYTES inputs `query` (one element), `item_id` and/or
product fields (n elements each, and "" means absent), sent as JSON. Outputs, in input
order: `score` (FP32, NaN for an item that could not be scored, which JSON shows as
null), `rank` (INT32, 1 is best, 0 for an unscored item) and `error` (BYTES, "" when
scored). A request may name a subset in `outputs` and ask for binary outputs.

Item sources, in order: a cached score for (normalized query, item_id, model version);
the item's token ids from the token store; the product text sent with it. An item
with none of these gets a per-item error in the response, after the scored items
(V1: `"score": null, "rank": null, "error": "..."`). A request in which no item can
be scored is rejected with 422. Other invalid input is rejected with 400, and the
message names the field and the limit. A body over the size limit gets 413.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InferenceError, InvalidInput
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from crossrank.bundle import Bundle, load_bundle
from crossrank.ingest import normalize_query
from crossrank.monitoring.score_log import ScoreLog, ScoreRecord, count_query_tokens
from crossrank.serving.score_cache import ScoreCache
from crossrank.serving.token_store import TokenStore, TokenStoreError

logger = logging.getLogger(__name__)

Source = Literal["cache", "token_store", "text"]
OUTPUT_NAMES = ("score", "rank", "error")


class ServingConfig(BaseModel):
    """Bundle, stores and request limits of one predictor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path
    model_name: str | None = Field(default=None, description="name in the URL (None: the bundle's model_name)")
    token_store: Path | None = None
    score_cache: Path | None = None
    score_log: Path | None = Field(default=None, description="SQLite score log that every served score is appended to")
    batch_size: int = Field(default=50, ge=1, le=1024, description="pairs per ONNX Runtime call")
    max_items: int = Field(default=500, ge=1, description="items per request, over all instances")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="request body, after gzip and base64 decoding")
    max_query_chars: int = Field(default=256, ge=1)
    max_title_chars: int = Field(default=512, ge=1)
    max_attribute_chars: int = Field(default=256, ge=1, description="product_type, brand, color, gender, extra fields")
    max_description_chars: int = Field(default=5000, ge=1)
    max_item_id_chars: int = Field(default=128, ge=1)
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime threads (None: one per physical core)"
    )


class RequestError(InvalidInput):
    """Report client input that cannot be served; `status` is the HTTP status of the response."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class ServingMetrics:
    """Prometheus metrics of the predictor, in the default registry that KServe serves on /metrics."""

    step_seconds: Histogram
    batch_size: Histogram
    model_batches: Counter
    pairs: Counter
    cache_lookups: Counter
    served_scores: Histogram
    item_errors: Counter
    rejected_requests: Counter


@functools.cache
def serving_metrics() -> ServingMetrics:
    """Create the metrics on first use, once per process, because the registry rejects a second registration."""
    latency_buckets = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    return ServingMetrics(
        step_seconds=Histogram(
            "crossrank_step_seconds",
            "Time per request in each step: cache, token_store, tokenize, model, total",
            ["model_name", "step"],
            buckets=latency_buckets,
        ),
        batch_size=Histogram(
            "crossrank_batch_size",
            "Pairs per ONNX Runtime call",
            ["model_name"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
        ),
        model_batches=Counter("crossrank_model_batches", "ONNX Runtime calls", ["model_name"]),
        pairs=Counter("crossrank_pairs", "Scored pairs by the source of the score or tokens", ["model_name", "source"]),
        cache_lookups=Counter(
            "crossrank_score_cache_lookups", "Score cache lookups of items with an item_id", ["model_name", "result"]
        ),
        served_scores=Histogram(
            "crossrank_served_score",
            "Served scores",
            ["model_name"],
            buckets=tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)),  # 0.05, 0.10, ..., 0.95
        ),
        item_errors=Counter("crossrank_item_errors", "Items answered with a per-item error", ["model_name"]),
        rejected_requests=Counter("crossrank_rejected_requests", "Requests rejected with a 4xx status", ["status"]),
    )


# Request payload decoding, shared with the server's body middleware.


def gunzip_limited(data: bytes, max_bytes: int, label: str) -> bytes:
    """Inflate gzip data, raising RequestError 413 as soon as it exceeds `max_bytes`."""
    output = bytearray()
    remaining = data
    # A gzip stream may have several members, and each needs its own decompressor.
    while remaining:
        inflater = zlib.decompressobj(wbits=31)
        try:
            output += inflater.decompress(remaining, max_bytes + 1 - len(output))
        except zlib.error as err:
            raise RequestError(f"{label} is not valid gzip data ({err})") from err
        if len(output) > max_bytes:
            raise RequestError(f"{label} inflates to more than max_body_bytes={max_bytes} bytes", status=413)
        if not inflater.eof:
            raise RequestError(f"{label} is truncated gzip data")
        remaining = inflater.unused_data
    return bytes(output)


def _find_invalid_text(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return path, f"U+{ord(value[err.start]):04X}"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _find_invalid_text(key, path) or _find_invalid_text(item, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(value, list):
        for position, item in enumerate(value):
            found = _find_invalid_text(item, f"{path}[{position}]")
            if found:
                return found
    return None


def parse_json(data: bytes, label: str, path: str = "") -> Any:
    """Parse UTF-8 JSON, raising RequestError that names the position or the field with invalid text.

    orjson rejects lone surrogates such as `"\\ud800"`, but Python's json module accepts
    them, so it serves only to find the field that contains one.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as decode_err:
            raise RequestError(
                f"{label} is not valid UTF-8 (invalid byte at position {decode_err.start}); send JSON encoded as UTF-8"
            ) from err
        # Python's parser recurses once per nesting level, so a body nested deeper than
        # orjson accepts can raise RecursionError here.
        try:
            found = _find_invalid_text(json.loads(text), path)
        except (json.JSONDecodeError, RecursionError):
            raise RequestError(f"{label} is not valid JSON: {err}") from err
        if found is not None:
            location = found[0] or label
            raise RequestError(
                f"{location} is not valid Unicode: it contains the lone surrogate {found[1]}; send valid UTF-8 text"
            ) from err
        raise RequestError(f"{label} is not valid JSON: {err}") from err


# Parsed requests.


@dataclass(frozen=True)
class Item:
    """One candidate: its position in the request, id and product text (None when none was sent)."""

    index: int
    item_id: str | None
    product: dict[str, str] | None


@dataclass(frozen=True)
class RerankInstance:
    """One query with its candidates."""

    query: str
    items: list[Item]


@dataclass(frozen=True)
class RerankRequest:
    """A validated request of either protocol; `infer_request` is the V2 request, if any."""

    protocol: Literal["v1", "v2"]
    instances: list[RerankInstance]
    infer_request: InferRequest | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class ItemResult:
    """The outcome for one item: a score and its source, or an error.

    `num_missing_attributes` counts the attributes without tokens; it is None for a
    cached score, whose product tokens are not read.
    """

    item: Item
    score: float | None = None
    source: Source | None = None
    error: str | None = None
    num_missing_attributes: int | None = None


@dataclass
class ScoredRequest:
    """Item results per instance, in request order."""

    request: RerankRequest
    results: list[list[ItemResult]]


class RequestParser:
    """Validate V1 and V2 re-rank requests against the input spec's fields and the limits."""

    def __init__(self, fields: Sequence[str], config: ServingConfig) -> None:
        self.fields = tuple(fields)
        self.config = config
        self.item_keys = ("item_id", *self.fields)

    def _max_chars(self, name: str) -> tuple[int, str]:
        if name == "title":
            return self.config.max_title_chars, "max_title_chars"
        if name == "description":
            return self.config.max_description_chars, "max_description_chars"
        return self.config.max_attribute_chars, "max_attribute_chars"

    @staticmethod
    def check_text(value: Any, path: str, max_chars: int, limit_name: str) -> str:
        """Return `value` if it is valid text within the limit, else raise RequestError naming `path`."""
        if not isinstance(value, str):
            raise RequestError(f"{path} must be a string, got {type(value).__name__}")
        if len(value) > max_chars:
            raise RequestError(f"{path} has {len(value)} characters, more than {limit_name}={max_chars}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(
                f"{path} is not valid Unicode: it contains the lone surrogate U+{ord(value[err.start]):04X}; "
                "send valid UTF-8 text"
            ) from err
        return value

    def _check_item_id(self, value: Any, path: str) -> str:
        item_id = self.check_text(value, path, self.config.max_item_id_chars, "max_item_id_chars")
        if not item_id:
            raise RequestError(f"{path} is empty; send a non-empty item_id or leave it out")
        return item_id

    def _check_query(self, value: Any, path: str) -> str:
        query = self.check_text(value, path, self.config.max_query_chars, "max_query_chars")
        if not query.strip():
            raise RequestError(f"{path} is empty; send the search query to re-rank for")
        return query

    def _check_num_items(self, num_items: int) -> None:
        if num_items > self.config.max_items:
            raise RequestError(
                f"request has {num_items} items, more than max_items={self.config.max_items}; "
                "send the candidates in several requests"
            )

    def _product(self, values: Mapping[str, Any], path: str) -> dict[str, str] | None:
        product = {}
        for name in self.fields:
            value = values.get(name)
            max_chars, limit_name = self._max_chars(name)
            product[name] = "" if value is None else self.check_text(value, f"{path}.{name}", max_chars, limit_name)
        return product if any(product.values()) else None

    def _v1_item(self, value: Any, index: int, path: str) -> Item:
        if isinstance(value, str):
            return Item(index, self._check_item_id(value, path), None)
        if not isinstance(value, dict):
            raise RequestError(
                f"{path} must be an item_id string or an object with item_id and/or product fields, "
                f"got {type(value).__name__}"
            )
        unknown = sorted(set(value) - set(self.item_keys))
        if unknown:
            raise RequestError(f"{path} has unknown fields {unknown}; expected some of {list(self.item_keys)}")
        raw_id = value.get("item_id")
        item_id = None if raw_id is None else self._check_item_id(raw_id, f"{path}.item_id")
        product = self._product(value, path)
        if item_id is None and product is None:
            raise RequestError(f"{path} has neither an item_id nor product text; send at least one")
        return Item(index, item_id, product)

    def parse_v1(self, body: Any) -> list[RerankInstance]:
        """Validate a V1 body: `instances`, or `instances_b64gz` (base64 of gzip of the instances JSON)."""
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a JSON object with `instances`, got {type(body).__name__}")
        keys = set(body)
        if keys == {"instances_b64gz"}:
            instances = self._decode_b64gz(body["instances_b64gz"])
        elif keys == {"instances"}:
            instances = body["instances"]
        else:
            raise RequestError(
                f"request body must have exactly one of `instances` and `instances_b64gz`, got fields {sorted(keys)}"
            )

        # The shape of every instance first, so the item count is checked before any text.
        self._check_instances(instances)
        self._check_num_items(sum(len(instance["items"]) for instance in instances))

        parsed = []
        for position, instance in enumerate(instances):
            path = f"instances[{position}]"
            query = self._check_query(instance["query"], f"{path}.query")
            items = [
                self._v1_item(item, index, f"{path}.items[{index}]") for index, item in enumerate(instance["items"])
            ]
            parsed.append(RerankInstance(query, items))
        return parsed

    @staticmethod
    def _check_instances(instances: Any) -> None:
        if not isinstance(instances, list):
            raise RequestError(f"instances must be a list, got {type(instances).__name__}")
        if not instances:
            raise RequestError("instances is empty; send at least one {query, items} object")
        for position, instance in enumerate(instances):
            path = f"instances[{position}]"
            if not isinstance(instance, dict):
                raise RequestError(f"{path} must be an object with query and items")
            if set(instance) != {"query", "items"}:
                raise RequestError(f"{path} must have exactly the fields query and items, got {sorted(instance)}")
            if not isinstance(instance["items"], list):
                raise RequestError(f"{path}.items must be a list, got {type(instance['items']).__name__}")
            if not instance["items"]:
                raise RequestError(f"{path}.items is empty; send at least one item")

    def _decode_b64gz(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise RequestError(f"instances_b64gz must be a base64 string, got {type(value).__name__}")
        try:
            compressed = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"instances_b64gz is not valid base64 ({err})") from err
        data = gunzip_limited(compressed, self.config.max_body_bytes, "instances_b64gz")
        return parse_json(data, "instances_b64gz", path="instances")

    def _v2_strings(self, infer_input: Any, path: str) -> list[str]:
        if infer_input.datatype != "BYTES":
            raise RequestError(f"{path} must have datatype BYTES, got {infer_input.datatype}")
        shape = list(infer_input.shape)
        if any(size < 0 for size in shape):
            raise RequestError(f"{path} has shape {shape}; sizes must not be negative")
        try:
            values = infer_input.as_numpy().reshape(-1).tolist()
        except (ValueError, TypeError) as err:
            raise RequestError(f"{path} data does not match its shape {shape} ({err})") from err
        strings = []
        for position, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise RequestError(f"{path}[{position}] is not valid UTF-8 ({err})") from err
            if not isinstance(value, str):
                raise RequestError(f"{path}[{position}] must be a string, got {type(value).__name__}")
            strings.append(value)
        return strings

    def parse_v2(self, request: InferRequest) -> list[RerankInstance]:
        """Validate a V2 request: BYTES `query` [1] and `item_id` and/or product fields [n]."""
        for output in request.request_outputs or []:
            if output.name not in OUTPUT_NAMES:
                raise RequestError(f"unknown output {output.name!r} requested; expected some of {list(OUTPUT_NAMES)}")

        inputs: dict[str, list[str]] = {}
        for infer_input in request.inputs:
            name = infer_input.name
            if name in inputs:
                raise RequestError(f"input {name!r} appears twice; send each input once")
            if name != "query" and name not in self.item_keys:
                raise RequestError(f"unknown input {name!r}; expected query and some of {list(self.item_keys)}")
            inputs[name] = self._v2_strings(infer_input, f"inputs[{name!r}]")

        if "query" not in inputs:
            raise RequestError("missing input 'query': send it as BYTES with shape [1]")
        if len(inputs["query"]) != 1:
            raise RequestError(f"input 'query' must have one element, got {len(inputs['query'])}")
        query = self._check_query(inputs["query"][0], "inputs['query'][0]")

        columns = {name: values for name, values in inputs.items() if name != "query"}
        if not columns:
            raise RequestError(f"no item inputs; send item_id and/or product fields {list(self.fields)}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) != 1:
            raise RequestError(f"item inputs must have the same number of elements, got {lengths}")
        num_items = next(iter(lengths.values()))
        if num_items == 0:
            raise RequestError("item inputs are empty; send at least one item")
        self._check_num_items(num_items)

        items = []
        for index in range(num_items):
            path = f"item {index}"
            raw_id = columns.get("item_id", [""] * num_items)[index]
            item_id = self._check_item_id(raw_id, f"inputs['item_id'][{index}]") if raw_id else None
            product = self._product({name: values[index] for name, values in columns.items()}, path)
            if item_id is None and product is None:
                raise RequestError(f"{path} has neither an item_id nor product text; send at least one")
            items.append(Item(index, item_id, product))
        return [RerankInstance(query, items)]


class RerankPredictor(Model):
    """Re-rank candidates with a model bundle, an optional token store and an optional score cache.

    `load` reads the bundle, opens the stores and checks the token store against the
    bundle's tokenizer, so nothing heavy happens per request. Scoring runs in the event
    loop's thread pool, so the server keeps accepting requests meanwhile.
    """

    def __init__(self, config: ServingConfig) -> None:
        # Without a configured name, `load` takes the bundle's model_name.
        super().__init__(config.model_name or "")
        self.config = config
        self.bundle: Bundle | None = None
        self.parser: RequestParser | None = None
        self.token_store: TokenStore | None = None
        self.score_cache: ScoreCache | None = None
        self.score_log: ScoreLog | None = None
        self.metrics = serving_metrics()

    @property
    def model_version(self) -> str:
        return self.bundle.config.model_version

    def load(self) -> bool:
        """Load the bundle and stores, check they fit together and run one warm-up batch.

        Raises BundleError, TokenStoreError or ScoreCacheError with the fix in the
        message. The server exits on them.
        """
        started = time.perf_counter()
        self.bundle = load_bundle(self.config.model_dir, intra_op_threads=self.config.intra_op_threads)
        self.name = self.name or self.bundle.config.model_name
        self.parser = RequestParser(self.bundle.config.input_spec.fields, self.config)

        if self.config.token_store is not None:
            self.token_store = TokenStore(self.config.token_store)
            self.token_store.check_compatible(self.bundle)
            logger.info("token store %s: %d items", self.token_store.path, self.token_store.count())
        if self.config.score_cache is not None:
            self.score_cache = ScoreCache(self.config.score_cache)
            num_cached = self.score_cache.count(self.model_version)
            if num_cached == 0:
                logger.warning(
                    "score cache %s has no scores for model version %s (it was built for %s); every request "
                    "goes to the model",
                    self.score_cache.path,
                    self.model_version,
                    self.score_cache.model_version,
                )
            else:
                logger.info(
                    "score cache %s: %d pairs for model version %s",
                    self.score_cache.path,
                    num_cached,
                    self.model_version,
                )

        if self.config.score_log is not None:
            self.score_log = ScoreLog(self.config.score_log)
            logger.info("appending served scores to %s", self.config.score_log)

        # The first ONNX Runtime call allocates its buffers, so make it before traffic arrives.
        self.bundle.score([self.name], [{"title": self.name}])
        self.ready = True
        logger.info(
            "predictor %s ready: model version %s, batch_size %d, max_items %d, in %.1f s",
            self.name,
            self.model_version,
            self.config.batch_size,
            self.config.max_items,
            time.perf_counter() - started,
        )
        return self.ready

    def stop(self) -> None:
        for store in (self.token_store, self.score_cache, self.score_log):
            if store is not None:
                store.close()
        super().stop()

    def get_input_types(self) -> list[dict[str, Any]]:
        item_names = ("item_id", *self.bundle.config.input_spec.fields)
        item_inputs = [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in item_names]
        return [{"name": "query", "datatype": "BYTES", "shape": [1]}, *item_inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        datatypes = {"score": "FP32", "rank": "INT32", "error": "BYTES"}
        return [{"name": name, "datatype": datatypes[name], "shape": [-1]} for name in OUTPUT_NAMES]

    def validate(self, payload: Any) -> Any:
        # KServe's check expects a raw body, but `preprocess` returns a validated request.
        return payload

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> RerankRequest:
        started = time.perf_counter()
        if isinstance(payload, InferRequest):
            return RerankRequest("v2", self.parser.parse_v2(payload), payload, started)
        if isinstance(payload, bytes | str):
            content_type = (headers or {}).get("content-type", "")
            raise RequestError(f"Content-Type {content_type!r} is not supported; send application/json", status=415)
        return RerankRequest("v1", self.parser.parse_v1(payload), None, started)

    async def predict(
        self,
        payload: RerankRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> ScoredRequest:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.score_request, payload)

    async def postprocess(
        self,
        result: ScoredRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        if result.request.protocol == "v2":
            response = self._v2_response(result)
        else:
            instances = zip(result.request.instances, result.results, strict=True)
            response = {"predictions": [self._v1_prediction(instance, results) for instance, results in instances]}
        self.metrics.step_seconds.labels(self.name, "total").observe(time.perf_counter() - result.request.started)
        return response

    # Scoring.

    def score_request(self, request: RerankRequest) -> ScoredRequest:
        """Score every item of a validated request, raising RequestError 422 when none can be scored."""
        results = [[ItemResult(item) for item in instance.items] for instance in request.instances]

        # Cached scores, one lookup per instance.
        if self.score_cache is not None:
            with self._timed("cache"):
                for instance, item_results in zip(request.instances, results, strict=True):
                    self._apply_cache(instance.query, item_results)

        # Product tokens from the store, for items with an id and no cached score.
        pending = [result for item_results in results for result in item_results if result.score is None]
        stored = self._stored_tokens([result.item.item_id for result in pending if result.item.item_id])

        # Model input: the query's ids joined with stored or freshly tokenized product ids.
        sequences: list[tuple[list[int], list[int]]] = []
        scored: list[ItemResult] = []
        with self._timed("tokenize"):
            for instance, item_results in zip(request.instances, results, strict=True):
                self._assemble(instance.query, item_results, stored, sequences, scored)

        if sequences:
            with self._timed("model"):
                scores = self._run_model(sequences)
            for result, score in zip(scored, scores.tolist(), strict=True):
                result.score = score

        self._record(results)
        self._log_scores(request, results)
        if all(result.score is None for item_results in results for result in item_results):
            errors = [result.error for item_results in results for result in item_results][:3]
            raise RequestError(f"no item in the request can be scored: {'; '.join(errors)}", status=422)
        return ScoredRequest(request, results)

    def _apply_cache(self, query: str, item_results: list[ItemResult]) -> None:
        with_id = [result for result in item_results if result.item.item_id]
        if not with_id:
            return
        cached = self.score_cache.lookup(normalize_query(query), self.model_version)
        num_hits = 0
        for result in with_id:
            score = cached.get(result.item.item_id)
            if score is not None:
                result.score, result.source = score, "cache"
                num_hits += 1
        self.metrics.cache_lookups.labels(self.name, "hit").inc(num_hits)
        self.metrics.cache_lookups.labels(self.name, "miss").inc(len(with_id) - num_hits)

    def _stored_tokens(self, item_ids: list[str]) -> dict[str, list[list[int]]]:
        if self.token_store is None or not item_ids:
            return {}
        with self._timed("token_store"):
            try:
                return self.token_store.get(item_ids)
            except TokenStoreError as err:
                logger.error("token store lookup failed: %s", err)
                raise InferenceError(str(err)) from err

    def _assemble(
        self,
        query: str,
        item_results: list[ItemResult],
        stored: Mapping[str, list[list[int]]],
        sequences: list[tuple[list[int], list[int]]],
        scored: list[ItemResult],
    ) -> None:
        pending = [result for result in item_results if result.score is None]
        if not pending:
            return
        builder = self.bundle.builder
        (query_ids,) = builder.encode_queries([query])

        def add(result: ItemResult, source: Source, product_ids: list[list[int]]) -> None:
            # Segment 0 is the title; the attributes follow it (features.InputSpec.fields).
            attributes = product_ids[1 : 1 + len(builder.spec.attributes)]
            result.source = source
            result.num_missing_attributes = sum(1 for segment in attributes if not segment)
            sequences.append(builder.assemble(query_ids, product_ids))
            scored.append(result)

        from_text = []
        for result in pending:
            item = result.item
            if item.item_id is not None and item.item_id in stored:
                add(result, "token_store", stored[item.item_id])
            elif item.product is not None:
                from_text.append(result)
            else:
                result.error = self._missing_item_error(item.item_id)

        if from_text:
            segments = builder.encode_products([result.item.product for result in from_text])
            for result, product_ids in zip(from_text, segments, strict=True):
                add(result, "text", product_ids)

    def _missing_item_error(self, item_id: str) -> str:
        if self.token_store is None:
            return f"item_id {item_id!r} cannot be scored: no token store is loaded and no product text was sent"
        return f"item_id {item_id!r} not in the token store and no product text was sent"

    def _run_model(self, sequences: list[tuple[list[int], list[int]]]) -> np.ndarray:
        # Sorting by length keeps padding small. Scores are returned in input order.
        scores = np.empty(len(sequences), dtype=np.float64)
        order = np.argsort([len(ids) for ids, _ in sequences], kind="stable")
        batch_size = self.config.batch_size
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            scores[rows] = self.bundle.score_sequences([sequences[row] for row in rows], batch_size=len(rows))
            self.metrics.batch_size.labels(self.name).observe(len(rows))
            self.metrics.model_batches.labels(self.name).inc()
        return scores

    def _log_scores(self, request: RerankRequest, results: list[list[ItemResult]]) -> None:
        # One transaction per request. NOTE: the commit (a full sync) runs in the
        # request's worker thread, so a slow disk adds to request latency.
        if self.score_log is None:
            return
        now = time.time()
        records = [
            ScoreRecord(
                time=now,
                model_version=self.model_version,
                query=instance.query,
                item_id=result.item.item_id or "",
                score=result.score,
                query_num_tokens=count_query_tokens(instance.query),
                num_missing_attributes=result.num_missing_attributes,
            )
            for instance, item_results in zip(request.instances, results, strict=True)
            for result in item_results
            if result.score is not None
        ]
        if records:
            self.score_log.append(records)

    def _record(self, results: list[list[ItemResult]]) -> None:
        counts = {"cache": 0, "token_store": 0, "text": 0}
        num_errors = 0
        for item_results in results:
            for result in item_results:
                if result.score is None:
                    num_errors += 1
                    continue
                counts[result.source] += 1
                self.metrics.served_scores.labels(self.name).observe(result.score)
        for source, count in counts.items():
            if count:
                self.metrics.pairs.labels(self.name, source).inc(count)
        if num_errors:
            self.metrics.item_errors.labels(self.name).inc(num_errors)

    def _timed(self, step: str) -> AbstractContextManager:
        return self.metrics.step_seconds.labels(self.name, step).time()

    # Responses.

    @staticmethod
    def _ranked(item_results: list[ItemResult]) -> list[ItemResult]:
        # Highest score first, and equal scores keep request order.
        scored = [result for result in item_results if result.score is not None]
        return sorted(scored, key=lambda result: (-result.score, result.item.index))

    def _v1_prediction(self, instance: RerankInstance, item_results: list[ItemResult]) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        for rank, r in enumerate(self._ranked(item_results), start=1):
            item = r.item
            result = {"item_id": item.item_id, "index": item.index, "score": r.score, "rank": rank, "source": r.source}
            if r.num_missing_attributes is not None:
                result["num_missing_attributes"] = r.num_missing_attributes
            results.append(result)
        results += [
            {"item_id": r.item.item_id, "index": r.item.index, "score": None, "rank": None, "source": None}
            | {"error": r.error}
            for r in item_results
            if r.score is None
        ]
        return {
            "model_name": self.name,
            "model_version": self.model_version,
            "query": instance.query,
            "results": results,
        }

    def _v2_response(self, result: ScoredRequest) -> InferResponse:
        (item_results,) = result.results
        num_items = len(item_results)
        scores = np.array([np.nan if r.score is None else r.score for r in item_results], dtype=np.float32)
        ranks = np.zeros(num_items, dtype=np.int32)
        for rank, r in enumerate(self._ranked(item_results), start=1):
            ranks[r.item.index] = rank
        errors = np.array([r.error or "" for r in item_results], dtype=np.object_)
        outputs = [
            InferOutput("score", [num_items], "FP32", scores),
            InferOutput("rank", [num_items], "INT32", ranks),
            InferOutput("error", [num_items], "BYTES", errors),
        ]
        infer_request = result.request.infer_request
        # KServe's to_rest() keeps only the requested outputs and encodes them as binary
        # data when the request sets its `binary_data_output` parameter (or an output's `binary_data`).
        return InferResponse(
            response_id=infer_request.id or str(uuid.uuid4()),
            model_name=self.name,
            model_version=self.model_version,
            infer_outputs=outputs,
            use_binary_outputs=infer_request.use_binary_outputs,
            requested_outputs=infer_request.request_outputs,
        )
