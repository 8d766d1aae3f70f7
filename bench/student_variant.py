"""Distill a student variant outside DVC and score it on the whole validation split.

Usage (after `dvc repro` wrote the teacher-labeled pairs):

    python bench/student_variant.py --name bce1 --set bce_weight=1.0 --threads 1
    python bench/student_variant.py --references

A variant is the `student` section of params.yaml with `--set key=value` overrides
(values are YAML). It trains with `distill_student`, as the stage does, into
`--out/NAME`, then prints NDCG@10 and pairwise accuracy on every validation query
and on the test split. Choose variants by the validation columns; the test columns
are for the record. `--references` prints BM25 and the teacher on the validation
split, so a variant's validation gain share can be computed. Two variants with
`--threads 1` can run side by side on two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from crossrank import schema
from crossrank.bm25 import BM25Index
from crossrank.config import EvaluateConfig, load_params
from crossrank.evaluation import evaluate_scores
from crossrank.models import CrossEncoder
from crossrank.training import distill_student


def scored_metrics(frame: pd.DataFrame, scores: object, config: EvaluateConfig) -> dict[str, float]:
    """Return NDCG@10 and pairwise accuracy of `scores` on the judgments of `frame`."""
    metrics = evaluate_scores(frame.assign(score=scores), "score", config, calibrated=False)["all"]
    return {"ndcg@10": round(float(metrics["ndcg@10"]), 4), "pairwise_accuracy": round(float(metrics["pairwise_accuracy"]), 4)}


def model_metrics(checkpoint: Path, frame: pd.DataFrame, config: EvaluateConfig) -> dict[str, float]:
    """Score `frame` with a saved cross-encoder and return its metrics."""
    encoder = CrossEncoder.load(checkpoint)
    return scored_metrics(frame, encoder.predict_logits(frame[schema.QUERY].tolist(), frame.to_dict("records")), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="variant name, also its folder under --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a student parameter")
    parser.add_argument("--references", action="store_true", help="score BM25 and the teacher on validation, then stop")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--out", default="artifacts/variants")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    params = load_params(args.params)
    artifacts = Path(args.artifacts)
    validation = pd.read_parquet(artifacts / "splits/validation.parquet")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.references:
        index = BM25Index(pd.read_parquet(artifacts / "catalog.parquet"), params.bm25)
        bm25 = index.score_pairs(validation[schema.QUERY], validation[schema.ITEM_ID])
        print(json.dumps({
            "split": "validation",
            "bm25": scored_metrics(validation, bm25, params.evaluate),
            "teacher": model_metrics(artifacts / "models/teacher", validation, params.evaluate),
        }))
        return
    if not args.name:
        parser.error("give --name for a variant, or --references")

    updates = {}
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator:
            parser.error(f"--set {item!r} has no '='; write it as key=value, e.g. --set bce_weight=1.0")
        updates[key] = yaml.safe_load(value)
    config = params.student.model_copy(update={**updates, "num_threads": args.threads})
    type(config).model_validate(config.model_dump())  # a bad override fails here, with pydantic's message
    out = Path(args.out) / args.name
    started = time.perf_counter()
    pairs = pd.read_parquet(artifacts / "augmented/labeled_pairs.parquet")
    result = distill_student(pairs, validation, config, params.evaluate, out / "model")
    summary = {
        "name": args.name,
        "set": updates,
        "best_step": result.best_step,
        "curve": [(row["step"], round(row["validation_ndcg@10"], 4)) for row in result.history],
        "validation": model_metrics(out / "model", validation, params.evaluate),
        "test": model_metrics(out / "model", pd.read_parquet(artifacts / "splits/test.parquet"), params.evaluate),
        "duration_s": round(time.perf_counter() - started),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
