"""Augmented pairs: generate unlabeled query-item pairs and label them with the teacher.

Candidates for each training query come from the whole catalog: the best BM25 items
that people did not judge for that query, plus random items (easy negatives). The
teacher scores them, together with the judged training pairs, in shards: each shard
is a separate file written atomically with a fingerprint of its pairs and of the
teacher's weights, so a crashed or interrupted run redoes only unfinished shards.
Shards run in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from crossrank import schema
from crossrank.bm25 import BM25Index
from crossrank.config import AugmentConfig, BM25Config
from crossrank.errors import DataError
from crossrank.ingest import sample_queries

logger = logging.getLogger(__name__)

ORIGIN = "origin"
SHARD_COLUMN = "shard"


def generate_pairs(
    train: pd.DataFrame, catalog: pd.DataFrame, config: AugmentConfig, bm25: BM25Config
) -> pd.DataFrame:
    """Return unlabeled (query, item) pairs for the training queries.

    Per query: the `num_bm25_candidates` best BM25 items over the catalog that the
    query has no judgment for, then `num_random_items` random catalog items, also
    unjudged and not already chosen. Rows carry the item's product columns, a NaN
    `label` and `origin` ("bm25" or "random").
    """
    if config.max_queries is not None:
        train = sample_queries(train, config.max_queries)
    rng = np.random.default_rng(config.seed)
    index = BM25Index(catalog, bm25)
    judged = train.groupby(schema.QUERY_ID)[schema.ITEM_ID].agg(set).to_dict()
    queries = train.drop_duplicates(schema.QUERY_ID)[[schema.QUERY_ID, schema.QUERY]]

    rows: list[tuple[str, str, str, str]] = []
    for query_id, query in tqdm(queries.itertuples(index=False), total=len(queries), desc="BM25 candidates", mininterval=5):
        excluded = set(judged[query_id])
        num_needed = config.num_bm25_candidates
        for item_id in index.top_k(query, num_needed + len(excluded)):
            if num_needed == 0:
                break
            if item_id not in excluded:
                excluded.add(item_id)
                rows.append((query_id, query, item_id, "bm25"))
                num_needed -= 1
        for _ in range(config.num_random_items):
            # Catalogs are large, so a few draws find an item not excluded yet.
            for _attempt in range(20):
                item_id = index.item_ids[rng.integers(len(index.item_ids))]
                if item_id not in excluded:
                    excluded.add(item_id)
                    rows.append((query_id, query, item_id, "random"))
                    break

    pairs = pd.DataFrame(rows, columns=[schema.QUERY_ID, schema.QUERY, schema.ITEM_ID, ORIGIN])
    pairs = pairs.merge(catalog, on=schema.ITEM_ID, how="left", validate="many_to_one")
    pairs[schema.LABEL] = np.nan
    logger.info(
        "generated %d pairs for %d queries (%d from BM25, %d random)",
        len(pairs),
        len(queries),
        int((pairs[ORIGIN] == "bm25").sum()),
        int((pairs[ORIGIN] == "random").sum()),
    )
    return pairs


def pairs_to_label(
    judged: pd.DataFrame, catalog: pd.DataFrame, config: AugmentConfig, bm25: BM25Config
) -> pd.DataFrame:
    """Return the judged training pairs (`origin` "judged") and the generated pairs.

    By default every judged pair goes to the teacher, so the student learns from every
    training query; `max_queries` limits only the queries that get generated pairs.
    `max_judged_queries` keeps the judged pairs of a hash-chosen subset of queries
    (the smoke profile uses it to train its short-lived student on fewer queries).
    """
    if config.max_judged_queries is not None:
        judged = sample_queries(judged, config.max_judged_queries)
    generated = generate_pairs(judged, catalog, config, bm25)
    return pd.concat([judged.assign(**{ORIGIN: "judged"}), generated], ignore_index=True)


def assign_shards(pairs: pd.DataFrame, num_shards: int) -> pd.Series:
    """Return each row's shard number, from a hash of its query id (a query stays in one shard)."""

    def shard_of(query_id: str) -> int:
        digest = hashlib.md5(query_id.encode("utf-8"), usedforsecurity=False).digest()
        return int.from_bytes(digest[:4], "big") % num_shards

    return pairs[schema.QUERY_ID].map(shard_of).astype(int)


def _fingerprint(pairs: pd.DataFrame, weights_digest: str) -> str:
    content = pd.util.hash_pandas_object(pairs[[schema.QUERY_ID, schema.ITEM_ID]], index=False).to_numpy()
    return hashlib.sha256(content.tobytes() + weights_digest.encode("ascii")).hexdigest()


