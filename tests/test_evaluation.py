"""Tests of the evaluation harness against metrics worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score

from crossrank.config import EvaluateConfig
from crossrank.errors import DataError
from crossrank.evaluation import (
    evaluate_scores,
    metric_keys,
    query_segments,
    random_baseline,
    recall_key,
    results_table,
)

# 1 / log2(3): the DCG discount of rank 2.
DISCOUNT_2 = 1 / math.log2(3)


def _table(queries: list[tuple[str, str, list[float], list[float]]]) -> pd.DataFrame:
    rows = []
    for query_id, query, labels, scores in queries:
        for position, (label, score) in enumerate(zip(labels, scores, strict=True)):
            rows.append(
                {
                    "query_id": query_id,
                    "query": query,
                    "item_id": f"{query_id}-{position}",
                    "title": f"product {position}",
                    "label": label,
                    "score": score,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def judgments() -> pd.DataFrame:
    # qa: three labels, scores put the 0.5 item above the 1.0 item.
    # qb: tail by length (4 tokens), its two items tie.
    # qc: one distinct label, so no per-query metric uses it.
    # qd: no relevant item (label >= 0.75), scores reversed.
    return _table(
        [
            ("qa", "drill", [1.0, 0.5, 0.0], [0.2, 0.9, 0.1]),
            ("qb", "cordless drill 18v battery", [1.0, 0.0], [0.5, 0.5]),
            ("qc", "white paint", [0.5, 0.5], [0.3, 0.8]),
            ("qd", "deck screws", [0.5, 0.0], [0.1, 0.4]),
        ]
    )


# NDCG by hand, gains are the labels and the discount of rank r is 1 / log2(r + 1).
# qa: ranking 0.5, 1.0, 0.0 -> DCG = 0.5 + 1.0 / log2(3); ideal 1.0, 0.5 -> 1.0 + 0.5 / log2(3).
NDCG_QA = (0.5 + 1.0 * DISCOUNT_2) / (1.0 + 0.5 * DISCOUNT_2)
# qb: a tie of labels 1.0 and 0.0 gains their mean 0.5 at ranks 1 and 2. Ideal DCG = 1.0.
NDCG_QB = 0.5 * (1 + DISCOUNT_2) / 1.0
# qd: ranking 0.0, 0.5 -> DCG = 0.5 / log2(3); ideal DCG = 0.5.
NDCG_QD = (0.5 * DISCOUNT_2) / 0.5


def test_evaluate_scores_all_segment(judgments: pd.DataFrame) -> None:
    metrics = evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=True)["all"]

    assert list(metrics) == [
        "ndcg@5",
        "ndcg@10",
        "mrr",
        "pairwise_accuracy",
        "recall@p95",
        "rmse",
        "num_queries",
        "num_pairs",
    ]
    # qc is left out: queries qa, qb and qd.
    assert metrics["num_queries"] == 3
    assert metrics["num_pairs"] == 9
    assert metrics["ndcg@5"] == pytest.approx((NDCG_QA + NDCG_QB + NDCG_QD) / 3)
    assert metrics["ndcg@10"] == pytest.approx((NDCG_QA + NDCG_QB + NDCG_QD) / 3)
    # qa: the 1.0 item is second -> 1/2. qb: the worst case puts the relevant item
    # after its tied neighbour -> 1/2. qd: no relevant item -> 0.
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    # qa: (1.0, 0.5) wrong, (1.0, 0.0) right, (0.5, 0.0) right -> 2/3.
    # qb: one tied pair -> 0.5. qd: one wrong pair -> 0.
    assert metrics["pairwise_accuracy"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    # Relevant rows score 0.2 and 0.5 while 0.9, 0.8, 0.5, 0.4 and 0.3 are not
    # relevant, so precision stays below 0.95 at every threshold.
    assert metrics["recall@p95"] == 0.0
    # Label scale 1..3: error = 2 * (score - label). Squared score - label over 9 rows:
    # 0.64 + 0.16 + 0.01 + 0.25 + 0.25 + 0.04 + 0.09 + 0.16 + 0.16 = 1.76.
    assert metrics["rmse"] == pytest.approx(2 * math.sqrt(1.76 / 9))


def test_evaluate_scores_head_and_tail_by_length(judgments: pd.DataFrame) -> None:
    metrics = evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=True)
    head, tail = metrics["head"], metrics["tail"]

    # Head: qa, qc, qd (fewer than 4 tokens), of which qc has one label.
    assert head["num_queries"] == 2
    assert head["num_pairs"] == 7
    assert head["ndcg@10"] == pytest.approx((NDCG_QA + NDCG_QD) / 2)
    assert head["mrr"] == pytest.approx((1 / 2 + 0) / 2)
    assert head["pairwise_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    assert head["recall@p95"] == 0.0
    # 0.64 + 0.16 + 0.01 (qa) + 0.04 + 0.09 (qc) + 0.16 + 0.16 (qd) = 1.26 over 7 rows.
    assert head["rmse"] == pytest.approx(2 * math.sqrt(1.26 / 7))

    # Tail: qb alone.
    assert tail["num_queries"] == 1
    assert tail["num_pairs"] == 2
    assert tail["ndcg@5"] == pytest.approx(NDCG_QB)
    assert tail["mrr"] == pytest.approx(1 / 2)
    assert tail["pairwise_accuracy"] == pytest.approx(0.5)
    # (0.5 - 1.0)^2 + (0.5 - 0.0)^2 = 0.5 over 2 rows.
    assert tail["rmse"] == pytest.approx(2 * math.sqrt(0.5 / 2))


def test_evaluate_scores_uncalibrated_has_no_rmse(judgments: pd.DataFrame) -> None:
    judgments["score"] = judgments["score"] * 10 - 3
    metrics = evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=False)

    for segment in ("all", "head", "tail"):
        assert metrics[segment]["rmse"] is None
    # A monotone transform keeps every ranking metric.
    assert metrics["all"]["mrr"] == pytest.approx(1 / 3)
    assert metrics["all"]["pairwise_accuracy"] == pytest.approx(7 / 18)


def test_ndcg_cutoff_drops_low_ranks() -> None:
    # The only relevant item is ranked 6th: outside the top 5, and at rank 6 inside
    # the top 10 with gain 1.0 / log2(7). Ideal DCG = 1.0.
    frame = _table([("q1", "drill", [0, 0, 0, 0, 0, 1.0], [6, 5, 4, 3, 2, 1])])

    metrics = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=False)["all"]

    assert metrics["ndcg@5"] == 0.0
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(7))
    assert metrics["mrr"] == pytest.approx(1 / 6)
    # Five pairs (1.0 against each 0), all ordered wrong.
    assert metrics["pairwise_accuracy"] == 0.0


def test_constant_scores_tie_everything() -> None:
    frame = _table([("q1", "drill", [1.0, 0.0, 0.0], [0.5, 0.5, 0.5])])

    metrics = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=False)["all"]

    # Tie-averaged NDCG: each rank gains the mean label 1/3. Ideal DCG = 1.0.
    assert metrics["ndcg@5"] == pytest.approx((1 + DISCOUNT_2 + 1 / 2) / 3)
    # Worst case: the relevant item comes after both tied non-relevant items.
    assert metrics["mrr"] == pytest.approx(1 / 3)
    # Two pairs, both tied, 0.5 each.
    assert metrics["pairwise_accuracy"] == pytest.approx(0.5)


def test_mrr_tie_between_relevant_items() -> None:
    # The 0.0 item scores highest; the two relevant items tie behind it, so the first
    # relevant item is at rank 2.
    frame = _table([("q1", "drill", [1.0, 1.0, 0.0], [0.7, 0.7, 0.9])])

    metrics = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=False)["all"]

    assert metrics["mrr"] == pytest.approx(1 / 2)
    # (1.0, 0.0) twice, both wrong. The tie is between equal labels, so it does not count.
    assert metrics["pairwise_accuracy"] == 0.0


def test_recall_at_target_precision() -> None:
    # Pooled over two queries, scores descending: 0.9 R, 0.8 R, 0.7 N, 0.6 R, 0.1 N.
    # Threshold 0.8: precision 2/2, recall 2/3. Threshold 0.6: precision 3/4, recall 3/3.
    frame = _table(
        [
            ("q1", "drill", [1.0, 0.0, 0.0], [0.9, 0.7, 0.1]),
            ("q2", "paint", [1.0, 1.0], [0.8, 0.6]),
        ]
    )

    at_95 = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=False)["all"]
    at_75 = evaluate_scores(frame, "score", EvaluateConfig(target_precision=0.75), calibrated=False)["all"]

    assert at_95["recall@p95"] == pytest.approx(2 / 3)
    assert at_75["recall@p75"] == pytest.approx(1.0)


def test_recall_key_follows_target_precision() -> None:
    assert recall_key(EvaluateConfig()) == "recall@p95"
    assert recall_key(EvaluateConfig(target_precision=0.9)) == "recall@p90"
    assert metric_keys(EvaluateConfig(target_precision=0.8))[4] == "recall@p80"


def test_single_label_queries_excluded() -> None:
    frame = _table([("qc", "white paint", [0.5, 0.5], [0.3, 0.8])])

    metrics = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=True)["all"]

    assert metrics["num_queries"] == 0
    assert metrics["ndcg@5"] is None
    assert metrics["ndcg@10"] is None
    assert metrics["mrr"] is None
    assert metrics["pairwise_accuracy"] is None
    # No row reaches the relevance threshold, so recall is undefined.
    assert metrics["recall@p95"] is None
    # Row-level RMSE still uses both rows: (0.3 - 0.5)^2 + (0.8 - 0.5)^2 = 0.13.
    assert metrics["num_pairs"] == 2
    assert metrics["rmse"] == pytest.approx(2 * math.sqrt(0.13 / 2))


def test_empty_segment_gives_none_not_nan(judgments: pd.DataFrame) -> None:
    short_queries = judgments[judgments["query_id"] != "qb"]

    metrics = evaluate_scores(short_queries, "score", EvaluateConfig(), calibrated=True)

    assert metrics["tail"] == {
        "ndcg@5": None,
        "ndcg@10": None,
        "mrr": None,
        "pairwise_accuracy": None,
        "recall@p95": None,
        "rmse": None,
        "num_queries": 0,
        "num_pairs": 0,
    }
    for segment_metrics in metrics.values():
        for value in segment_metrics.values():
            assert value is None or not math.isnan(value)


def test_metrics_ignore_row_order(judgments: pd.DataFrame) -> None:
    shuffled = judgments.sample(frac=1.0, random_state=3)

    expected = evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=True)
    actual = evaluate_scores(shuffled, "score", EvaluateConfig(), calibrated=True)

    for segment, metrics in expected.items():
        assert actual[segment] == pytest.approx(metrics)


def _pair_credit(preferred_score: float, other_score: float) -> float:
    if preferred_score > other_score:
        return 1.0
    if preferred_score == other_score:
        return 0.5
    return 0.0


def _reference_metrics(frame: pd.DataFrame, threshold: float) -> dict[str, float]:
    # One query at a time with plain loops, to check the batched computation.
    per_query: dict[str, list[float]] = {"ndcg@5": [], "ndcg@10": [], "mrr": [], "pairwise_accuracy": []}
    for _, query in frame.groupby("query_id"):
        labels, scores = query["label"].to_numpy(), query["score"].to_numpy()
        if labels.min() == labels.max():
            continue
        for k in (5, 10):
            per_query[f"ndcg@{k}"].append(ndcg_score([labels], [scores], k=k))

        # Worst-case rank of each relevant item: after higher scores and tied non-relevant items.
        ranks = []
        for i in range(len(labels)):
            if labels[i] < threshold:
                continue
            num_higher = int((scores > scores[i]).sum())
            num_tied_irrelevant = int(((scores == scores[i]) & (labels < threshold)).sum())
            ranks.append(1 + num_higher + num_tied_irrelevant)
        per_query["mrr"].append(1 / min(ranks) if ranks else 0.0)

        credits = []
        for i in range(len(labels)):
            for j in range(len(labels)):
                if labels[i] > labels[j]:
                    credits.append(_pair_credit(scores[i], scores[j]))
        per_query["pairwise_accuracy"].append(sum(credits) / len(credits))
    return {name: float(np.mean(values)) for name, values in per_query.items()}


def test_batched_metrics_match_per_query_loop() -> None:
    generator = np.random.default_rng(7)
    queries = []
    for index in range(60):
        size = int(generator.integers(1, 13))
        labels = generator.choice([0.0, 0.165, 0.335, 0.5, 0.665, 0.835, 1.0], size).tolist()
        # Scores on a coarse grid, so many queries have ties.
        scores = generator.integers(0, 4, size).astype(float).tolist()
        queries.append((f"q{index}", f"query {index}", labels, scores))
    frame = _table(queries)

    metrics = evaluate_scores(frame, "score", EvaluateConfig(), calibrated=False)["all"]
    expected = _reference_metrics(frame, threshold=0.75)

    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name


def test_query_segments_by_length(judgments: pd.DataFrame) -> None:
    segments = query_segments(judgments, EvaluateConfig(tail_min_query_tokens=2))

    by_query = dict(zip(judgments["query_id"], segments))
    assert by_query == {"qa": "head", "qb": "tail", "qc": "tail", "qd": "tail"}
    assert segments.index.equals(judgments.index)


def _write_query_log(path: Path) -> Path:
    # After normalization: drill 60, white paint 40, deck screws 30,
    # cordless drill 18v battery 2, hammer 1 -> 5 distinct queries.
    path.write_text(
        "query,count\n"
        "Drill,50\n"
        "  drill ,10\n"
        "white paint,40\n"
        "deck screws,30\n"
        "hammer,1\n"
        "cordless drill 18v battery,2\n",
        encoding="utf-8",
    )
    return path


def test_query_segments_by_query_log(judgments: pd.DataFrame, tmp_path: Path) -> None:
    log = _write_query_log(tmp_path / "queries.csv")

    # 0.2 * 5 = 1 head query: drill.
    narrow = query_segments(judgments, EvaluateConfig(query_log=str(log), head_fraction=0.2))
    # 0.5 * 5 = 2.5, rounded to 3 head queries: drill, white paint, deck screws.
    wide = query_segments(judgments, EvaluateConfig(query_log=str(log), head_fraction=0.5))

    assert dict(zip(judgments["query_id"], narrow)) == {"qa": "head", "qb": "tail", "qc": "tail", "qd": "tail"}
    assert dict(zip(judgments["query_id"], wide)) == {"qa": "head", "qb": "tail", "qc": "head", "qd": "head"}


def test_query_log_tie_and_unlogged_query(tmp_path: Path) -> None:
    log = tmp_path / "queries.csv"
    log.write_text("query,count\nbolt,5\nanchor,5\n", encoding="utf-8")
    frame = _table(
        [
            ("q1", "bolt", [1.0, 0.0], [1, 0]),
            ("q2", "Anchor", [1.0, 0.0], [1, 0]),
            ("q3", "lumber", [1.0, 0.0], [1, 0]),
        ]
    )

    segments = query_segments(frame, EvaluateConfig(query_log=str(log), head_fraction=0.5))

    # One head query of two. The tied counts are ordered by text, so anchor wins.
    assert dict(zip(frame["query_id"], segments)) == {"q1": "tail", "q2": "head", "q3": "tail"}


def test_evaluate_scores_uses_query_log(judgments: pd.DataFrame, tmp_path: Path) -> None:
    log = _write_query_log(tmp_path / "queries.csv")
    config = EvaluateConfig(query_log=str(log), head_fraction=0.2)

    metrics = evaluate_scores(judgments, "score", config, calibrated=False)

    # Head is qa alone. Tail contains qb, qc (one label) and qd.
    assert metrics["head"]["num_queries"] == 1
    assert metrics["head"]["mrr"] == pytest.approx(1 / 2)
    assert metrics["tail"]["num_queries"] == 2
    assert metrics["tail"]["pairwise_accuracy"] == pytest.approx((0.5 + 0) / 2)


def test_missing_query_log_raises(judgments: pd.DataFrame, tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"

    with pytest.raises(DataError) as error:
        query_segments(judgments, EvaluateConfig(query_log=str(missing)))

    assert str(error.value) == (
        f"query log not found: {missing}. Set evaluate.query_log in params.yaml to a CSV "
        'with columns query,count, or to "" to split head and tail by query length.'
    )


def test_query_log_without_count_column_raises(judgments: pd.DataFrame, tmp_path: Path) -> None:
    log = tmp_path / "queries.csv"
    log.write_text("query,hits\ndrill,3\n", encoding="utf-8")

    with pytest.raises(DataError) as error:
        query_segments(judgments, EvaluateConfig(query_log=str(log)))

    assert str(error.value) == (
        f"query log {log} has no column 'count'. Found 'query', 'hits'. "
        "Write a header line 'query,count'."
    )


def test_query_log_negative_count_raises(judgments: pd.DataFrame, tmp_path: Path) -> None:
    log = tmp_path / "queries.csv"
    log.write_text("query,count\ndrill,3\npaint,-1\n", encoding="utf-8")

    with pytest.raises(DataError) as error:
        query_segments(judgments, EvaluateConfig(query_log=str(log)))

    assert str(error.value) == (
        f"query log {log} has an invalid count in 1 of 2 rows, e.g. -1. "
        "Write a non-negative number in every row of column 'count'."
    )


def test_missing_score_column_raises(judgments: pd.DataFrame) -> None:
    with pytest.raises(DataError) as error:
        evaluate_scores(judgments, "teacher_score", EvaluateConfig(), calibrated=False)

    assert str(error.value) == (
        "the judgments table has no column 'teacher_score'. Found 'query_id', 'query', "
        "'item_id', 'title', 'label', 'score'. Evaluate the canonical judgments table "
        "after the model added its score column."
    )


def test_missing_score_raises(judgments: pd.DataFrame) -> None:
    judgments.loc[2, "score"] = np.nan

    with pytest.raises(DataError) as error:
        evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=False)

    assert str(error.value) == (
        "'score' is missing, non-numeric or infinite in 1 of 9 rows, e.g. nan. "
        "Score every row before evaluating."
    )


def test_label_outside_unit_interval_raises(judgments: pd.DataFrame) -> None:
    judgments.loc[0, "label"] = 3.0

    with pytest.raises(DataError) as error:
        evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=False)

    assert str(error.value) == (
        "'label' is missing or outside [0, 1] in 1 of 9 rows, e.g. 3.0. "
        "Evaluate the table that the validate stage writes, which quarantines such rows."
    )


def test_calibrated_scores_outside_unit_interval_raise(judgments: pd.DataFrame) -> None:
    judgments["score"] = judgments["score"] * 4 - 1

    with pytest.raises(DataError) as error:
        evaluate_scores(judgments, "score", EvaluateConfig(), calibrated=True)

    assert str(error.value) == (
        "calibrated=True expects probabilities in [0, 1], but 'score' ranges from -0.6 to 2.6. "
        "Apply the sigmoid to logits, or pass calibrated=False to skip RMSE."
    )


def test_random_baseline_deterministic_for_seed(judgments: pd.DataFrame) -> None:
    config = EvaluateConfig(num_random_trials=20, seed=5)

    first = random_baseline(judgments, config)
    second = random_baseline(judgments, config)
    other_seed = random_baseline(judgments, EvaluateConfig(num_random_trials=20, seed=6))

    assert first == second
    assert first != other_seed
    assert first["all"]["num_queries"] == 3
    assert first["all"]["num_pairs"] == 9
    for segment_metrics in first.values():
        assert segment_metrics["rmse"] is None


def test_random_baseline_pairwise_accuracy_near_half(judgments: pd.DataFrame) -> None:
    # A random order without ties puts each pair right with probability 1/2.
    # Estimated standard error of the mean over 100 trials here: about 0.03.
    metrics = random_baseline(judgments, EvaluateConfig(num_random_trials=100, seed=1))["all"]

    assert metrics["pairwise_accuracy"] == pytest.approx(0.5, abs=0.08)


def test_results_table_markdown() -> None:
    rows = {
        "bm25": {
            "all": {"ndcg@10": 0.81234, "rmse": None, "num_queries": 12},
            "tail": {"ndcg@10": 0.5, "rmse": None, "num_queries": 0},
        },
        "teacher": {"all": {"ndcg@10": 0.9, "rmse": 0.456789, "num_queries": 12}},
    }

    assert results_table(rows) == (
        "| model | segment | ndcg@10 | rmse | num_queries |\n"
        "| --- | --- | ---: | ---: | ---: |\n"
        "| bm25 | all | 0.8123 | — | 12 |\n"
        "| bm25 | tail | 0.5000 | — | 0 |\n"
        "| teacher | all | 0.9000 | 0.4568 | 12 |\n"
    )
