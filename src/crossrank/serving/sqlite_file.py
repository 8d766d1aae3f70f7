"""SQLite plumbing shared by the token store and the score cache.

Both are one SQLite file that a daily job rewrites in a single transaction while
predictors read it through read-only connections, one per thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_transaction(path: Path, create_tables: Iterable[str]) -> Iterator[sqlite3.Connection]:
    """Open `path` for one write transaction, with its tables created, and commit on exit.

    The transaction starts with BEGIN IMMEDIATE, so readers see the file as it was
    before or after the whole update, never a mix. Any exception rolls it back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        for statement in create_tables:
            connection.execute(statement)
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()


class ReadOnlyConnections:
    """One read-only, autocommit connection per thread to one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        """Return this thread's connection, opened on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit mode, so an explicit BEGIN controls a read transaction;
            # check_same_thread=False only lets `close` run from another thread.
            connection = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def close(self) -> None:
        """Close the connections of all threads."""
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()
