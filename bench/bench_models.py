"""Measure teacher and student scoring throughput side by side on the same real pairs.

Usage (after `dvc repro` trained both models):

    python bench/bench_models.py --num-pairs 2000 --repeats 3

Both models score the same test-split pairs with the same batched, length-sorted
PyTorch path (`CrossEncoder.predict_logits`), alternating model order each repeat so
neither gets a warmer cache. Prints each model's best pairs per second, the ratio of
the two and the median of the per-repeat ratios. A repeat measures both models a few
seconds apart, so its ratio holds up when the virtual machine's speed drifts between
repeats. The ratio of the best rates can pair two different moments.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from crossrank import schema
from crossrank.models import CrossEncoder


def measure(encoder: CrossEncoder, queries: list[str], products: list[dict], batch_size: int) -> float:
    started = time.perf_counter()
    encoder.predict_logits(queries, products, batch_size=batch_size)
    return len(queries) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="artifacts/models", help="folder with teacher/ and student/ checkpoints")
    parser.add_argument("--pairs", default="artifacts/splits/test.parquet", help="real pairs to score")
    parser.add_argument("--num-pairs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    frame = pd.read_parquet(args.pairs).head(args.num_pairs)
    queries, products = frame[schema.QUERY].tolist(), frame.to_dict("records")
    encoders = {name: CrossEncoder.load(Path(args.models) / name) for name in ("teacher", "student")}
    for encoder in encoders.values():
        measure(encoder, queries[:128], products[:128], args.batch_size)  # warm-up

    rates: dict[str, list[float]] = {name: [] for name in encoders}
    for repeat in range(args.repeats):
        order = list(encoders) if repeat % 2 == 0 else list(reversed(encoders))
        for name in order:
            rates[name].append(measure(encoders[name], queries, products, args.batch_size))

    best = {name: max(values) for name, values in rates.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pairs: {len(queries)} real test pairs, batch size {args.batch_size}, best of {args.repeats}")
    print("| model | layers | max length | pairs/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, encoder in encoders.items():
        config = encoder.model.config
        print(f"| {name} | {config.num_hidden_layers} | {encoder.builder.spec.max_length} | {best[name]:.1f} |")
    ratios = [student / teacher for student, teacher in zip(rates["student"], rates["teacher"], strict=True)]
    print(f"student / teacher throughput, best rates: {best['student'] / best['teacher']:.2f}x")
    print(
        f"student / teacher throughput, median of {len(ratios)} repeats: {statistics.median(ratios):.2f}x "
        f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)"
    )


if __name__ == "__main__":
    main()