def weights_digest(checkpoint: Path) -> str:
    """Return the SHA-256 of the checkpoint's weight files, which identifies the teacher."""
    digest = hashlib.sha256()
    files = sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin"))
    if not files:
        raise DataError(f"no weights (*.safetensors) in {checkpoint}; run train_teacher first")
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


_WORKER_MODEL = None


def _init_worker(checkpoint: str, num_threads: int) -> None:
    global _WORKER_MODEL
    import torch

    from crossrank.models import CrossEncoder

    torch.set_num_threads(num_threads)
    _WORKER_MODEL = CrossEncoder.load(Path(checkpoint))


def _score_shard(shard_path: str, manifest_path: str, pairs: pd.DataFrame, fingerprint: str, batch_size: int) -> int:
    from crossrank.models import sigmoid

    started = time.perf_counter()
    logits = _WORKER_MODEL.predict_logits(pairs[schema.QUERY].tolist(), pairs.to_dict("records"), batch_size)
    scored = pairs.assign(teacher_logit=logits, teacher_score=sigmoid(logits))
    # Write to a temporary name and rename, so a crash never leaves a half shard.
    temporary = f"{shard_path}.tmp-{os.getpid()}"
    scored.to_parquet(temporary, index=False)
    os.replace(temporary, shard_path)
    manifest = {"fingerprint": fingerprint, "num_pairs": len(scored), "duration_s": time.perf_counter() - started}
    Path(manifest_path).write_text(json.dumps(manifest), encoding="utf-8")
    return len(scored)


def _shard_done(shard_path: Path, manifest_path: Path, fingerprint: str) -> bool:
    if not shard_path.is_file() or not manifest_path.is_file():
        return False
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def label_shard(pairs: pd.DataFrame, checkpoint: Path, shard: int, num_shards: int, batch_size: int) -> pd.DataFrame:
    """Score, in this process, the rows of `pairs` that fall in shard `shard` of `num_shards`.

    The KFP pipeline fans shards out over tasks with this; the shard of a row is the
    same as in `label_pairs`, so both drivers label identical pairs.
    """
    from crossrank.models import CrossEncoder, sigmoid

    part = pairs[assign_shards(pairs, num_shards) == shard].reset_index(drop=True)
    encoder = CrossEncoder.load(checkpoint)
    logits = encoder.predict_logits(part[schema.QUERY].tolist(), part.to_dict("records"), batch_size, progress=True)
    logger.info("labeled shard %d of %d: %d pairs", shard, num_shards, len(part))
    return part.assign(**{SHARD_COLUMN: shard, "teacher_logit": logits, "teacher_score": sigmoid(logits)})


def label_pairs(pairs: pd.DataFrame, checkpoint: Path, shard_dir: Path, config: AugmentConfig) -> pd.DataFrame:
    """Score pairs with the teacher in resumable shards; return them with teacher columns.

    Adds `teacher_logit` and `teacher_score` (sigmoid of the logit). A shard whose file
    and manifest match the current pairs and teacher weights is read back, not
    scored again. Shards run in `num_workers` processes, each with an equal share of
    the CPU threads.
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    digest = weights_digest(checkpoint)
    pairs = pairs.assign(**{SHARD_COLUMN: assign_shards(pairs, config.num_shards)})
    pending = []
    for shard, part in pairs.groupby(SHARD_COLUMN):
        part = part.reset_index(drop=True)
        shard_path = shard_dir / f"shard-{shard:05d}.parquet"
        manifest_path = shard_dir / f"shard-{shard:05d}.json"
        fingerprint = _fingerprint(part, digest)
        if not _shard_done(shard_path, manifest_path, fingerprint):
            pending.append((str(shard_path), str(manifest_path), part, fingerprint))
    num_done = pairs[SHARD_COLUMN].nunique() - len(pending)
    logger.info("labeling %d pairs in %d shards: %d already done, %d to score", len(pairs), num_done + len(pending), num_done, len(pending))

    if pending:
        num_workers = min(config.num_workers, len(pending))
        threads = max(1, math.floor((os.cpu_count() or 1) / num_workers))
        # "spawn" keeps torch's thread pools out of forked children.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, context, _init_worker, (str(checkpoint), threads)) as pool:
            futures = [pool.submit(_score_shard, *job, config.batch_size) for job in pending]
            with tqdm(total=sum(len(job[2]) for job in pending), desc="teacher labeling", unit="pair", mininterval=5) as progress:
                for future in as_completed(futures):
                    progress.update(future.result())

    shards = sorted(shard_dir.glob("shard-*.parquet"))
    expected = {f"shard-{shard:05d}.parquet" for shard in pairs[SHARD_COLUMN].unique()}
    labeled = pd.concat([pd.read_parquet(path) for path in shards if path.name in expected], ignore_index=True)
    return labeled
