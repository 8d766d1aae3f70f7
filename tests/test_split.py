from pathlib import Path

import pandas as pd
import pytest

from crossrank import schema
from crossrank.config import DataConfig, SplitConfig
from crossrank.ingest import ingest
from crossrank.split import assign_splits, query_bucket, split


@pytest.fixture(scope="module")
def judgments(datasets: Path) -> pd.DataFrame:
    return ingest(DataConfig(path=str(datasets / "homedepot"), max_queries=2000))


def test_splits_are_query_disjoint(judgments: pd.DataFrame) -> None:
    parts = split(judgments, SplitConfig())
    queries = {name: set(part[schema.QUERY].str.lower()) for name, part in parts.items()}
    assert not queries["train"] & queries["validation"]
    assert not queries["train"] & queries["test"]
    assert not queries["validation"] & queries["test"]
    assert sum(len(part) for part in parts.values()) == len(judgments)


def test_split_fractions_close_to_config(judgments: pd.DataFrame) -> None:
    parts = split(judgments, SplitConfig(train=0.6, validation=0.2, test=0.2))
    num_queries = judgments[schema.QUERY_ID].nunique()
    shares = {name: part[schema.QUERY_ID].nunique() / num_queries for name, part in parts.items()}
    assert shares["train"] == pytest.approx(0.6, abs=0.04)
    assert shares["validation"] == pytest.approx(0.2, abs=0.04)
    assert shares["test"] == pytest.approx(0.2, abs=0.04)


def test_split_deterministic_and_salted(judgments: pd.DataFrame) -> None:
    first = assign_splits(judgments, SplitConfig())
    again = assign_splits(judgments, SplitConfig())
    salted = assign_splits(judgments, SplitConfig(salt="other"))
    assert first.equals(again)
    assert not first.equals(salted)


def test_bucket_ignores_case_and_spacing() -> None:
    assert query_bucket("Angle  Bracket ", "s") == query_bucket("angle bracket", "s")
    assert 0.0 <= query_bucket("angle bracket", "s") < 1.0


def test_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match=r"split fractions must sum to 1, got train\+validation\+test = 1.1"):
        SplitConfig(train=0.8, validation=0.2, test=0.1)
