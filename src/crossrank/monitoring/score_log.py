"""Durable log of served scores: one SQLite file in WAL mode.

Each `ScoreLog.append` call is one transaction, so a reader sees either the whole batch
or none of it. In WAL mode readers and the writer do not block each other. Writers
from several threads or processes take turns on the write lock, and each waits up to
`busy_timeout_s` for it. A committed batch survives a crash of the writing process.

NOTE: WAL mode needs shared memory between the processes that open the file, so every
reader and writer must run on the same host. A network file system does not provide
that, and neither does a volume mounted by pods on different nodes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType

import pandas as pd

from crossrank.errors import DataError
from crossrank.ingest import normalize_query

logger = logging.getLogger(__name__)

# Attributes whose empty values `count_missing_attributes` counts, in the student's input order.
ATTRIBUTES = ("product_type", "brand", "color", "gender")

# Bumped when the table layout changes; a file with another version is rejected.
SCHEMA_VERSION = 1

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS score_records (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model_version TEXT NOT NULL,
    query TEXT NOT NULL,
    item_id TEXT NOT NULL,
    score REAL NOT NULL,
    query_num_tokens INTEGER,
    num_missing_attributes INTEGER
)
"""
_CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS score_records_time ON score_records (time)",
    "CREATE INDEX IF NOT EXISTS score_records_version_time ON score_records (model_version, time)",
)


@dataclass(frozen=True)
class ScoreRecord:
    """One served score: when, by which model, for which query and item.

    `time` is in UTC epoch seconds. `item_id` is "" for an item that was sent as text
    without a catalog id. `query_num_tokens` and `num_missing_attributes` are optional
    (None when the server did not send them).
    """

    time: float
    model_version: str
    query: str
    item_id: str
    score: float
    query_num_tokens: int | None = None
    num_missing_attributes: int | None = None


COLUMNS = tuple(field.name for field in fields(ScoreRecord))


def count_query_tokens(query: str) -> int:
    """Count the whitespace-separated tokens of the normalized query.

    The evaluation stage splits queries into head and tail by the same count, and the
    score reference of a model bundle must count tokens this way too.
    """
    return len(normalize_query(query).split())


def count_missing_attributes(item: Mapping[str, object]) -> int:
    """Count the attributes of `ATTRIBUTES` that are absent, None or empty in `item`."""
    return sum(1 for name in ATTRIBUTES if not str(item.get(name) or "").strip())


def _check_record(record: ScoreRecord, position: int) -> None:
    problems = []
    if not math.isfinite(record.time):
        problems.append(f"time must be finite epoch seconds, got {record.time!r}")
    if not record.model_version:
        problems.append("model_version must not be empty")
    if not math.isfinite(record.score):
        # SQLite would store NaN as NULL, and the drift job cannot compare it.
        problems.append(f"score must be finite, got {record.score!r}")
    for name in ("query_num_tokens", "num_missing_attributes"):
        value = getattr(record, name)
        if value is not None and value < 0:
            problems.append(f"{name} must be >= 0 or None, got {value}")
    if problems:
        raise DataError(
            f"invalid score record at position {position} (item_id {record.item_id!r}): " + "; ".join(problems)
        )


def _row(record: ScoreRecord) -> tuple[object, ...]:
    # float() and str() also accept numpy scalars, which sqlite3 cannot bind.
    return (
        float(record.time),
        str(record.model_version),
        normalize_query(record.query),
        str(record.item_id),
        float(record.score),
        None if record.query_num_tokens is None else int(record.query_num_tokens),
        None if record.num_missing_attributes is None else int(record.num_missing_attributes),
    )


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so a busy writer makes this call
    # wait (up to the busy timeout) instead of failing halfway through a batch.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


class ScoreLog:
    """Append score records to a SQLite file and read them back by time window.

    One `ScoreLog` can be shared by the threads of a server. Each call borrows a
    connection from a pool and returns it, so a thread per request does not leave a
    connection behind. `close` closes the pooled connections; call it after the other
    threads stopped using the log.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._closed = False

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connection() as connection:
                self._create_schema(connection)
        except BaseException:
            self.close()
            raise
        logger.info("score log %s opened (%d records)", self.path, self.count())

    def _open(self) -> sqlite3.Connection:
        # check_same_thread=False lets a pooled connection move between threads; the
        # pool hands each connection to one thread at a time.
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit, so a commit survives a power loss too.
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise DataError(f"score log {self.path} is closed; open a new ScoreLog")
        try:
            connection = self._idle.get_nowait()
        except queue.Empty:
            connection = self._open()
        try:
            yield connection
        finally:
            if self._closed:
                connection.close()
            else:
                self._idle.put(connection)

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise DataError(
                f"score log {self.path} has schema version {version}, but this crossrank reads "
                f"version {SCHEMA_VERSION}; use a new log file or a matching crossrank version"
            )
        with _transaction(connection):
            connection.execute(_CREATE_TABLE)
            for statement in _CREATE_INDEXES:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def append(self, records: Sequence[ScoreRecord]) -> int:
        """Store records in one transaction and return how many were stored.

        Queries are stored normalized (`crossrank.ingest.normalize_query`). Raises
        DataError, and stores nothing, when any record has a non-finite time or score,
        an empty model version, or a negative count.
        """
        rows = []
        for position, record in enumerate(records):
            _check_record(record, position)
            rows.append(_row(record))
        if not rows:
            return 0

        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._connection() as connection, _transaction(connection):
            connection.executemany(
                f"INSERT INTO score_records ({', '.join(COLUMNS)}) VALUES ({placeholders})", rows
            )
        return len(rows)

    def read(
        self,
        start: float | None = None,
        end: float | None = None,
        model_version: str | None = None,
    ) -> pd.DataFrame:
        """Read the records with `start <= time < end` (epoch seconds), oldest first.

        None leaves that bound open or, for `model_version`, keeps every version. The
        frame has the columns of `ScoreRecord`; the two optional counts are pandas
        nullable integers (`Int64`), with <NA> where the server sent none.
        """
        conditions, values = [], []
        if start is not None:
            conditions.append("time >= ?")
            values.append(start)
        if end is not None:
            conditions.append("time < ?")
            values.append(end)
        if model_version is not None:
            conditions.append("model_version = ?")
            values.append(model_version)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

        # One SELECT reads one snapshot of the WAL, so a batch committed meanwhile is
        # either wholly in the result or wholly absent.
        with self._connection() as connection:
            rows = connection.execute(
                f"SELECT {', '.join(COLUMNS)} FROM score_records {where} ORDER BY time, id", values
            ).fetchall()
        frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
        return frame.astype(
            {
                "time": "float64",
                "model_version": "object",
                "query": "object",
                "item_id": "object",
                "score": "float64",
                "query_num_tokens": "Int64",
                "num_missing_attributes": "Int64",
            }
        )

    def count(self) -> int:
        """Return the number of stored records."""
        with self._connection() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM score_records").fetchone()[0])

    def close(self) -> None:
        """Close the pooled connections; later calls raise DataError."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> ScoreLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
