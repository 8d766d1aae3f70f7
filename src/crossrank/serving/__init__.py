"""Serving: the KServe re-rank predictor over a model bundle, with its token store and score cache.

Modules:

- `token_store`: per-item product token ids, precomputed with the bundle's tokenizer.
- `score_cache`: precomputed scores of head queries and their judged items.
- `predictor`: the `kserve.Model` that parses re-rank requests and scores them.
- `server`: builds and starts KServe's ModelServer (`crossrank serve`).

Nothing in this package imports torch, transformers or training code, so the predictor
image stays small and starts fast.
"""
