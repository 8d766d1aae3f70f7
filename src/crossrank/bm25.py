"""BM25 over the product catalog: the lexical baseline and the candidate generator."""

from __future__ import annotations

import logging
import re
import time

import bm25s
import numpy as np
import pandas as pd
from bm25s.stopwords import STOPWORDS_EN

from crossrank import schema
from crossrank.config import BM25Config

logger = logging.getLogger(__name__)

# The token pattern of scikit-learn's CountVectorizer, which bm25s uses by default.
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_STOPWORDS = frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    """Split text into lower-cased word tokens of two or more characters, without stopwords."""
    return [token for token in _TOKEN.findall(text.lower()) if token not in _STOPWORDS]


def build_catalog(frame: pd.DataFrame) -> pd.DataFrame:
    """Return one row per `item_id` with its product columns, from its first judgment."""
    product_columns = [
        column
        for column in frame.columns
        if column
        not in (schema.QUERY_ID, schema.QUERY, schema.LABEL, schema.RAW_LABEL, "split", "failed_expectations")
        and not column.endswith("_score")
    ]
    catalog = frame.drop_duplicates(schema.ITEM_ID)[product_columns]
    return catalog.reset_index(drop=True)


class BM25Index:
    """A BM25 index over catalog items, scoring every item for a query.

    The product text of an item joins the `config.fields` that the catalog has.
    Fields it lacks are skipped, so one config serves datasets with and without a
    material column.
    """

    def __init__(self, catalog: pd.DataFrame, config: BM25Config) -> None:
        started = time.perf_counter()
        fields = [field for field in config.fields if field in catalog.columns]
        texts = catalog[fields].astype(str).agg(" ".join, axis=1).tolist()
        # bm25s needs at least one token per document; "" keeps empty products scorable at 0.
        corpus = [tokenize(text) or [""] for text in texts]

        self.item_ids = catalog[schema.ITEM_ID].astype(str).to_numpy()
        self.position = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.fields = fields
        # bm25s logs every indexing step at DEBUG on its own logger.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self._retriever = bm25s.BM25(k1=config.k1, b=config.b)
        self._retriever.index(corpus, show_progress=False)
        logger.info(
            "indexed %d catalog items on fields %s in %.1f s",
            len(texts),
            ",".join(fields),
            time.perf_counter() - started,
        )

    def score_all(self, query: str) -> np.ndarray:
        """Return the BM25 score of every catalog item for `query`, shape (num_items,)."""
        tokens = [t for t in tokenize(query) if t in self._retriever.vocab_dict]
        if not tokens:
            return np.zeros(len(self.item_ids), dtype=np.float32)
        return self._retriever.get_scores(tokens)

    def score_pairs(self, queries: pd.Series, item_ids: pd.Series) -> np.ndarray:
        """Return the BM25 score of each (query, item_id) pair; items must be in the catalog."""
        scores = np.zeros(len(queries), dtype=np.float32)
        positions = item_ids.astype(str).map(self.position)
        if positions.isna().any():
            missing = item_ids[positions.isna()].iloc[0]
            raise KeyError(f"item_id {missing!r} is not in the BM25 catalog")
        for query, rows in pd.Series(range(len(queries))).groupby(queries.to_numpy()):
            all_scores = self.score_all(str(query))
            scores[rows.to_numpy()] = all_scores[positions.iloc[rows.to_numpy()].astype(int).to_numpy()]
        return scores

    def top_k(self, query: str, k: int) -> list[str]:
        """Return the item ids of the `k` best-scoring items with a positive score, best first."""
        all_scores = self.score_all(query)
        k = min(k, len(all_scores))
        best = np.argpartition(-all_scores, k - 1)[:k] if k else np.array([], dtype=int)
        best = best[np.argsort(-all_scores[best], kind="stable")]
        return [self.item_ids[i] for i in best if all_scores[i] > 0]
