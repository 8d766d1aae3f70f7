"""How sure is the gate's gain-share verdict? A paired bootstrap over test queries.

Usage (after `dvc repro` wrote the test scores):

    python bench/gain_share_bootstrap.py --resamples 2000

The gate requires student >= BM25 + share x (teacher - BM25) on NDCG@10 and pairwise
accuracy over the test queries. Test sets of a few hundred queries are small. So this
script scores each query on its own with the evaluation harness and resamples the
queries with replacement. It reports how often the student meets the bar and the 90%
interval of its gain share. The three models are resampled together (paired), so the
query mix cancels out of the comparison.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from crossrank import schema
from crossrank.config import load_params
from crossrank.evaluation import evaluate_scores

MODELS = ("bm25", "teacher", "student")
METRICS = ("ndcg@10", "pairwise_accuracy")


def per_query_metrics(frame: pd.DataFrame, params_path: str) -> pd.DataFrame:
    """Return one row per test query with two or more labels: each model's metrics."""
    config = load_params(params_path).evaluate
    rows = []
    for query_id, judgments in frame.groupby(schema.QUERY_ID, sort=True):
        row: dict[str, object] = {"query_id": query_id}
        for model in MODELS:
            metrics = evaluate_scores(judgments, f"{model}_score", config, calibrated=False)["all"]
            for metric in METRICS:
                row[f"{model}:{metric}"] = metrics[metric]
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna().reset_index(drop=True)  # queries whose items share one label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", default="artifacts/splits/test.parquet")
    parser.add_argument("--scores", default="artifacts/scores", help="folder with bm25/teacher/student.parquet")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--share", type=float, default=0.9, help="the gate's gain share")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    frame = pd.read_parquet(args.test)
    for model in MODELS:
        scores = pd.read_parquet(Path(args.scores) / f"{model}.parquet")
        frame = frame.merge(scores[[schema.QUERY_ID, schema.ITEM_ID, f"{model}_score"]], on=[schema.QUERY_ID, schema.ITEM_ID])
    table = per_query_metrics(frame, args.params)
    rng = np.random.default_rng(args.seed)
    samples = rng.integers(0, len(table), size=(args.resamples, len(table)))

    print(f"{len(table)} test queries, {args.resamples} paired resamples, bar: student >= BM25 + {args.share} x (teacher - BM25)")
    print("| metric | BM25 | teacher | student | gain share | 90% interval of the share | resamples meeting the bar |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for metric in METRICS:
        values = {model: table[f"{model}:{metric}"].to_numpy(dtype=float) for model in MODELS}
        means = {model: values[model].mean() for model in MODELS}
        share = (means["student"] - means["bm25"]) / (means["teacher"] - means["bm25"])
        boot = {model: values[model][samples].mean(axis=1) for model in MODELS}
        gain = boot["teacher"] - boot["bm25"]
        shares = (boot["student"] - boot["bm25"]) / np.where(gain == 0, np.nan, gain)
        met = np.mean(boot["student"] >= boot["bm25"] + args.share * gain)
        low, high = np.nanpercentile(shares, [5, 95])
        print(
            f"| {metric} | {means['bm25']:.4f} | {means['teacher']:.4f} | {means['student']:.4f} | {share:.3f} "
            f"| {low:.2f} to {high:.2f} | {met:.1%} |"
        )


if __name__ == "__main__":
    main()
