"""Score rankings on the judgments table, overall and for head and tail queries.

Every model (random, BM25, teacher, student) goes through the same functions on the
same rows, so the rows of the results table are comparable. Per-query metrics
(`ndcg@5`, `ndcg@10`, `mrr`, `pairwise_accuracy`) are means over queries with at least
two distinct labels. Row-level metrics (`recall@p95` and `rmse`) pool all
(query, item) rows of a segment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
from sklearn.metrics import ndcg_score, precision_recall_curve

from crossrank import schema
from crossrank.config import EvaluateConfig
from crossrank.errors import DataError
from crossrank.ingest import normalize_query

logger = logging.getLogger(__name__)

SEGMENTS: Final = ("all", "head", "tail")
NDCG_CUTOFFS: Final = (5, 10)
QUERY_LOG_COLUMNS: Final = ("query", "count")

Metrics = dict[str, float | int | None]
SegmentMetrics = dict[str, Metrics]


def recall_key(config: EvaluateConfig) -> str:
    """Return the metric key of recall at the target precision, e.g. `recall@p95`."""
    return f"recall@p{round(100 * config.target_precision)}"


def metric_keys(config: EvaluateConfig) -> tuple[str, ...]:
    """Return the metric keys of one segment, in the order of the results table."""
    ndcg_keys = tuple(f"ndcg@{k}" for k in NDCG_CUTOFFS)
    return (*ndcg_keys, "mrr", "pairwise_accuracy", recall_key(config), "rmse", "num_queries", "num_pairs")


def query_segments(frame: pd.DataFrame, config: EvaluateConfig) -> pd.Series:
    """Assign each row's query to the "head" or "tail" segment.

    With `config.query_log` set, the log is a CSV with columns `query,count`. Counts of
    queries that are equal after `normalize_query` are summed. The head is the
    `head_fraction` of distinct logged queries with the highest counts, rounded to the
    nearest whole number of queries and at least one. Equal counts at the cut are
    ordered by query text. A query of the table is head when its normalized form is
    in the head, and tail otherwise, including when the log lacks it.

    Without a log, length is the proxy for rarity: a query with at least
    `tail_min_query_tokens` whitespace-separated tokens is tail, a shorter one is head.

    Returns a Series of "head"/"tail" named `segment`, aligned with `frame.index`.
    Raises DataError when the query log is missing, unreadable or malformed.
    """
    _require_columns(frame, [schema.QUERY], "the judgments table")
    queries = frame[schema.QUERY].astype(str)

    if config.query_log:
        head_queries = _head_queries_from_log(Path(config.query_log), config.head_fraction)
        is_head = queries.map(normalize_query).isin(head_queries).to_numpy()
        rule = f"the {len(head_queries)} most frequent queries of {config.query_log}"
    else:
        num_tokens = queries.str.split().str.len().to_numpy()
        is_head = num_tokens < config.tail_min_query_tokens
        rule = f"queries with fewer than {config.tail_min_query_tokens} tokens, as no query log is set"

    segments = pd.Series(np.where(is_head, "head", "tail"), index=frame.index, name="segment")
    num_head = queries[is_head].nunique()
    num_tail = queries[~is_head].nunique()
    logger.info("head segment is %s, giving %d head and %d tail queries", rule, num_head, num_tail)
    return segments


def evaluate_scores(
    frame: pd.DataFrame,
    score_column: str,
    config: EvaluateConfig,
    calibrated: bool,
) -> SegmentMetrics:
    """Compute ranking metrics of `frame[score_column]` for all, head and tail queries.

    `frame` is the judgments table with `query_id`, `query`, `label` (soft target in
    [0, 1]) and the score column. A higher score ranks an item higher. Each segment
    maps the keys of `metric_keys(config)` to values:

    - `ndcg@5`, `ndcg@10`: `sklearn.metrics.ndcg_score` with the soft labels as linear
      gains and a log2 discount. Tied scores get the mean DCG over their orderings.
    - `mrr`: 1 / rank of the first item with `label >= relevant_threshold`, or 0 for
      a query with no such item. Ties rank worst case: a relevant item comes after
      every non-relevant item with the same score, so a constant scorer earns nothing.
    - `pairwise_accuracy`: over the item pairs of a query whose labels differ, the
      share that the scores order like the labels. A tied score counts as 0.5. It is
      averaged within each query first, then over queries.
    - `recall@pNN` (NN = 100 * target_precision, rounded): the maximum recall over score
      thresholds with precision >= target_precision, from
      `sklearn.metrics.precision_recall_curve` on all rows. An item is relevant when
      `label >= relevant_threshold`. It is 0.0 when no threshold reaches the target
      precision, and None when the segment has no relevant row.
    - `rmse`: with `calibrated`, scores are probabilities and both scores and labels
      are mapped to the original scale, `label_min + x * (label_max - label_min)`,
      before the root mean squared error over all rows. None when not calibrated.
    - `num_queries`: queries behind the per-query metrics. Queries whose items all
      have the same label are left out, because every ranking of them is equally good.
    - `num_pairs`: (query, item) rows behind `recall@pNN` and `rmse`.

    A metric without data (an empty segment, or no query with two distinct labels)
    is None, never NaN. Raises DataError when a column is missing, a label is outside
    [0, 1], a score is missing or infinite, or `calibrated` scores leave [0, 1].
    """
    started = time.perf_counter()
    labels = _checked_labels(frame)
    scores = _checked_scores(frame, score_column, calibrated)
    segments = query_segments(frame, config)

    metrics = _evaluate_segments(frame, labels, scores, segments, config, calibrated)

    overall = metrics["all"]
    logger.info(
        "evaluated %s on %d queries with two or more labels and %d rows in %.2f s",
        score_column,
        overall["num_queries"],
        overall["num_pairs"],
        time.perf_counter() - started,
    )
    return metrics


def random_baseline(frame: pd.DataFrame, config: EvaluateConfig) -> SegmentMetrics:
    """Compute the metrics of random rankings, averaged over `num_random_trials` trials.

    Each trial scores the rows with a random permutation of 0..n-1, drawn from a
    generator seeded with `config.seed`, so every query gets a uniformly random order
    without ties. Each metric is the mean over trials. `rmse` is None because a random
    ranking has no probabilities. The output has the shape of `evaluate_scores`, and
    invalid labels or a bad query log raise the same DataError.
    """
    started = time.perf_counter()
    labels = _checked_labels(frame)
    segments = query_segments(frame, config)
    generator = np.random.default_rng(config.seed)

    trials = []
    for _ in range(config.num_random_trials):
        scores = generator.permutation(len(frame)).astype(np.float64)
        trials.append(_evaluate_segments(frame, labels, scores, segments, config, calibrated=False))

    logger.info(
        "evaluated %d random rankings (seed %d) in %.2f s",
        config.num_random_trials,
        config.seed,
        time.perf_counter() - started,
    )
    return _mean_over_trials(trials)


def results_table(rows: Mapping[str, Mapping[str, Mapping[str, float | int | None]]]) -> str:
    """Render metrics as a Markdown table with one row per model and segment.

    `rows` maps a model name to the output of `evaluate_scores` or `random_baseline`.
    The columns are `model`, `segment` and then each metric key in first-seen order.
    Floats get 4 decimals, integers are printed whole, and None or an absent key is
    "—".
    """
    metric_names: dict[str, None] = {}
    for segments in rows.values():
        for metrics in segments.values():
            metric_names.update(dict.fromkeys(metrics))
    header = ["model", "segment", *metric_names]
    alignment = ["---", "---", *["---:"] * len(metric_names)]

    lines = [_markdown_row(header), _markdown_row(alignment)]
    for model, segments in rows.items():
        for segment, metrics in segments.items():
            values = [_format_metric(metrics.get(name)) for name in metric_names]
            lines.append(_markdown_row([model, segment, *values]))
    return "\n".join(lines) + "\n"


def _require_columns(frame: pd.DataFrame, required: list[str], source: str) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(
            f"{source} has no column {', '.join(repr(c) for c in missing)}. "
            f"Found {', '.join(repr(c) for c in frame.columns)}. "
            "Evaluate the canonical judgments table after the model added its score column."
        )


def _checked_labels(frame: pd.DataFrame) -> np.ndarray:
    _require_columns(frame, [schema.QUERY_ID, schema.QUERY, schema.LABEL], "the judgments table")
    labels = pd.to_numeric(frame[schema.LABEL], errors="coerce").to_numpy(dtype=np.float64)
    # NaN fails both comparisons, so a missing or non-numeric label counts as invalid.
    invalid = ~((labels >= 0.0) & (labels <= 1.0))
    if invalid.any():
        example = _first_value(frame[schema.LABEL], invalid)
        raise DataError(
            f"{schema.LABEL!r} is missing or outside [0, 1] in {int(invalid.sum())} of "
            f"{len(labels)} rows, e.g. {example!r}. Evaluate the table that the validate "
            "stage writes, which quarantines such rows."
        )
    return labels


def _first_value(column: pd.Series, mask: np.ndarray) -> object:
    # tolist() gives Python scalars, so messages print 3.0 and not np.float64(3.0).
    return column[mask].tolist()[0]


def _checked_scores(frame: pd.DataFrame, score_column: str, calibrated: bool) -> np.ndarray:
    _require_columns(frame, [score_column], "the judgments table")
    scores = pd.to_numeric(frame[score_column], errors="coerce").to_numpy(dtype=np.float64)
    invalid = ~np.isfinite(scores)
    if invalid.any():
        example = _first_value(frame[score_column], invalid)
        raise DataError(
            f"{score_column!r} is missing, non-numeric or infinite in {int(invalid.sum())} of "
            f"{len(scores)} rows, e.g. {example!r}. Score every row before evaluating."
        )
    if calibrated and len(scores) and (scores.min() < 0.0 or scores.max() > 1.0):
        raise DataError(
            f"calibrated=True expects probabilities in [0, 1], but {score_column!r} ranges "
            f"from {scores.min():g} to {scores.max():g}. Apply the sigmoid to logits, or pass "
            "calibrated=False to skip RMSE."
        )
    return scores


def _head_queries_from_log(path: Path, head_fraction: float) -> set[str]:
    if not path.is_file():
        raise DataError(
            f"query log not found: {path}. Set evaluate.query_log in params.yaml to a CSV "
            'with columns query,count, or to "" to split head and tail by query length.'
        )
    try:
        log = pd.read_csv(path, dtype={"query": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeError) as err:
        raise DataError(f"cannot read query log {path}: {err}. Check that it is a complete CSV.") from err
    _require_query_log_columns(log, path)

    counts = pd.to_numeric(log["count"], errors="coerce")
    invalid = ~(counts >= 0)
    if invalid.any():
        example = _first_value(log["count"], invalid.to_numpy())
        raise DataError(
            f"query log {path} has an invalid count in {int(invalid.sum())} of {len(log)} rows, "
            f"e.g. {example!r}. Write a non-negative number in every row of column 'count'."
        )

    totals = counts.groupby(log["query"].map(normalize_query)).sum()
    ranked = totals.rename("count").rename_axis("query").reset_index()
    ranked = ranked.sort_values(["count", "query"], ascending=[False, True])
    num_head = max(1, int(head_fraction * len(ranked) + 0.5)) if len(ranked) else 0
    if num_head == 0:
        logger.warning("query log %s has no rows, so every query is tail", path)
    return set(ranked["query"].iloc[:num_head])


def _require_query_log_columns(log: pd.DataFrame, path: Path) -> None:
    missing = [column for column in QUERY_LOG_COLUMNS if column not in log.columns]
    if missing:
        raise DataError(
            f"query log {path} has no column {', '.join(repr(c) for c in missing)}. "
            f"Found {', '.join(repr(c) for c in log.columns)}. Write a header line 'query,count'."
        )


def _evaluate_segments(
    frame: pd.DataFrame,
    labels: np.ndarray,
    scores: np.ndarray,
    segments: pd.Series,
    config: EvaluateConfig,
    calibrated: bool,
) -> SegmentMetrics:
    query_codes = pd.factorize(frame[schema.QUERY_ID])[0]
    segment_names = segments.to_numpy()

    # Per-query sums of "all" are those of head plus tail, which saves computing
    # NDCG twice. Recall is not a sum over queries, so row-level metrics use all rows.
    totals: dict[str, tuple[dict[str, float], int]] = {}
    for segment in SEGMENTS[1:]:
        rows = segment_names == segment
        totals[segment] = _per_query_totals(
            query_codes[rows], labels[rows], scores[rows], config.relevant_threshold
        )
    totals["all"] = _add_totals(totals["head"], totals["tail"])

    metrics: SegmentMetrics = {}
    for segment in SEGMENTS:
        rows = np.ones(len(frame), dtype=bool) if segment == "all" else segment_names == segment
        sums, num_queries = totals[segment]
        metrics[segment] = _segment_metrics(sums, num_queries, labels[rows], scores[rows], config, calibrated)
    return metrics


def _add_totals(
    first: tuple[dict[str, float], int], second: tuple[dict[str, float], int]
) -> tuple[dict[str, float], int]:
    sums = {name: first[0][name] + second[0][name] for name in first[0]}
    return sums, first[1] + second[1]


def _segment_metrics(
    sums: dict[str, float],
    num_queries: int,
    labels: np.ndarray,
    scores: np.ndarray,
    config: EvaluateConfig,
    calibrated: bool,
) -> Metrics:
    means = {name: (total / num_queries if num_queries else None) for name, total in sums.items()}
    relevant = labels >= config.relevant_threshold
    metrics: Metrics = {
        **means,
        recall_key(config): _recall_at_precision(relevant, scores, config.target_precision),
        "rmse": _rmse(labels, scores, config) if calibrated else None,
        "num_queries": num_queries,
        "num_pairs": len(labels),
    }
    return {name: metrics[name] for name in metric_keys(config)}


def _per_query_totals(
    query_codes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    relevant_threshold: float,
) -> tuple[dict[str, float], int]:
    totals = {f"ndcg@{k}": 0.0 for k in NDCG_CUTOFFS} | {"mrr": 0.0, "pairwise_accuracy": 0.0}
    if len(query_codes) == 0:
        return totals, 0

    # Sort rows by query, so each query is one contiguous block starting at `starts`.
    order = np.argsort(query_codes, kind="stable")
    labels, scores = labels[order], scores[order]
    _, starts, sizes = np.unique(query_codes[order], return_index=True, return_counts=True)
    has_two_labels = np.maximum.reduceat(labels, starts) > np.minimum.reduceat(labels, starts)

    # Queries of equal size stack into (num_queries, size) arrays, one batch per size.
    # NOTE: MRR and pairwise accuracy build (num_queries, size, size) arrays, so memory
    # grows with the square of the items per query. That is small for ~10 items per query.
    for size in np.unique(sizes[has_two_labels]):
        batch_starts = starts[has_two_labels & (sizes == size)]
        rows = batch_starts[:, None] + np.arange(size)  # (num_queries, size)
        batch_labels, batch_scores = labels[rows], scores[rows]

        for k in NDCG_CUTOFFS:
            totals[f"ndcg@{k}"] += _ndcg_sum(batch_labels, batch_scores, k)
        relevant = batch_labels >= relevant_threshold
        totals["mrr"] += float(_reciprocal_ranks(relevant, batch_scores).sum())
        totals["pairwise_accuracy"] += float(_pairwise_accuracies(batch_labels, batch_scores).sum())

    return totals, int(has_two_labels.sum())


def _ndcg_sum(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    # sklearn 1.9.1 averages tied scores in a Python loop over queries. For queries
    # without ties, ignore_ties=True computes the same value in one vectorised step.
    has_ties = (np.diff(np.sort(scores, axis=1), axis=1) == 0).any(axis=1)
    total = 0.0
    for queries, ignore_ties in ((~has_ties, True), (has_ties, False)):
        if queries.any():
            mean = ndcg_score(labels[queries], scores[queries], k=k, ignore_ties=ignore_ties)
            total += float(mean) * int(queries.sum())
    return total


def _reciprocal_ranks(relevant: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # For item i of each query, count the items j ranked before it in the worst case:
    # a higher score, or the same score and not relevant. Arrays are (queries, i, j).
    other_scores, own_scores = scores[:, None, :], scores[:, :, None]
    num_higher = (other_scores > own_scores).sum(axis=2)
    num_tied_irrelevant = ((other_scores == own_scores) & ~relevant[:, None, :]).sum(axis=2)
    ranks = np.where(relevant, num_higher + num_tied_irrelevant + 1, np.inf)  # (queries, size)
    first_relevant_rank = ranks.min(axis=1)
    return np.where(np.isfinite(first_relevant_rank), 1.0 / first_relevant_rank, 0.0)


def _pairwise_accuracies(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # preferred[q, i, j]: item i has a higher label than item j. Arrays are (queries, i, j).
    preferred = labels[:, :, None] > labels[:, None, :]
    credit = (scores[:, :, None] > scores[:, None, :]) + 0.5 * (scores[:, :, None] == scores[:, None, :])
    return (credit * preferred).sum(axis=(1, 2)) / preferred.sum(axis=(1, 2))


def _recall_at_precision(relevant: np.ndarray, scores: np.ndarray, target_precision: float) -> float | None:
    if not relevant.any():
        return None
    precision, recall, _ = precision_recall_curve(relevant, scores)
    # The curve ends at precision 1 and recall 0, so an unreached target gives 0.0.
    return float(recall[precision >= target_precision].max())


def _rmse(labels: np.ndarray, scores: np.ndarray, config: EvaluateConfig) -> float | None:
    if len(labels) == 0:
        return None
    scale = config.label_max - config.label_min
    predicted = config.label_min + scores * scale
    actual = config.label_min + labels * scale
    return float(np.sqrt(np.mean((predicted - actual) ** 2)))


def _mean_over_trials(trials: list[SegmentMetrics]) -> SegmentMetrics:
    mean: SegmentMetrics = {}
    for segment, first_trial in trials[0].items():
        mean[segment] = {}
        for name, first_value in first_trial.items():
            if first_value is None or isinstance(first_value, int):
                # None and the counts depend on the labels alone, so every trial has the same.
                mean[segment][name] = first_value
            else:
                mean[segment][name] = float(np.mean([trial[segment][name] for trial in trials]))
    return mean


def _format_metric(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4f}"


def _markdown_row(cells: list[str]) -> str:
    escaped = [str(cell).replace("|", "\\|") for cell in cells]
    return "| " + " | ".join(escaped) + " |"
