"""Benchmark re-rank requests over HTTP against sentence-transformers on the same weights.

Each request re-ranks `--num-candidates` catalog items for one query, sent one request
at a time to a `crossrank serve` subprocess on 127.0.0.1, in three ways:

- `text`: every item's product fields in the request (the server tokenizes them);
- `token_store`: item_ids only, for queries outside the score cache;
- `score_cache`: item_ids only, for queries whose pairs are all cached (no model call).

The four paths (these three and the baseline below) take turns on each request
index, so a slow spell of the machine touches all of them alike.

The baseline scores the same (query, product text) pairs in-process with
`sentence_transformers.CrossEncoder.predict` on the checkpoint the bundle was exported
from, with the product fields joined by " [SEP] ", which gives the bundle's token ids
for text within the length limits. Latency is per request (HTTP included for the
server); pairs/s is candidates x requests / total time. p99 of a few dozen requests
is close to their maximum, so run more requests for a stable tail.

A second table splits each server path with the server's own step histogram
(`crossrank_step_seconds` on /metrics, read before and after each request): the mean
time per request in the model, and the share of the client's latency spent outside
the model (HTTP, JSON, query tokenization, store lookups). `server p50` is the median
of the server's `total` step (from parsing the request to its response body),
interpolated inside its histogram bucket. Buckets are 0.5 ms wide up to 2.5 ms, so
the median of a cached request is close. Above 10 ms the buckets are wide, so the
median there is coarse.
Last, the server's resident memory (VmRSS and its peak, VmHWM) after all requests.

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


@dataclass(frozen=True)
class ServerSteps:
    """The server's step histograms over one path's requests: sums, counts and bucket counts."""

    sums: dict[str, float]
    counts: dict[str, float]
    buckets: dict[str, list[tuple[float, float]]]  # step -> [(upper bound s, cumulative count)]

    def minus(self, before: ServerSteps) -> ServerSteps:
        return ServerSteps(
            {step: value - before.sums.get(step, 0.0) for step, value in self.sums.items()},
            {step: value - before.counts.get(step, 0.0) for step, value in self.counts.items()},
            {
                step: [(bound, count - dict(before.buckets.get(step, [])).get(bound, 0.0)) for bound, count in rows]
                for step, rows in self.buckets.items()
            },
        )

    def plus(self, other: ServerSteps) -> ServerSteps:
        return ServerSteps(
            {step: value + other.sums.get(step, 0.0) for step, value in self.sums.items()},
            {step: value + other.counts.get(step, 0.0) for step, value in self.counts.items()},
            {
                step: [(bound, count + dict(other.buckets.get(step, [])).get(bound, 0.0)) for bound, count in rows]
                for step, rows in self.buckets.items()
            },
        )

    def mean_ms(self, step: str) -> float:
        count = self.counts.get(step, 0.0)
        return 1000 * self.sums[step] / count if count else 0.0

    def median_ms(self, step: str) -> float:
        """Return the median of `step` in ms, interpolated linearly inside its histogram bucket."""
        rows = sorted(self.buckets[step])
        half = rows[-1][1] / 2
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in rows:
            if count >= half:
                if bound == float("inf"):
                    return 1000 * lower_bound
                share = (half - lower_count) / (count - lower_count) if count > lower_count else 1.0
                return 1000 * (lower_bound + share * (bound - lower_bound))
            lower_bound, lower_count = bound, count
        return 1000 * rows[-1][0]


def read_server_steps(client: httpx.Client) -> ServerSteps:
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name != "crossrank_step_seconds":
            continue
        for sample in family.samples:
            step = sample.labels["step"]
            if sample.name.endswith("_sum"):
                sums[step] = sample.value
            elif sample.name.endswith("_count"):
                counts[step] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets.setdefault(step, []).append((float(sample.labels["le"]), sample.value))
    return ServerSteps(sums, counts, buckets)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


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


def time_paths(
    args: argparse.Namespace,
    workload: Workload,
    model_name: str,
    stores: tuple[Path, Path],
    log: Path,
    baseline: Callable[[int], None],
) -> tuple[list[Timing], list[ServerSteps], dict[str, int]]:
    """Time the server's three request kinds and the in-process baseline, in turn per request.

    Interleaving spreads a slow spell of the machine over all paths instead of one.
    Returns the timings (server paths, then the baseline), the server's step histograms
    summed over each server path's timed requests, and the server's memory at the end.
    """
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

            server_paths = {
                "HTTP, product text": sender(workload.cold_queries, workload.products),
                "HTTP, token store": sender(workload.cold_queries, workload.item_ids),
                "HTTP, warm score cache": sender(workload.cached_queries, workload.item_ids),
            }
            paths = {**server_paths, BASELINE: baseline}
            for index in range(3):  # warm-up, outside the timings and step histograms
                for send in paths.values():
                    send(index)

            latencies: dict[str, list[float]] = {name: [] for name in paths}
            steps: dict[str, ServerSteps | None] = {name: None for name in server_paths}
            for index in range(args.num_requests):
                for name, send in paths.items():
                    before = read_server_steps(client) if name in server_paths else None
                    started = time.perf_counter()
                    send(index)
                    latencies[name].append(time.perf_counter() - started)
                    if before is not None:
                        delta = read_server_steps(client).minus(before)
                        steps[name] = delta if steps[name] is None else steps[name].plus(delta)
            timings = [Timing(name, latencies[name], args.num_candidates) for name in paths]
            return timings, [steps[name] for name in server_paths], memory_kb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


BASELINE = "sentence-transformers predict (in-process)"


def sentence_transformers_baseline(
    args: argparse.Namespace, workload: Workload, max_length: int
) -> tuple[Callable[[int], None], Any]:
    """Return a function that scores request `index` with `CrossEncoder.predict`, and the encoder."""
    from sentence_transformers import CrossEncoder

    encoder = CrossEncoder(str(args.checkpoint), num_labels=1, max_length=max_length, local_files_only=True)

    def predict(index: int) -> None:
        query = workload.cold_queries[index % len(workload.cold_queries)]
        pairs = [(query, product_text(product, workload.fields)) for product in workload.products(query)]
        encoder.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)

    return predict, encoder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model_dir)
    fields = list(bundle.config.input_spec.fields)
    log = work_dir / "server.log"

    # Timings of the server's three paths and the in-process baseline.
    workload, store_path, cache_path = prepare(args, fields, work_dir)
    baseline, encoder = sentence_transformers_baseline(args, workload, bundle.config.input_spec.max_length)
    timings, steps, memory = time_paths(
        args, workload, bundle.config.model_name, (store_path, cache_path), log, baseline
    )

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

    print("\n| path | client p50 ms | server p50 ms | server mean ms | model mean ms | outside the model |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for timing, step in zip(timings, steps, strict=False):
        client_mean_ms = 1000 * float(np.mean(timing.latencies_s))
        model_ms = step.mean_ms("model")
        cells = [
            timing.path,
            f"{1000 * float(np.median(timing.latencies_s)):.1f}",
            f"{step.median_ms('total'):.2f}",
            f"{step.mean_ms('total'):.2f}",
            f"{model_ms:.1f}",
            f"{1 - model_ms / client_mean_ms:.1%}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nserver memory after all requests: VmRSS {memory['VmRSS'] / 1024:.0f} MiB, peak VmHWM {memory['VmHWM'] / 1024:.0f} MiB")
    difference = np.max(np.abs(st_scores - onnx_scores))
    print(f"\nmax |sentence-transformers - bundle| score difference on {len(products)} pairs: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
