"""Re-rank server: KServe's ModelServer with the crossrank predictor, on 127.0.0.1.

One server runs per module, in a subprocess, with the test bundle, a token store of
the catalog and a score cache of the ten most judged queries. It is started with
`--batch-size 16 --max-items 300` so the tests can see both settings at work.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from test_token_store import ServingData, load_serving_data

from crossrank.bundle import Bundle, load_bundle
from crossrank.ingest import normalize_query
from crossrank.serving.predictor import RerankPredictor, RerankRequest, ServingConfig
from crossrank.serving.score_cache import build_score_cache, head_queries
from crossrank.serving.token_store import build_token_store

MODEL = "crossrank-test"
FIELDS = ("title", "product_type", "brand", "color", "gender")
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"
MAX_ITEMS = 300
BATCH_SIZE = 16


@dataclass(frozen=True)
class Stores:
    token_store: Path
    score_cache: Path
    head_queries: list[str]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    client: httpx.Client

    def predict(self, instances: list[dict[str, Any]]) -> httpx.Response:
        return self.client.post(PREDICT, json={"instances": instances})

    def metric(self, name: str, **labels: str) -> float:
        """Return one sample of /metrics, 0.0 when the series does not exist yet."""
        text = self.client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                    return sample.value
        return 0.0


@pytest.fixture(scope="session")
def serving_data(tmp_path_factory: pytest.TempPathFactory, datasets: Path) -> ServingData:
    return load_serving_data(tmp_path_factory, datasets)


@pytest.fixture(scope="module")
def bundle(serving_data: ServingData) -> Bundle:
    return load_bundle(serving_data.bundle)


@pytest.fixture(scope="module")
def stores(serving_data: ServingData, tmp_path_factory: pytest.TempPathFactory) -> Stores:
    folder = tmp_path_factory.mktemp("stores")
    build_token_store(serving_data.catalog, serving_data.bundle, folder / "token_store.sqlite")
    build_score_cache(serving_data.judgments, serving_data.bundle, folder / "score_cache.sqlite", num_queries=10)
    queries = head_queries(serving_data.judgments, None, 10)
    return Stores(folder / "token_store.sqlite", folder / "score_cache.sqlite", queries)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(arguments: list[str], log: Path, timeout_s: float = 120.0) -> Server:
    """Start `crossrank.serving.server` on 127.0.0.1 and wait until the model is ready."""
    port = free_port()
    command = [sys.executable, "-m", "crossrank.serving.server", "--host", "127.0.0.1", "--http-port", str(port)]
    command += arguments
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60.0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if client.get(f"/v1/models/{MODEL}").status_code == 200:
                return Server(url, process, log, client)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(Server(url, process, log, client))
    pytest.fail(f"server not ready after {timeout_s} s:\n{log.read_text()[-5000:]}")


def stop_server(server: Server) -> None:
    server.client.close()
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(serving_data: ServingData, stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    arguments = [
        "--model-dir", str(serving_data.bundle),
        "--token-store", str(stores.token_store),
        "--score-cache", str(stores.score_cache),
        "--batch-size", str(BATCH_SIZE),
        "--max-items", str(MAX_ITEMS),
    ]  # fmt: skip
    server = start_server(arguments, tmp_path_factory.mktemp("server") / "server.log")
    yield server
    stop_server(server)


def products_of(frame: pd.DataFrame) -> list[dict[str, str]]:
    return frame[list(FIELDS)].to_dict("records")


def judged(serving_data: ServingData, query: str) -> pd.DataFrame:
    """Return the judged items of a normalized query, one row per item."""
    frame = serving_data.judgments
    rows = frame[frame["query"].map(normalize_query) == query]
    return rows.drop_duplicates("item_id").reset_index(drop=True)


def cold_query(serving_data: ServingData, stores: Stores) -> str:
    """Return a judged query that is not in the score cache."""
    queries = serving_data.judgments["query"].map(normalize_query).unique()
    return next(query for query in queries if query not in stores.head_queries)


def results_by_index(prediction: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {result["index"]: result for result in prediction["results"]}


# Scores and sources.


def test_v1_scores_match_offline_scores(server: Server, serving_data: ServingData, bundle: Bundle) -> None:
    catalog = serving_data.catalog
    queries = ["cordless drill", "white kitchen faucet", "ge gas range"]
    items = catalog.iloc[:40]

    response = server.predict([{"query": query, "items": products_of(items)} for query in queries])

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [prediction["query"] for prediction in predictions] == queries
    for query, prediction in zip(queries, predictions, strict=True):
        assert (prediction["model_name"], prediction["model_version"]) == (MODEL, "v1")
        offline = bundle.score([query] * len(items), products_of(items))
        served = results_by_index(prediction)
        assert sorted(served) == list(range(len(items)))
        np.testing.assert_allclose([served[index]["score"] for index in range(len(items))], offline, rtol=0, atol=1e-6)
        assert {result["source"] for result in prediction["results"]} == {"text"}
        assert all(result["item_id"] is None for result in prediction["results"])


def test_v1_results_are_sorted_and_ranked(server: Server, serving_data: ServingData) -> None:
    items = products_of(serving_data.catalog.iloc[:25])

    (prediction,) = server.predict([{"query": "outdoor rug", "items": items}]).json()["predictions"]

    scores = [result["score"] for result in prediction["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [result["rank"] for result in prediction["results"]] == list(range(1, 26))
    assert len(set(scores)) > 20  # the perturbed head spreads scores, so ranks are meaningful


def test_v2_scores_match_offline_scores(server: Server, serving_data: ServingData, bundle: Bundle) -> None:
    items = serving_data.catalog.iloc[:30]
    inputs = [{"name": "query", "datatype": "BYTES", "shape": [1], "data": ["pressure treated lumber"]}]
    inputs += [
        {"name": name, "datatype": "BYTES", "shape": [len(items)], "data": items[name].tolist()} for name in FIELDS
    ]

    response = server.client.post(INFER, json={"id": "request-1", "inputs": inputs})

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["model_name"], body["model_version"]) == ("request-1", MODEL, "v1")
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["score"]["datatype"] == "FP32"
    offline = bundle.score(["pressure treated lumber"] * len(items), products_of(items))
    np.testing.assert_allclose(outputs["score"]["data"], offline, rtol=0, atol=1e-6)
    assert outputs["rank"]["data"] == (len(offline) - np.argsort(np.argsort(offline))).tolist()
    assert outputs["error"]["data"] == [""] * len(items)


def test_v2_returns_requested_outputs(server: Server, serving_data: ServingData) -> None:
    items = serving_data.catalog.iloc[:4]
    inputs = [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["drill"]},
        {"name": "item_id", "datatype": "BYTES", "shape": [4], "data": items["item_id"].tolist()},
    ]

    body = server.client.post(INFER, json={"inputs": inputs, "outputs": [{"name": "rank"}]}).json()

    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("rank", "INT32", [4])
    assert sorted(output["data"]) == [1, 2, 3, 4]


def test_v2_binary_outputs_match_json(server: Server, serving_data: ServingData) -> None:
    items = serving_data.catalog.iloc[:4]
    inputs = [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["drill"]},
        {"name": "item_id", "datatype": "BYTES", "shape": [4], "data": items["item_id"].tolist()},
    ]
    outputs = [{"name": "score", "parameters": {"binary_data": True}}]

    as_json = server.client.post(INFER, json={"inputs": inputs, "outputs": [{"name": "score"}]}).json()
    response = server.client.post(INFER, json={"inputs": inputs, "outputs": outputs})

    # KServe's binary extension: a JSON header of the given length, then the raw tensor.
    header_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:header_length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    scores = np.frombuffer(response.content[header_length:], dtype="<f4")
    assert scores.tolist() == as_json["outputs"][0]["data"]


def test_token_store_scores_equal_text_scores(server: Server, serving_data: ServingData, stores: Stores) -> None:
    query = cold_query(serving_data, stores)
    items = serving_data.catalog.iloc[100:160]

    by_id, by_text = server.predict(
        [{"query": query, "items": items["item_id"].tolist()}, {"query": query, "items": products_of(items)}]
    ).json()["predictions"]

    assert {result["source"] for result in by_id["results"]} == {"token_store"}
    assert [result["num_missing_attributes"] for result in by_id["results"]] == [
        result["num_missing_attributes"] for result in by_text["results"]
    ]
    # Home Depot items have no gender or product_type.
    assert min(result["num_missing_attributes"] for result in by_id["results"]) >= 2
    assert [result["item_id"] for result in by_id["results"]] == [
        items["item_id"].iloc[result["index"]] for result in by_text["results"]
    ]
    assert [result["score"] for result in by_id["results"]] == [result["score"] for result in by_text["results"]]


def test_known_item_ignores_sent_text(server: Server, serving_data: ServingData, stores: Stores) -> None:
    query = cold_query(serving_data, stores)
    item = serving_data.catalog.iloc[5]
    stale = {"item_id": item["item_id"], "title": "stale title the store does not have"}

    (prediction,) = server.predict([{"query": query, "items": [item["item_id"], stale]}]).json()["predictions"]

    first, second = (results_by_index(prediction)[index] for index in (0, 1))
    assert first["source"] == second["source"] == "token_store"
    assert first["score"] == second["score"]


def test_unknown_item_falls_back_to_text(server: Server, serving_data: ServingData, bundle: Bundle) -> None:
    product = products_of(serving_data.catalog.iloc[[7]])[0]

    (prediction,) = server.predict([{"query": "vanity", "items": [{"item_id": "not-in-catalog", **product}]}]).json()[
        "predictions"
    ]

    (result,) = prediction["results"]
    assert (result["item_id"], result["source"], result["rank"]) == ("not-in-catalog", "text", 1)
    missing = sum(1 for name in ("product_type", "brand", "color", "gender") if not product[name])
    assert result["num_missing_attributes"] == missing
    assert result["score"] == pytest.approx(bundle.score(["vanity"], [product])[0], abs=1e-6)


def test_unknown_item_gets_item_error(server: Server, serving_data: ServingData) -> None:
    known = serving_data.catalog["item_id"].iloc[3]

    (prediction,) = server.predict([{"query": "drill", "items": ["missing-1", known, {"item_id": "missing-2"}]}]).json()[
        "predictions"
    ]

    assert [result["item_id"] for result in prediction["results"]] == [known, "missing-1", "missing-2"]
    assert prediction["results"][0]["rank"] == 1
    assert prediction["results"][1:] == [
        {
            "item_id": item_id,
            "index": index,
            "score": None,
            "rank": None,
            "source": None,
            "error": f"item_id '{item_id}' not in the token store and no product text was sent",
        }
        for index, item_id in ((0, "missing-1"), (2, "missing-2"))
    ]


def test_unscorable_request_gets_422(server: Server) -> None:
    response = server.predict([{"query": "drill", "items": ["missing-1", "missing-2"]}])

    assert response.status_code == 422
    assert response.json() == {
        "error": "no item in the request can be scored: item_id 'missing-1' not in the token store and no product "
        "text was sent; item_id 'missing-2' not in the token store and no product text was sent"
    }


def test_v2_unknown_item_gets_error(server: Server, serving_data: ServingData) -> None:
    known = serving_data.catalog["item_id"].iloc[3]
    inputs = [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["drill"]},
        {"name": "item_id", "datatype": "BYTES", "shape": [2], "data": ["missing-1", known]},
    ]

    body = server.client.post(INFER, json={"inputs": inputs}).json()

    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    assert outputs["score"][0] is None  # NaN, which JSON cannot carry
    assert 0.0 < outputs["score"][1] < 1.0
    assert outputs["rank"] == [0, 1]
    assert outputs["error"] == ["item_id 'missing-1' not in the token store and no product text was sent", ""]


# Score cache.


def test_cache_hits_skip_model(
    server: Server, serving_data: ServingData, stores: Stores, bundle: Bundle
) -> None:
    query = stores.head_queries[0]
    items = judged(serving_data, query)
    batches_before = server.metric("crossrank_model_batches_total", model_name=MODEL)
    hits_before = server.metric("crossrank_score_cache_lookups_total", model_name=MODEL, result="hit")

    (cached,) = server.predict([{"query": query.upper(), "items": items["item_id"].tolist()}]).json()["predictions"]

    assert server.metric("crossrank_model_batches_total", model_name=MODEL) == batches_before
    hits = server.metric("crossrank_score_cache_lookups_total", model_name=MODEL, result="hit")
    assert hits == hits_before + len(items)
    assert {result["source"] for result in cached["results"]} == {"cache"}
    assert all("num_missing_attributes" not in result for result in cached["results"])
    (computed,) = server.predict([{"query": query, "items": products_of(items)}]).json()["predictions"]
    assert server.metric("crossrank_model_batches_total", model_name=MODEL) > batches_before
    cached_scores = [results_by_index(cached)[index]["score"] for index in range(len(items))]
    computed_scores = [results_by_index(computed)[index]["score"] for index in range(len(items))]
    np.testing.assert_allclose(cached_scores, computed_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cached_scores, bundle.score([query] * len(items), products_of(items)), rtol=0, atol=1e-6)


def test_cache_miss_uses_model(server: Server, serving_data: ServingData, stores: Stores) -> None:
    query = cold_query(serving_data, stores)
    item_ids = judged(serving_data, query)["item_id"].tolist()
    misses_before = server.metric("crossrank_score_cache_lookups_total", model_name=MODEL, result="miss")

    (prediction,) = server.predict([{"query": query, "items": item_ids}]).json()["predictions"]

    assert {result["source"] for result in prediction["results"]} == {"token_store"}
    misses = server.metric("crossrank_score_cache_lookups_total", model_name=MODEL, result="miss")
    assert misses == misses_before + len(item_ids)


def test_new_version_ignores_cached_scores(serving_data: ServingData, stores: Stores) -> None:
    predictor = RerankPredictor(
        ServingConfig(model_dir=serving_data.bundle_v2, token_store=stores.token_store, score_cache=stores.score_cache)
    )
    predictor.load()
    query = stores.head_queries[0]
    item_ids = judged(serving_data, query)["item_id"].tolist()
    request = RerankRequest("v1", predictor.parser.parse_v1({"instances": [{"query": query, "items": item_ids}]}))
    labels = {"model_name": MODEL}
    batches_before = REGISTRY.get_sample_value("crossrank_model_batches_total", labels) or 0.0

    (results,) = predictor.score_request(request).results

    assert predictor.model_version == "v2"
    assert {result.source for result in results} == {"token_store"}
    assert REGISTRY.get_sample_value("crossrank_model_batches_total", labels) == batches_before + 1
    assert REGISTRY.get_sample_value("crossrank_score_cache_lookups_total", {**labels, "result": "hit"}) == 0.0
    predictor.stop()


# Batching and payload encodings.


def test_scoring_uses_batch_size(server: Server, serving_data: ServingData) -> None:
    count_before = server.metric("crossrank_batch_size_count", model_name=MODEL)
    sum_before = server.metric("crossrank_batch_size_sum", model_name=MODEL)

    response = server.predict([{"query": "ceiling fan", "items": products_of(serving_data.catalog.iloc[:40])}])

    assert response.status_code == 200
    assert server.metric("crossrank_batch_size_count", model_name=MODEL) == count_before + 3  # 16 + 16 + 8
    assert server.metric("crossrank_batch_size_sum", model_name=MODEL) == sum_before + 40


def test_compressed_bodies_match_plain_json(server: Server, serving_data: ServingData) -> None:
    catalog = serving_data.catalog
    instances = [{"query": "gas range", "items": [*catalog["item_id"][:5], *products_of(catalog.iloc[5:10])]}]
    plain = server.predict(instances).json()

    gzipped = server.client.post(
        PREDICT,
        content=gzip.compress(json.dumps({"instances": instances}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    encoded = base64.b64encode(gzip.compress(json.dumps(instances).encode())).decode("ascii")
    base64_gzipped = server.client.post(PREDICT, json={"instances_b64gz": encoded})

    assert gzipped.status_code == base64_gzipped.status_code == 200
    assert gzipped.json() == base64_gzipped.json() == plain


def test_metadata_lists_inputs_and_outputs(server: Server) -> None:
    body = server.client.get(f"/v2/models/{MODEL}").json()

    assert [tensor["name"] for tensor in body["inputs"]] == ["query", "item_id", *FIELDS]
    assert [(tensor["name"], tensor["datatype"]) for tensor in body["outputs"]] == [
        ("score", "FP32"),
        ("rank", "INT32"),
        ("error", "BYTES"),
    ]


# Invalid requests.

LONG_TITLE = "a" * 513
OVERSIZED_BODY = json.dumps({"instances": [{"query": "drill", "items": ["x" * 100] * 11_000}]}).encode()
TOO_MANY_ITEMS = {"instances": [{"query": "a", "items": ["1"] * 200}, {"query": "b", "items": ["1"] * 101}]}
BAD_V1_BODIES = [
    pytest.param(
        b'{"instances": [',
        400,
        "request body is not valid JSON: unexpected end of data: line 1 column 16 (char 15)",
        id="malformed json",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [{"title": "saw \\ud800"}]}]}',
        400,
        "instances[0].items[0].title is not valid Unicode: it contains the lone surrogate U+D800; send valid UTF-8 text",
        id="lone surrogate",
    ),
    pytest.param(
        b'{"instances": [{"query": "\xff", "items": ["1"]}]}',
        400,
        "request body is not valid UTF-8 (invalid byte at position 26); send JSON encoded as UTF-8",
        id="invalid utf-8",
    ),
    pytest.param(
        b"[" * 100_000 + b"]" * 100_000,
        400,
        "request body is not valid JSON: depth limit exceeded: line 1 column 1026 (char 1025)",
        id="deeply nested json",
    ),
    pytest.param(b"[]", 400, "request body must be a JSON object with `instances`, got list", id="list body"),
    pytest.param(
        b'{"inputs": []}',
        400,
        "request body must have exactly one of `instances` and `instances_b64gz`, got fields ['inputs']",
        id="missing instances",
    ),
    pytest.param(b'{"instances": {}}', 400, "instances must be a list, got dict", id="instances not a list"),
    pytest.param(
        b'{"instances": []}', 400, "instances is empty; send at least one {query, items} object", id="no instances"
    ),
    pytest.param(
        b'{"instances": [{"query": "drill"}]}',
        400,
        "instances[0] must have exactly the fields query and items, got ['query']",
        id="instance without items",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": []}]}',
        400,
        "instances[0].items is empty; send at least one item",
        id="no items",
    ),
    pytest.param(
        b'{"instances": [{"query": 5, "items": ["1"]}]}',
        400,
        "instances[0].query must be a string, got int",
        id="query of wrong type",
    ),
    pytest.param(
        b'{"instances": [{"query": "  ", "items": ["1"]}]}',
        400,
        "instances[0].query is empty; send the search query to re-rank for",
        id="blank query",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [5]}]}',
        400,
        "instances[0].items[0] must be an item_id string or an object with item_id and/or product fields, got int",
        id="item of wrong type",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [{"title": "saw", "colour": "red"}]}]}',
        400,
        "instances[0].items[0] has unknown fields ['colour']; expected some of "
        "['item_id', 'title', 'product_type', 'brand', 'color', 'gender']",
        id="misspelled field",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [{"brand": ""}]}]}',
        400,
        "instances[0].items[0] has neither an item_id nor product text; send at least one",
        id="item without id or text",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [""]}]}',
        400,
        "instances[0].items[0] is empty; send a non-empty item_id or leave it out",
        id="empty item_id",
    ),
    pytest.param(
        b'{"instances": [{"query": "drill", "items": [{"title": ["saw"]}]}]}',
        400,
        "instances[0].items[0].title must be a string, got list",
        id="title of wrong type",
    ),
    pytest.param(
        json.dumps({"instances": [{"query": "drill", "items": [{"title": LONG_TITLE}]}]}).encode(),
        400,
        "instances[0].items[0].title has 513 characters, more than max_title_chars=512",
        id="overlong title",
    ),
    pytest.param(
        json.dumps({"instances": [{"query": "drill", "items": [{"title": "saw", "brand": "b" * 257}]}]}).encode(),
        400,
        "instances[0].items[0].brand has 257 characters, more than max_attribute_chars=256",
        id="overlong brand",
    ),
    pytest.param(
        json.dumps({"instances": [{"query": "q" * 257, "items": ["1"]}]}).encode(),
        400,
        "instances[0].query has 257 characters, more than max_query_chars=256",
        id="overlong query",
    ),
    pytest.param(
        json.dumps(TOO_MANY_ITEMS).encode(),
        400,
        f"request has 301 items, more than max_items={MAX_ITEMS}; send the candidates in several requests",
        id="too many items",
    ),
    pytest.param(
        b'{"instances_b64gz": "!!"}',
        400,
        "instances_b64gz is not valid base64 (Only base64 data is allowed)",
        id="invalid base64",
    ),
    pytest.param(
        json.dumps({"instances_b64gz": base64.b64encode(b"[]").decode()}).encode(),
        400,
        "instances_b64gz is not valid gzip data (Error -3 while decompressing data: incorrect header check)",
        id="base64 of plain json",
    ),
    pytest.param(
        OVERSIZED_BODY,
        413,
        f"request body has {len(OVERSIZED_BODY)} bytes, more than max_body_bytes=1048576",
        id="oversized body",
    ),
]
BAD_ENCODINGS = [
    pytest.param(
        gzip.compress(b" " * 3_000_000),
        {"Content-Encoding": "gzip"},
        413,
        "gzip request body inflates to more than max_body_bytes=1048576 bytes",
        id="gzip bomb",
    ),
    pytest.param(
        b'{"instances": []}',
        {"Content-Encoding": "gzip"},
        400,
        "gzip request body is not valid gzip data (Error -3 while decompressing data: incorrect header check)",
        id="gzip header on plain body",
    ),
    pytest.param(
        b"{}",
        {"Content-Encoding": "br"},
        415,
        "Content-Encoding 'br' is not supported; send gzip or identity",
        id="brotli body",
    ),
    pytest.param(
        b"drill",
        {"Content-Type": "text/plain"},
        415,
        "Content-Type 'text/plain' is not supported; send application/json",
        id="text body",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_V1_BODIES)
def test_invalid_v1_body_is_rejected(server: Server, body: bytes, status: int, message: str) -> None:
    response = server.client.post(PREDICT, content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == status
    assert response.json() == {"error": message}


@pytest.mark.parametrize(("body", "headers", "status", "message"), BAD_ENCODINGS)
def test_invalid_encoding_is_rejected(server: Server, body: bytes, headers: dict, status: int, message: str) -> None:
    response = server.client.post(PREDICT, content=body, headers=headers)

    assert response.status_code == status
    assert response.json() == {"error": message}


def _v2(*inputs: tuple[str, str, list[int], list[Any]]) -> dict[str, Any]:
    keys = ("name", "datatype", "shape", "data")
    return {"inputs": [dict(zip(keys, values, strict=True)) for values in inputs]}


ITEM_KEYS = "['item_id', 'title', 'product_type', 'brand', 'color', 'gender']"
BAD_V2_BODIES = [
    pytest.param(
        _v2(("item_id", "BYTES", [1], ["1"])),
        "missing input 'query': send it as BYTES with shape [1]",
        id="missing query",
    ),
    pytest.param(
        _v2(("query", "BYTES", [2], ["a", "b"]), ("item_id", "BYTES", [1], ["1"])),
        "input 'query' must have one element, got 2",
        id="two queries",
    ),
    pytest.param(
        _v2(("query", "INT32", [1], [1]), ("item_id", "BYTES", [1], ["1"])),
        "inputs['query'] must have datatype BYTES, got INT32",
        id="numeric query",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"]), ("colour", "BYTES", [1], ["red"])),
        f"unknown input 'colour'; expected query and some of {ITEM_KEYS}",
        id="unknown input",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"])),
        "no item inputs; send item_id and/or product fields ['title', 'product_type', 'brand', 'color', 'gender']",
        id="no item inputs",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"]), ("item_id", "BYTES", [2], ["1", "2"]), ("title", "BYTES", [1], ["saw"])),
        "item inputs must have the same number of elements, got {'item_id': 2, 'title': 1}",
        id="uneven item inputs",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"]), ("item_id", "BYTES", [3], ["1", "2"])),
        "inputs['item_id'] data does not match its shape [3] (cannot reshape array of size 2 into shape (3,))",
        id="shape and data disagree",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"]), ("item_id", "BYTES", [-1], ["1"])),
        "inputs['item_id'] has shape [-1]; sizes must not be negative",
        id="negative shape",
    ),
    pytest.param(
        {**_v2(("query", "BYTES", [1], ["a"]), ("item_id", "BYTES", [1], ["1"])), "outputs": [{"name": "scores"}]},
        "unknown output 'scores' requested; expected some of ['score', 'rank', 'error']",
        id="unknown output",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a\ud800"]), ("item_id", "BYTES", [1], ["1"])),
        "inputs[0].data[0] is not valid Unicode: it contains the lone surrogate U+D800; send valid UTF-8 text",
        id="lone surrogate",
    ),
    pytest.param(
        _v2(("query", "BYTES", [1], ["a"]), ("item_id", "BYTES", [2], ["1", ""])),
        "item 1 has neither an item_id nor product text; send at least one",
        id="item without id or text",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_V2_BODIES)
def test_invalid_v2_request_is_rejected(server: Server, body: dict[str, Any], message: str) -> None:
    # Python's json module writes the lone surrogate as the escape "\ud800", as a client would.
    content = json.dumps(body).encode()

    response = server.client.post(INFER, content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_v2_body_of_wrong_shape_gets_422(server: Server) -> None:
    response = server.client.post(INFER, json={"inputs": "drill"})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "InferenceRequest", "inputs"]


def test_server_survives_invalid_requests(server: Server, serving_data: ServingData) -> None:
    for case in BAD_V1_BODIES:
        body, status, _ = case.values
        response = server.client.post(PREDICT, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status

    response = server.predict([{"query": "drill", "items": serving_data.catalog["item_id"][:3].tolist()}])

    assert response.status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.log.read_text()


# Metrics, load and import hygiene.


def test_metrics_expose_crossrank_families(server: Server, serving_data: ServingData) -> None:
    server.predict([{"query": "drill", "items": serving_data.catalog["item_id"][:3].tolist()}])

    families = {family.name for family in text_string_to_metric_families(server.client.get("/metrics").text)}

    for name in (
        "crossrank_step_seconds",
        "crossrank_batch_size",
        "crossrank_model_batches",
        "crossrank_pairs",
        "crossrank_score_cache_lookups",
        "crossrank_served_score",
        "crossrank_item_errors",
        "crossrank_rejected_requests",
        "request_predict_seconds",  # KServe's own
    ):
        assert name in families
    for step in ("cache", "token_store", "tokenize", "model", "total"):
        assert server.metric("crossrank_step_seconds_count", model_name=MODEL, step=step) > 0


def test_concurrent_clients_get_no_errors(server: Server, serving_data: ServingData, stores: Stores) -> None:
    catalog = serving_data.catalog
    head = stores.head_queries[1]
    bodies = [
        {"instances": [{"query": "drill", "items": catalog["item_id"].iloc[:20].tolist()}]},
        {"instances": [{"query": "gas range", "items": products_of(catalog.iloc[20:40])}]},
        {"instances": [{"query": head, "items": judged(serving_data, head)["item_id"].tolist()}]},
    ]
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run_client(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            deadline = time.monotonic() + 3.0
            count = offset
            while time.monotonic() < deadline:
                try:
                    status = client.post(PREDICT, json=bodies[count % len(bodies)]).status_code
                except httpx.HTTPError as err:
                    with lock:
                        failures.append(repr(err))
                    continue
                with lock:
                    statuses.append(status)
                count += 1

    threads = [threading.Thread(target=run_client, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    assert len(statuses) >= 8
    assert set(statuses) == {200}


def test_serving_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import crossrank.serving.server, crossrank.serving.predictor\n"
        "import crossrank.serving.token_store, crossrank.serving.score_cache\n"
        "banned = ('torch', 'transformers', 'crossrank.models', 'crossrank.training',\n"
        "          'crossrank.labeling', 'crossrank.export')\n"
        "print(sorted(name for name in sys.modules if name.startswith(banned)))\n"
    )

    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)

    assert completed.stdout.strip() == "[]"


def test_serve_rejects_other_tokenizer_store(serving_data: ServingData, stores: Stores, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "crossrank.serving.server",
        "--model-dir", str(serving_data.bundle_cased),
        "--token-store", str(stores.token_store),
        "--host", "127.0.0.1", "--http-port", str(free_port()),
    ]  # fmt: skip

    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 2
    assert completed.stderr.splitlines()[-1].startswith(
        f"error: token store {stores.token_store} was built for another tokenizer"
    )
    assert completed.stderr.splitlines()[-1].endswith("build the token store again for this bundle")
