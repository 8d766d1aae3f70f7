"""Read raw relevance judgments into the canonical judgments table.

Each adapter turns one raw format into the columns of `crossrank.schema`:
missing text becomes "", labels become soft targets in [0, 1], and nothing is
dropped here. Rows that break the contract are left for the validation stage, which
quarantines them with a reason.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from crossrank import schema
from crossrank.config import DataConfig, GenericSourceConfig
from crossrank.errors import DataError

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]{0,200}>")
_REPEATED_WORD = re.compile(r"\b(\w+)(\s+\1\b)+", flags=re.IGNORECASE)

HOMEDEPOT_FILES = {
    "judgments": "train.csv.zip",
    "brand": "brandNameDf.csv",
    "color": "colorDf.csv",
    "material": "materialDf.csv",
}
CROWDFLOWER_PARTS = tuple(f"train_part{i}.csv" for i in range(1, 5))


def normalize_query(query: str) -> str:
    """Return the query lower-cased with runs of whitespace collapsed to one space."""
    return _WHITESPACE.sub(" ", query).strip().lower()


def stable_id(prefix: str, text: str) -> str:
    """Return an id derived from `text` alone, so it is the same on every machine."""
    digest = hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]
    return f"{prefix}{digest}"


def clean_text(value: str) -> str:
    """Unescape HTML entities, drop tags and collapse whitespace."""
    if "<" in value:
        value = _TAG.sub(" ", value)
    if "&" in value:
        value = html.unescape(value)
    return _WHITESPACE.sub(" ", value).strip()


# Placeholders that exports of missing values leave in attribute files.
_MISSING_MARKERS = frozenset({"nan", "none", "null", "n/a", "na"})


def clean_attribute(value: str) -> str:
    """Clean an attribute value and collapse repeated words ("White White" -> "White").

    Placeholders such as "nan" or "N/A" become "", the value of a missing attribute.
    """
    value = _REPEATED_WORD.sub(r"\1", clean_text(value))
    return "" if value.lower() in _MISSING_MARKERS else value


def _require_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"data file not found: {path}. {fix}")
    return path


def _require_columns(frame: pd.DataFrame, required: list[str], source: Path) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(
            f"{source} has no column {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(repr(c) for c in frame.columns)}. "
            "Check the file, or the column mapping in params.yaml (data.generic.columns)."
        )


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    # Read every field as text, keeping empty fields as "" instead of NaN, so a
    # missing attribute never turns into the string "nan" later.
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, **kwargs)
    except (OSError, ValueError, zipfile.BadZipFile, pd.errors.ParserError, UnicodeError) as err:
        raise DataError(f"cannot read {path}: {err}. Check that the file is a complete CSV.") from err


def _soft_label(raw: pd.Series, low: float, high: float) -> pd.Series:
    # Unparseable labels become NaN here and are quarantined by validation.
    values = pd.to_numeric(raw, errors="coerce")
    return (values - low) / (high - low)


def _finish(frame: pd.DataFrame, extra_columns: list[str]) -> pd.DataFrame:
    for column in schema.TEXT_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    for column in (*schema.TEXT_COLUMNS, *extra_columns):
        frame[column] = frame[column].fillna("").astype(str)
    frame[schema.QUERY] = frame[schema.QUERY].map(lambda q: _WHITESPACE.sub(" ", q).strip())
    frame[schema.QUERY_ID] = frame[schema.QUERY].map(lambda q: stable_id("q", normalize_query(q)))
    frame[schema.LABEL] = frame[schema.LABEL].astype(float)
    ordered = [*schema.CANONICAL_COLUMNS, *extra_columns]
    return frame[ordered].reset_index(drop=True)


def _attribute_table(path: Path, column: str) -> pd.DataFrame:
    table = _read_csv(path)
    _require_columns(table, ["product_uid", column], path)
    # product_uid is written as a float ("100001.0") in the attribute files.
    uid = pd.to_numeric(table["product_uid"], errors="coerce")
    table = table.assign(product_uid=uid).dropna(subset=["product_uid"])
    table["product_uid"] = table["product_uid"].astype(np.int64).astype(str)
    table[column] = table[column].map(clean_attribute)
    table = table[table[column] != ""]
    # A product can have several values; keep them all, in file order, once each.
    joined = table.groupby("product_uid", sort=False)[column].agg(lambda v: " / ".join(dict.fromkeys(v)))
    return joined.reset_index()


def read_homedepot(folder: Path) -> pd.DataFrame:
    """Read the Home Depot judgments joined with brand, color and material.

    `relevance` is a rater mean on 1 (irrelevant) to 3 (exact), mapped to
    label = (relevance - 1) / 2. Material is kept as the extra column `material`.
    """
    fix = "Run `dvc update data.dvc` to import the raw data, or set data.path in params.yaml."
    path = _require_file(folder / HOMEDEPOT_FILES["judgments"], fix)
    raw = _read_csv(path, encoding="latin-1")
    _require_columns(raw, ["product_uid", "product_title", "search_term", "relevance"], path)

    frame = pd.DataFrame(
        {
            schema.QUERY: raw["search_term"],
            schema.ITEM_ID: raw["product_uid"].str.strip(),
            schema.TITLE: raw["product_title"].map(clean_text),
            schema.RAW_LABEL: raw["relevance"],
            schema.LABEL: _soft_label(raw["relevance"], 1.0, 3.0),
            schema.SOURCE: "homedepot",
        }
    )
    for column in ("brand", "color", "material"):
        table = _attribute_table(_require_file(folder / HOMEDEPOT_FILES[column], fix), column)
        frame = frame.merge(table, how="left", left_on=schema.ITEM_ID, right_on="product_uid")
        frame = frame.drop(columns="product_uid")
    return _finish(frame, extra_columns=["material"])


def read_crowdflower(folder: Path) -> pd.DataFrame:
    """Read the four CrowdFlower parts.

    `median_relevance` is on 1 to 4, mapped to label = (median_relevance - 1) / 3.
    There is no product id, so `item_id` is derived from the normalized title.
    """
    fix = "Run `dvc update data.dvc` to import the raw data, or set data.path in params.yaml."
    parts = []
    for name in CROWDFLOWER_PARTS:
        path = _require_file(folder / name, fix)
        # Undecodable bytes become U+FFFD so validation can quarantine those rows.
        part = _read_csv(path, encoding="utf-8", encoding_errors="replace")
        _require_columns(part, ["query", "product_title", "product_description", "median_relevance"], path)
        parts.append(part)
    raw = pd.concat(parts, ignore_index=True)

    titles = raw["product_title"].map(clean_text)
    frame = pd.DataFrame(
        {
            schema.QUERY: raw["query"],
            schema.ITEM_ID: titles.map(lambda t: stable_id("cf", normalize_query(t))),
            schema.TITLE: titles,
            schema.DESCRIPTION: raw["product_description"].map(clean_text),
            schema.RAW_LABEL: raw["median_relevance"],
            schema.LABEL: _soft_label(raw["median_relevance"], 1.0, 4.0),
            schema.SOURCE: "crowdflower",
        }
    )
    return _finish(frame, extra_columns=[])


def read_generic(path: Path, source: GenericSourceConfig) -> pd.DataFrame:
    """Read a user's CSV or Parquet judgments through the column mapping in params.yaml.

    The mapping goes from canonical column to the user's column; `query`, `title` and
    `label` are required. Labels are scaled from [label_min, label_max] to [0, 1].
    Unmapped canonical text columns are empty; unmapped user columns are kept as
    extra attributes.
    """
    _require_file(path, "Set data.path in params.yaml to your judgments file.")
    if path.suffix == ".parquet":
        try:
            raw = pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {path}: {err}. Check that the file is valid Parquet.") from err
    else:
        raw = _read_csv(path, encoding="utf-8", encoding_errors="replace")
    if source.label_max <= source.label_min:
        raise DataError(
            f"data.generic.label_max ({source.label_max}) must be above label_min ({source.label_min})"
        )

    mapping = {canonical: source.columns.get(canonical, canonical) for canonical in ("query", "title", "label")}
    mapping.update(source.columns)
    unknown = sorted(set(mapping) - set(schema.CANONICAL_COLUMNS))
    if unknown:
        raise DataError(
            f"data.generic.columns maps unknown canonical columns {unknown}; "
            f"use names from: {', '.join(schema.CANONICAL_COLUMNS)}"
        )
    _require_columns(raw, [mapping["query"], mapping["title"], mapping["label"]], path)
    _require_columns(raw, list(mapping.values()), path)

    frame = pd.DataFrame({canonical: raw[column] for canonical, column in mapping.items()})
    frame = frame.astype({c: str for c in frame.columns if c in schema.TEXT_COLUMNS})
    frame[schema.TITLE] = frame[schema.TITLE].map(clean_text)
    frame[schema.RAW_LABEL] = raw[mapping["label"]].astype(str)
    frame[schema.LABEL] = _soft_label(raw[mapping["label"]], source.label_min, source.label_max)
    if schema.ITEM_ID not in source.columns:
        frame[schema.ITEM_ID] = frame[schema.TITLE].map(lambda t: stable_id("g", normalize_query(t)))
    frame[schema.ITEM_ID] = frame[schema.ITEM_ID].astype(str)
    frame[schema.SOURCE] = path.name

    extra = [c for c in raw.columns if c not in mapping.values()]
    for column in extra:
        frame[column] = raw[column].astype(str)
    return _finish(frame, extra_columns=extra)


ADAPTERS: dict[str, Callable[[Path, DataConfig], pd.DataFrame]] = {
    "homedepot": lambda path, config: read_homedepot(path),
    "crowdflower": lambda path, config: read_crowdflower(path),
    "generic": lambda path, config: read_generic(path, config.generic),
}


def sample_queries(frame: pd.DataFrame, max_queries: int) -> pd.DataFrame:
    """Keep the `max_queries` queries with the smallest id hash.

    The choice depends on the query text alone, so a smaller sample is a subset of a
    larger one and the same on every machine.
    """
    query_ids = sorted(frame[schema.QUERY_ID].unique())[:max_queries]
    return frame[frame[schema.QUERY_ID].isin(set(query_ids))].reset_index(drop=True)


def ingest(config: DataConfig, root: Path = Path(".")) -> pd.DataFrame:
    """Read the configured raw judgments into the canonical table.

    Raises DataError when the data folder or a file is missing, unreadable or lacks a
    required column; the message names the path and the fix.
    """
    path = (root / config.path).resolve() if not Path(config.path).is_absolute() else Path(config.path)
    if config.adapter != "generic" and not path.is_dir():
        raise DataError(
            f"data folder not found: {path}. Run `dvc update data.dvc` to import the raw data, "
            "or set data.path in params.yaml to a folder with the raw files."
        )

    frame = ADAPTERS[config.adapter](path, config)
    num_rows = len(frame)
    if config.max_queries is not None:
        frame = sample_queries(frame, config.max_queries)

    logger.info(
        "ingested %d judgments from %s with adapter %s; kept %d (%d queries, %d items)",
        num_rows,
        path,
        config.adapter,
        len(frame),
        frame[schema.QUERY_ID].nunique(),
        frame[schema.ITEM_ID].nunique(),
    )
    return frame
