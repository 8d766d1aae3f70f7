"""Benchmark re-rank requests over HTTP against sentence-transformers on the same weights.

Each request re-ranks `--num-candidates` catalog items for one query, sent one request
at a time to a `crossrank serve` subprocess on 127.0.0.1, in three ways:

- `text`: every item's product fields in the request (the server tokenizes them);
- `token_store`: item_ids only, for queries outside the score cache;
- `score_cache`: item_ids only, for queries whose pairs are all cached (no model call).

The baseline scores the same (query, product text) pairs in-process with
`sentence_transformers.CrossEncoder.predict` on the checkpoint the bundle was exported
from, with the product fields joined by " [SEP] ", which gives the bundle's token ids
for text within the length limits. Latency is per request (HTTP included for the
server); pairs/s is candidates x requests / total time. p99 of a few dozen requests
is close to their maximum, so run more requests for a stable tail.

    python bench/bench_serving.py --model-dir BUNDLE --checkpoint CHECKPOINT \\
        --data ../shared/datasets/homedepot --num-requests 50
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from crossrank.bm25 import build_catalog
from crossrank.bundle import load_bundle
from crossrank.config import DataConfig
from crossrank.ingest import ingest, normalize_query
from crossrank.serving.score_cache import build_score_cache
from crossrank.serving.token_store import build_token_store

@dataclass(frozen=True)
class Timing:
    """Latencies of one path, in seconds per request."""

    path: str
    latencies_s: list[float]
    num_candidates: int

    def row(self) -> str:
        latencies_ms = np.asarray(self.latencies_s) * 1000
        pairs_per_s = self.num_candidates * len(latencies_ms) / sum(self.latencies_s)
        p50, p99 = np.percentile(latencies_ms, [50, 99])
        cells = [self.path, len(latencies_ms), self.num_candidates, f"{p50:.1f}", f"{p99:.1f}", f"{pairs_per_s:.0f}"]
        return "| " + " | ".join(str(cell) for cell in cells) + " |"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder the bundle was exported from")
    parser.add_argument("--data", type=Path, required=True, help="Home Depot data folder (train.csv.zip and attributes)")
    parser.add_argument("--max-queries", type=int, default=50, help="queries to ingest; their items form the catalog")
    parser.add_argument("--num-requests", type=int, default=50, help="timed requests per path")
    parser.add_argument("--num-candidates", type=int, default=100, help="items per request")
    parser.add_argument("--batch-size", type=int, default=50, help="pairs per model call, server and baseline")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="folder for the stores and server log (default: a new temporary one)"
    )
    return parser.parse_args(argv)


def product_text(product: dict[str, str], fields: Sequence[str]) -> str:
    return " [SEP] ".join(product.get(field, "") for field in fields)


def start_server(arguments: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "crossrank.serving.server", "--host", "127.0.0.1", "--http-port", str(port)]
    with log.open("wb") as output:
        process = subprocess.Popen([*command, *arguments], stdout=output, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(
    process: subprocess.Popen, client: httpx.Client, model_name: str, log: Path, timeout_s: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if client.get(f"/v1/models/{model_name}").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s} s; see {log}")


def time_requests(send: Callable[[int], None], num_requests: int, num_warmup: int = 3) -> list[float]:
    """Send `num_warmup` untimed requests, then return the latency of each of `num_requests`."""
    for index in range(num_warmup):
        send(index)
    latencies = []
    for index in range(num_requests):
        started = time.perf_counter()
        send(index)
        latencies.append(time.perf_counter() - started)
    return latencies


@dataclass(frozen=True)
class Workload:
    """Candidates per query; the score cache contains every pair of `cached_queries`."""

    fields: list[str]
    candidates: dict[str, pd.DataFrame]
    cached_queries: list[str]
    cold_queries: list[str]

    def products(self, query: str) -> list[dict[str, str]]:
        return self.candidates[query][self.fields].to_dict("records")

    def item_ids(self, query: str) -> list[str]:
        return self.candidates[query]["item_id"].tolist()


def prepare(args: argparse.Namespace, fields: list[str], work_dir: Path) -> tuple[Workload, Path, Path]:
    """Pick candidates per query and build the token store and score cache; return their paths too."""
    judgments = ingest(DataConfig(path=str(args.data.resolve()), max_queries=args.max_queries))
    catalog = build_catalog(judgments)
    if len(catalog) < args.num_candidates:
        raise SystemExit(f"catalog has {len(catalog)} items, fewer than --num-candidates {args.num_candidates}")

    # Every other query goes to the score cache, with all of its candidates.
    queries = sorted(judgments["query"].map(normalize_query).unique())
    rng = np.random.default_rng(13)
    candidates = {query: catalog.iloc[rng.choice(len(catalog), args.num_candidates, replace=False)] for query in queries}
    workload = Workload(fields, candidates, queries[0::2], queries[1::2])

    store_path = work_dir / "token_store.sqlite"
    cache_path = work_dir / "score_cache.sqlite"
    build_token_store(catalog, args.model_dir, store_path)
    pairs = pd.concat([candidates[query].assign(query=query) for query in workload.cached_queries], ignore_index=True)
    num_queries = len(workload.cached_queries)
    build_score_cache(pairs, args.model_dir, cache_path, num_queries=num_queries, batch_size=args.batch_size)
    return workload, store_path, cache_path


def time_server(
    args: argparse.Namespace, workload: Workload, model_name: str, stores: tuple[Path, Path], log: Path
) -> list[Timing]:
    """Time the three request kinds against a server subprocess on 127.0.0.1."""
    store_path, cache_path = stores
    arguments = ["--model-dir", str(args.model_dir), "--token-store", str(store_path), "--score-cache", str(cache_path)]
    process, url = start_server([*arguments, "--batch-size", str(args.batch_size)], log)
    try:
        with httpx.Client(base_url=url, timeout=120.0) as client:
            wait_ready(process, client, model_name, log)
            predict = f"/v1/models/{model_name}:predict"

            def sender(queries: list[str], items: Callable[[str], list]) -> Callable[[int], None]:
                def send(index: int) -> None:
                    query = queries[index % len(queries)]
                    response = client.post(predict, json={"instances": [{"query": query, "items": items(query)}]})
                    response.raise_for_status()

                return send

            paths = [
                ("HTTP, product text", sender(workload.cold_queries, workload.products)),
                ("HTTP, token store", sender(workload.cold_queries, workload.item_ids)),
                ("HTTP, warm score cache", sender(workload.cached_queries, workload.item_ids)),
            ]
            return [Timing(name, time_requests(send, args.num_requests), args.num_candidates) for name, send in paths]
    finally:
        process.terminate()
        process.wait(timeout=30)


def time_sentence_transformers(args: argparse.Namespace, workload: Workload, max_length: int) -> tuple[Timing, Any]:
    """Time `CrossEncoder.predict` on the product-text requests; return the timing and the encoder."""
    from sentence_transformers import CrossEncoder

    encoder = CrossEncoder(str(args.checkpoint), num_labels=1, max_length=max_length, local_files_only=True)

    def predict(index: int) -> None:
        query = workload.cold_queries[index % len(workload.cold_queries)]
        pairs = [(query, product_text(product, workload.fields)) for product in workload.products(query)]
        encoder.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)

    latencies = time_requests(predict, args.num_requests)
    return Timing("sentence-transformers predict (in-process)", latencies, args.num_candidates), encoder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model_dir)
    fields = list(bundle.config.input_spec.fields)
    log = work_dir / "server.log"

    # Timings: the server's three paths, then the in-process baseline.
    workload, store_path, cache_path = prepare(args, fields, work_dir)
    timings = time_server(args, workload, bundle.config.model_name, (store_path, cache_path), log)
    baseline, encoder = time_sentence_transformers(args, workload, bundle.config.input_spec.max_length)
    timings.append(baseline)

    # Agreement of the baseline with the bundle on one request's pairs.
    query = workload.cold_queries[0]
    products = workload.products(query)
    pairs = [(query, product_text(product, fields)) for product in products]
    st_scores = encoder.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
    onnx_scores = bundle.score([query] * len(products), products, batch_size=args.batch_size)

    config = bundle.config
    print(f"\nmodel {config.model_name} {config.model_version} ({config.precision}), {os.cpu_count()} CPUs, "
          f"batch size {args.batch_size}, server log {log}\n")  # fmt: skip
    print("| path | requests | candidates | p50 ms | p99 ms | pairs/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for timing in timings:
        print(timing.row())
    difference = np.max(np.abs(st_scores - onnx_scores))
    print(f"\nmax |sentence-transformers - bundle| score difference on {len(products)} pairs: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
