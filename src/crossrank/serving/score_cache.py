"""Score cache: precomputed scores of head queries for their judged items, per model version.

Frequent ("head") queries come from a query log CSV (`query,count`) or, without one,
from the judgments table, where a query's number of judged items serves as its
frequency. Their candidates are the items judged for them. Each pair is scored once
with the bundle, offline, and stored under (normalized query, item_id, model_version).
The predictor looks a request up under its own model version, so scores of another
version are never served.

The cache is one SQLite file: `meta(key, value)` and
`scores(model_version, query, item_id, score)`. Scores are float64, as `Bundle.score`
returns them.

NOTE: cached scores come from the product text in the judgments table at build time
and from the normalized query (lower case, single spaces). They equal the model's
score for a request only while the catalog text is unchanged and the tokenizer is
uncased (as the MiniLM tokenizer is); rebuild the cache with the token store
whenever the catalog changes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from crossrank import schema
from crossrank.bundle import load_bundle
from crossrank.errors import CrossrankError, DataError
from crossrank.ingest import normalize_query
from crossrank.serving.sqlite_file import ReadOnlyConnections, write_transaction

logger = logging.getLogger(__name__)

# Bumped when the table layout changes; a file with another version is rejected.
SCHEMA_VERSION = 1

_CREATE_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS scores (model_version TEXT NOT NULL, query TEXT NOT NULL, item_id TEXT NOT NULL, "
    "score REAL NOT NULL, PRIMARY KEY (model_version, query, item_id)) WITHOUT ROWID",
)


class ScoreCacheError(CrossrankError):
    """Report a score cache file that is missing or not a score cache."""


@dataclass(frozen=True)
class ScoreCacheStats:
    """Counts of one score cache build for one model version."""

    num_queries: int
    num_pairs: int
    num_queries_without_candidates: int
    query_source: Literal["query_log", "judgments"]
    model_version: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_query_log(path: str | Path) -> pd.Series:
    """Read a query log CSV with `query` and `count` columns; return counts by normalized query.

    Raises DataError when the file is missing, lacks a column or has a count that is
    not a non-negative integer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"query log not found: {path}; pass a CSV with `query` and `count` columns")
    log = pd.read_csv(path, dtype={"query": str}, keep_default_na=False)
    missing = [column for column in ("query", "count") if column not in log.columns]
    if missing:
        raise DataError(f"query log {path} lacks the columns {missing} (it has {list(log.columns)})")
    counts = pd.to_numeric(log["count"], errors="coerce")
    if counts.isna().any() or (counts < 0).any():
        bad = log.loc[counts.isna() | (counts < 0), "count"].head(3).tolist()
        raise DataError(f"query log {path} has counts that are not non-negative numbers, e.g. {bad}")
    return counts.groupby(log["query"].map(normalize_query)).sum()


def head_queries(judgments: pd.DataFrame, query_log: str | Path | None, num_queries: int) -> list[str]:
    """Return up to `num_queries` normalized queries, the most frequent first.

    Frequency is the query log's count when `query_log` is given, else the number of
    judged items of the query. Ties are broken by the query text, so the choice is
    the same on every run.
    """
    if query_log is not None:
        counts = read_query_log(query_log)
    else:
        counts = judgments[schema.QUERY].map(normalize_query).value_counts()
    frame = counts.rename("count").rename_axis("query").reset_index()
    frame = frame.sort_values(["count", "query"], ascending=[False, True], kind="stable")
    return frame["query"].head(num_queries).tolist()


def build_score_cache(
    judgments: pd.DataFrame,
    bundle_dir: str | Path,
    cache_path: str | Path,
    query_log: str | Path | None = None,
    num_queries: int = 1000,
    batch_size: int = 50,
) -> ScoreCacheStats:
    """Score the judged items of the head queries with a bundle and store them in the cache.

    `judgments` is the canonical judgments table (`query`, `item_id` and the bundle's
    product fields). The scores of the bundle's model version are replaced; scores
    of other versions are deleted, so the file only ever contains one version. Raises
    DataError for a table without the needed columns or an invalid query log.
    """
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    fields = list(bundle.config.input_spec.fields)
    missing = [column for column in (schema.QUERY, schema.ITEM_ID, *fields) if column not in judgments.columns]
    if missing:
        raise DataError(f"judgments table lacks the columns {missing} that the score cache needs")

    # Head queries and their judged (query, item) pairs, one row per pair.
    queries = head_queries(judgments, query_log, num_queries)
    pairs = judgments.assign(query=judgments[schema.QUERY].map(normalize_query))
    pairs = pairs[pairs[schema.QUERY].isin(set(queries))]
    pairs = pairs.drop_duplicates([schema.QUERY, schema.ITEM_ID])
    products = pairs[fields].fillna("").astype(str).to_dict("records")

    # Offline scores with the same builder and batching code the predictor uses.
    scores = bundle.score(pairs[schema.QUERY].tolist(), products, batch_size=batch_size)

    version = bundle.config.model_version
    rows = zip(pairs[schema.QUERY], pairs[schema.ITEM_ID].astype(str), scores.tolist(), strict=True)
    _write_cache(Path(cache_path), version, [(version, query, item_id, score) for query, item_id, score in rows])

    stats = ScoreCacheStats(
        num_queries=int(pairs[schema.QUERY].nunique()),
        num_pairs=len(pairs),
        num_queries_without_candidates=len(queries) - int(pairs[schema.QUERY].nunique()),
        query_source="query_log" if query_log is not None else "judgments",
        model_version=version,
        duration_s=round(time.perf_counter() - started, 3),
    )
    logger.info(
        "score cache %s: %d pairs of %d head queries (%d without judged items) for model version %s in %.1f s",
        cache_path,
        stats.num_pairs,
        stats.num_queries,
        stats.num_queries_without_candidates,
        version,
        stats.duration_s,
    )
    return stats


def _write_cache(path: Path, model_version: str, rows: list[tuple[str, str, str, float]]) -> None:
    with write_transaction(path, _CREATE_TABLES) as connection:
        connection.execute("DELETE FROM scores")
        connection.executemany(
            "INSERT INTO scores (model_version, query, item_id, score) VALUES (?, ?, ?, ?)", rows
        )
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "model_version": model_version,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())


class ScoreCache:
    """Read-only lookups in a score cache file, safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ScoreCacheError(
                f"score cache not found: {self.path}; build it with build_score_cache or start the "
                "server without a score cache"
            )
        self._connections = ReadOnlyConnections(self.path)
        try:
            meta = dict(self._connections.get().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            raise ScoreCacheError(f"{self.path} is not a score cache ({err}); build it with build_score_cache") from err
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ScoreCacheError(
                f"score cache {self.path} has schema version {meta.get('schema_version')!r}, expected "
                f"{SCHEMA_VERSION}; build it again with this crossrank version"
            )
        self.model_version = meta["model_version"]

    def count(self, model_version: str) -> int:
        """Return the number of cached pairs of one model version."""
        query = "SELECT COUNT(*) FROM scores WHERE model_version = ?"
        return self._connections.get().execute(query, (model_version,)).fetchone()[0]

    def lookup(self, normalized_query: str, model_version: str) -> dict[str, float]:
        """Return the cached scores of a normalized query by item_id; empty for an unknown query."""
        rows = self._connections.get().execute(
            "SELECT item_id, score FROM scores WHERE model_version = ? AND query = ?",
            (model_version, normalized_query),
        )
        return dict(rows.fetchall())

    def close(self) -> None:
        """Close the connections of all threads."""
        self._connections.close()
