"""Compare the student's scoring graphs side by side: PyTorch, ONNX fp32, fused, int8.

Usage (after `dvc repro` trained the student):

    python bench/bench_onnx.py --checkpoint artifacts/models/student --num-requests 30

Each graph scores the same requests of 100 test-split pairs, as `Bundle.score` does in
the server (pairs sorted by length, in batches of `--batch-size`). The graphs are exported here from the checkpoint with the
export stage's functions: plain fp32, fp32 with fused attention, layer norm and GELU,
and int8 with per-token activation scales (on a graph fused without attention). For
each it prints the median latency per request, pairs per second, the speed-up over
PyTorch, the largest score difference from PyTorch and the share of same-query pairs
ordered as PyTorch orders them. With `--profile`, it also prints where ONNX Runtime
spends the int8 graph's time, by op type, from its profiler.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from crossrank import schema
from crossrank.bundle import load_bundle
from crossrank.export import export_onnx, optimize_onnx, quantize_int8, ranking_agreement, write_bundle
from crossrank.models import CrossEncoder, sigmoid


def requests_of(pairs: pd.DataFrame, num_candidates: int, num_requests: int) -> list[pd.DataFrame]:
    """Up to `num_requests` requests of `num_candidates` consecutive test pairs each.

    Home Depot judges about 6 items per query, so a request contains the pairs of several
    queries. That changes nothing for the model, which scores each pair on its own.
    """
    ordered = pairs.sort_values([schema.QUERY_ID, schema.ITEM_ID], kind="stable").reset_index(drop=True)
    starts = range(0, len(ordered) - num_candidates + 1, num_candidates)
    return [ordered.iloc[start : start + num_candidates] for start in starts][:num_requests]


def time_interleaved(
    scorers: dict[str, Callable[[pd.DataFrame], np.ndarray]], requests: list[pd.DataFrame]
) -> dict[str, tuple[float, np.ndarray]]:
    """Time every scorer on every request, in turn per request, after one warm-up request each.

    Interleaving spreads a slow spell of the machine over all scorers instead of one.
    Returns, per scorer, the median seconds per request and the scores of all requests.
    """
    for score in scorers.values():
        score(requests[0])
    latencies: dict[str, list[float]] = {name: [] for name in scorers}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    for request in requests:
        for name, score in scorers.items():
            started = time.perf_counter()
            scores[name].append(score(request))
            latencies[name].append(time.perf_counter() - started)
    return {name: (float(np.median(latencies[name])), np.concatenate(scores[name])) for name in scorers}


def profile_op_types(graph: Path, batch: dict[str, np.ndarray], num_runs: int, work: Path) -> list[tuple[str, float]]:
    """Run `graph` on one padded batch with ONNX Runtime's profiler; return (op type, share of time), largest first."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "profile")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    for _ in range(num_runs):
        session.run(None, batch)
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    total = sum(totals.values())
    return [(op_type, duration / total) for op_type, duration in totals.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/models/student"))
    parser.add_argument("--pairs", type=Path, default=Path("artifacts/splits/test.parquet"))
    parser.add_argument("--num-requests", type=int, default=30)
    parser.add_argument("--num-candidates", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="print the int8 graph's time by op type")
    args = parser.parse_args()

    pairs = pd.read_parquet(args.pairs)
    requests = requests_of(pairs, args.num_candidates, args.num_requests)
    query_ids = pd.concat(requests)[schema.QUERY_ID].tolist()
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))

    # The graphs, written as bundles so they score through Bundle.score like the server.
    fp32 = export_onnx(args.checkpoint, work / "fp32.onnx")
    graphs = {
        "ONNX fp32": fp32,
        "ONNX fp32, fused": optimize_onnx(fp32, work / "fused.onnx"),
        "ONNX int8, per-token scales": quantize_int8(
            optimize_onnx(fp32, work / "fused_no_attention.onnx", fuse_attention=False), work / "int8.onnx"
        ),
    }
    bundles = {name: load_bundle(write_bundle(path, args.checkpoint, work / path.stem, "bench")) for name, path in graphs.items()}

    encoder = CrossEncoder.load(args.checkpoint)
    encoder.model.eval()

    def torch_score(request: pd.DataFrame) -> np.ndarray:
        products = request.to_dict("records")
        return sigmoid(encoder.predict_logits(request[schema.QUERY].tolist(), products, batch_size=args.batch_size))

    scorers: dict[str, Callable[[pd.DataFrame], np.ndarray]] = {"PyTorch (CrossEncoder.predict_logits)": torch_score}
    for name, bundle in bundles.items():

        def onnx_score(request: pd.DataFrame, bundle=bundle) -> np.ndarray:
            return bundle.score(request[schema.QUERY].tolist(), request.to_dict("records"), batch_size=args.batch_size)

        scorers[name] = onnx_score
    timed = time_interleaved(scorers, requests)
    reference_s, reference = timed["PyTorch (CrossEncoder.predict_logits)"]
    rows = [(name, seconds, scores) for name, (seconds, scores) in timed.items()]

    print(
        f"\n{args.checkpoint}: {len(requests)} requests of {args.num_candidates} pairs, batch size "
        f"{args.batch_size}; {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| graph | p50 ms per request | pairs/s | speed-up over PyTorch | max score difference | pairs ordered as PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    num_pairs = args.num_candidates
    for name, seconds, scores in rows:
        agreement = ranking_agreement(reference, scores, query_ids)
        difference = float(np.max(np.abs(scores - reference)))
        print(
            f"| {name} | {1000 * seconds:.1f} | {num_pairs / seconds:.0f} | {reference_s / seconds:.2f}x | "
            f"{difference:.1e} | {agreement:.3f} |"
        )


    if args.profile:
        int8 = bundles["ONNX int8, per-token scales"]
        request = requests[0].sort_values(schema.QUERY)
        batch = int8.builder.build(request[schema.QUERY].tolist(), request.to_dict("records"))
        print(f"\nONNX Runtime profile of the int8 graph, one padded batch of shape {batch['input_ids'].shape}:\n")
        print("| op type | share of kernel time |")
        print("| --- | ---: |")
        for op_type, share in profile_op_types(graphs["ONNX int8, per-token scales"], batch, 10, work):
            if share >= 0.01:
                print(f"| {op_type} | {share:.1%} |")


if __name__ == "__main__":
    main()
