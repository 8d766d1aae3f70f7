"""Item token store: the product token ids of every catalog item, built once per tokenizer.

A re-rank request that names its items by `item_id` then tokenizes only the query: the
predictor joins the query's ids with the stored product ids (`InputBuilder.assemble`),
which gives the same model input as tokenizing the product text in the request.

The store is one SQLite file with two tables:

- `meta(key, value)`: schema version, the model version of the bundle that last built
  it, the sha256 of that bundle's `tokenizer.json`, the input spec (JSON) and the
  build time;
- `items(item_id, fields_sha256, tokens)`: `fields_sha256` hashes the product text
  the ids came from, and `tokens` is a little-endian int32 array with one length per
  product field (in `InputSpec.fields` order) followed by every field's ids.

Token ids are only valid for the tokenizer and the product part of the input spec
(the fields and `max_attribute_tokens`) they were built with. The predictor rejects
a store built for another tokenizer or spec when it loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossrank import schema
from crossrank.bundle import TOKENIZER_FILE, Bundle, file_sha256, load_bundle
from crossrank.errors import CrossrankError, DataError
from crossrank.features import InputSpec
from crossrank.serving.sqlite_file import ReadOnlyConnections, write_transaction

logger = logging.getLogger(__name__)

# Bumped when the table layout or the token encoding changes; other versions are rejected.
SCHEMA_VERSION = 1

# SQLite before 3.32 allows at most 999 parameters in one statement.
_MAX_SQL_PARAMETERS = 900

_CREATE_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, fields_sha256 TEXT NOT NULL, tokens BLOB NOT NULL)",
)


class TokenStoreError(CrossrankError):
    """Report a token store that is missing, corrupted or built for another tokenizer."""


@dataclass(frozen=True)
class TokenStoreStats:
    """Counts of one build or refresh of a token store; `num_items` is the total afterwards."""

    num_items: int
    num_added: int
    num_updated: int
    num_unchanged: int
    num_removed: int
    model_version: str
    tokenizer_sha256: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenStoreMeta:
    """Build settings of a token store: schema, model version, tokenizer hash, input spec and time."""

    schema_version: int
    model_version: str
    tokenizer_sha256: str
    input_spec: InputSpec
    built_at: str


def product_encoding(spec: InputSpec) -> dict[str, Any]:
    """Return the parts of an input spec that change `InputBuilder.encode_products`."""
    return {"fields": list(spec.fields), "max_attribute_tokens": spec.max_attribute_tokens}


def fields_sha256(product: Mapping[str, str], fields: Sequence[str]) -> str:
    """Hash the product text of `fields`, so a changed item is found without tokenizing it."""
    text = json.dumps([[field, product.get(field, "")] for field in fields], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def encode_tokens(segments: Sequence[Sequence[int]]) -> bytes:
    """Pack per-field token ids into the stored form: field lengths, then all ids (int32)."""
    lengths = [len(segment) for segment in segments]
    flat = [token for segment in segments for token in segment]
    return np.asarray([*lengths, *flat], dtype="<i4").tobytes()


def decode_tokens(blob: bytes, num_fields: int) -> list[list[int]]:
    """Unpack `encode_tokens` output into one id list per field."""
    values = np.frombuffer(blob, dtype="<i4")
    lengths = values[:num_fields]
    if len(values) < num_fields or int(lengths.sum()) != len(values) - num_fields:
        raise TokenStoreError(
            f"stored tokens of {len(values)} int32 values do not match {num_fields} field lengths; "
            "the token store is corrupted: build it again with build_token_store"
        )
    ends = num_fields + np.cumsum(lengths)
    starts = ends - lengths
    return [values[start:end].tolist() for start, end in zip(starts, ends, strict=True)]


def _catalog_products(catalog: pd.DataFrame, fields: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    missing = [column for column in (schema.ITEM_ID, *fields) if column not in catalog.columns]
    if missing:
        raise DataError(
            f"catalog lacks the columns {missing} that the bundle's input spec needs (it has "
            f"{list(catalog.columns)}); build the catalog from the judgments table with crossrank.bm25.build_catalog"
        )

    item_ids = catalog[schema.ITEM_ID].astype(str).tolist()
    duplicated = catalog[schema.ITEM_ID].astype(str).duplicated()
    if duplicated.any():
        examples = catalog.loc[duplicated, schema.ITEM_ID].astype(str).unique()[:5].tolist()
        raise DataError(
            f"catalog has {int(duplicated.sum())} repeated item_ids (e.g. {examples}); pass one row per "
            "item, as crossrank.bm25.build_catalog returns"
        )
    if any(not item_id for item_id in item_ids):
        raise DataError("catalog has an empty item_id; every item needs a non-empty id")

    texts = catalog[list(fields)].fillna("").astype(str)
    return item_ids, texts.to_dict("records")


def _read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    return dict(connection.execute("SELECT key, value FROM meta").fetchall())


def _compatible(meta: Mapping[str, str], tokenizer_sha256: str, spec: InputSpec) -> bool:
    if not meta or int(meta.get("schema_version", -1)) != SCHEMA_VERSION:
        return False
    stored_spec = InputSpec.model_validate_json(meta["input_spec"])
    return meta.get("tokenizer_sha256") == tokenizer_sha256 and product_encoding(stored_spec) == product_encoding(spec)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def build_token_store(
    catalog: pd.DataFrame,
    bundle_dir: str | Path,
    store_path: str | Path,
    batch_size: int = 1000,
) -> TokenStoreStats:
    """Build or refresh the token store of a catalog for a bundle's tokenizer.

    `catalog` has one row per item: `item_id` and a column for every product field of
    the bundle's input spec (missing text is ""). When `store_path` contains a store built
    for the same tokenizer and spec, only new items and items whose product text
    changed are tokenized, and items no longer in the catalog are removed. Otherwise
    every item is tokenized again. The whole update is one SQLite transaction, so a
    predictor reading the store sees the old or the new contents, never a mix.

    Raises DataError for a catalog without the needed columns or with repeated
    item_ids, and BundleError for an invalid bundle.
    """
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    return _write_store(bundle, catalog, Path(store_path), batch_size, started)


def _write_store(
    bundle: Bundle, catalog: pd.DataFrame, store_path: Path, batch_size: int, started: float
) -> TokenStoreStats:
    spec = bundle.config.input_spec
    tokenizer_sha256 = file_sha256(bundle.path / TOKENIZER_FILE)

    # Product text and its hash per item.
    item_ids, products = _catalog_products(catalog, spec.fields)
    hashes = [fields_sha256(product, spec.fields) for product in products]

    # One write transaction from the first read to the meta update.
    with write_transaction(store_path, _CREATE_TABLES) as connection:
        # Stored hashes count only when the ids came from the same tokenizer and spec.
        stored = dict(connection.execute("SELECT item_id, fields_sha256 FROM items").fetchall())
        meta = _read_meta(connection)
        if stored and not _compatible(meta, tokenizer_sha256, spec):
            logger.warning(
                "token store %s was built for tokenizer sha256 %s and another input spec or schema; "
                "tokenizing all %d items again",
                store_path,
                meta.get("tokenizer_sha256"),
                len(item_ids),
            )
            valid_hashes: dict[str, str] = {}
        else:
            valid_hashes = stored

        # Items to tokenize: new ones and those whose product text changed.
        changed = [row for row, item_id in enumerate(item_ids) if valid_hashes.get(item_id) != hashes[row]]
        num_added = sum(1 for row in changed if item_ids[row] not in stored)
        for rows in _chunks(changed, batch_size):
            segments = bundle.builder.encode_products([products[row] for row in rows])
            connection.executemany(
                "INSERT OR REPLACE INTO items (item_id, fields_sha256, tokens) VALUES (?, ?, ?)",
                [(item_ids[row], hashes[row], encode_tokens(item)) for row, item in zip(rows, segments, strict=True)],
            )

        # Items no longer in the catalog.
        removed = sorted(set(stored) - set(item_ids))
        for chunk in _chunks(removed, _MAX_SQL_PARAMETERS):
            connection.execute(f"DELETE FROM items WHERE item_id IN ({','.join('?' * len(chunk))})", chunk)

        new_meta = {
            "schema_version": str(SCHEMA_VERSION),
            "model_version": bundle.config.model_version,
            "tokenizer_sha256": tokenizer_sha256,
            "input_spec": spec.model_dump_json(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", new_meta.items())

    stats = TokenStoreStats(
        num_items=len(item_ids),
        num_added=num_added,
        num_updated=len(changed) - num_added,
        num_unchanged=len(item_ids) - len(changed),
        num_removed=len(removed),
        model_version=bundle.config.model_version,
        tokenizer_sha256=tokenizer_sha256,
        duration_s=round(time.perf_counter() - started, 3),
    )
    logger.info(
        "token store %s: %d items (%d added, %d updated, %d unchanged, %d removed) for model version %s in %.1f s",
        store_path,
        stats.num_items,
        stats.num_added,
        stats.num_updated,
        stats.num_unchanged,
        stats.num_removed,
        stats.model_version,
        stats.duration_s,
    )
    return stats


class TokenStore:
    """Read-only access to a token store file, safe to share between threads.

    Each thread gets its own SQLite connection, opened read-only on first use.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenStoreError(
                f"token store not found: {self.path}; build it with build_token_store "
                "(crossrank build-token-store) or start the server without a token store"
            )
        self._connections = ReadOnlyConnections(self.path)
        self.meta = self._load_meta()
        self.num_fields = len(self.meta.input_spec.fields)

    def _load_meta(self) -> TokenStoreMeta:
        try:
            meta = _read_meta(self._connections.get())
        except sqlite3.DatabaseError as err:
            raise TokenStoreError(f"{self.path} is not a token store ({err}); build it with build_token_store") from err
        version = meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise TokenStoreError(
                f"token store {self.path} has schema version {version!r}, expected {SCHEMA_VERSION}; "
                "build it again with this crossrank version"
            )
        return TokenStoreMeta(
            schema_version=SCHEMA_VERSION,
            model_version=meta["model_version"],
            tokenizer_sha256=meta["tokenizer_sha256"],
            input_spec=InputSpec.model_validate_json(meta["input_spec"]),
            built_at=meta["built_at"],
        )

    def check_compatible(self, bundle: Bundle) -> None:
        """Raise TokenStoreError unless the store was built for this bundle's tokenizer and spec."""
        tokenizer_sha256 = file_sha256(bundle.path / TOKENIZER_FILE)
        if self.meta.tokenizer_sha256 != tokenizer_sha256:
            raise TokenStoreError(
                f"token store {self.path} was built for another tokenizer (tokenizer.json sha256 "
                f"{self.meta.tokenizer_sha256[:12]}..., model version {self.meta.model_version}) than the bundle "
                f"{bundle.path} (sha256 {tokenizer_sha256[:12]}..., model version {bundle.config.model_version}); "
                "build the token store again for this bundle"
            )
        stored = product_encoding(self.meta.input_spec)
        expected = product_encoding(bundle.config.input_spec)
        if stored != expected:
            raise TokenStoreError(
                f"token store {self.path} was built for product fields {stored}, but the bundle {bundle.path} "
                f"encodes {expected}; build the token store again for this bundle"
            )

    def count(self) -> int:
        """Return the number of stored items."""
        return self._connections.get().execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def get(self, item_ids: Sequence[str]) -> dict[str, list[list[int]]]:
        """Return the per-field token ids of each stored item among `item_ids`; unknown ids are left out.

        Raises TokenStoreError when the store was rebuilt for another tokenizer after
        it was opened, since its ids no longer fit the loaded model.
        """
        connection = self._connections.get()
        found: dict[str, list[list[int]]] = {}
        unique_ids = list(dict.fromkeys(item_ids))
        connection.execute("BEGIN")
        try:
            (tokenizer_sha256,) = connection.execute(
                "SELECT value FROM meta WHERE key = 'tokenizer_sha256'"
            ).fetchone()
            if tokenizer_sha256 != self.meta.tokenizer_sha256:
                raise TokenStoreError(
                    f"token store {self.path} was rebuilt for tokenizer sha256 {tokenizer_sha256[:12]}... after "
                    f"it was opened for {self.meta.tokenizer_sha256[:12]}...; restart the predictor"
                )
            for chunk in _chunks(unique_ids, _MAX_SQL_PARAMETERS):
                rows = connection.execute(
                    f"SELECT item_id, tokens FROM items WHERE item_id IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                for item_id, blob in rows:
                    found[item_id] = decode_tokens(blob, self.num_fields)
        finally:
            connection.execute("COMMIT")
        return found

    def close(self) -> None:
        """Close the connections of all threads."""
        self._connections.close()
