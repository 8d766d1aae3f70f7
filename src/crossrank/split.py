"""Assign whole queries to train, validation and test by a hash of their text."""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from crossrank import schema
from crossrank.config import SplitConfig
from crossrank.ingest import normalize_query

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def query_bucket(query: str, salt: str) -> float:
    """Map a query to a number in [0, 1) from the MD5 of its normalized text and the salt.

    Case and spacing do not change the bucket, so "Angle  Bracket" and "angle bracket"
    always land in the same split.
    """
    key = f"{salt}\x00{normalize_query(query)}".encode("utf-8")
    digest = hashlib.md5(key, usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(frame: pd.DataFrame, config: SplitConfig) -> pd.Series:
    """Return the split name of every row; all rows of one query share a split."""
    buckets = frame[schema.QUERY].map(lambda q: query_bucket(q, config.salt))
    train_end = config.train
    validation_end = config.train + config.validation
    names = pd.Series("test", index=frame.index)
    names[buckets < validation_end] = "validation"
    names[buckets < train_end] = "train"
    return names


def split(frame: pd.DataFrame, config: SplitConfig) -> dict[str, pd.DataFrame]:
    """Split the judgments into query-disjoint train, validation and test tables."""
    names = assign_splits(frame, config)
    parts = {name: frame[names == name].reset_index(drop=True) for name in SPLITS}
    for name, part in parts.items():
        logger.info(
            "split %s: %d judgments, %d queries", name, len(part), part[schema.QUERY_ID].nunique()
        )
    return parts
