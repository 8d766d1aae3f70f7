"""Item token store: build, refresh, and rejection of stores built for another tokenizer.

`load_serving_data` builds the real model bundles and catalog that the serving tests
share: a 2-layer MiniLM classifier exported with crossrank.export, and Home Depot
judgments of 50 queries.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from crossrank.bm25 import build_catalog
from crossrank.bundle import TOKENIZER_FILE, file_sha256, load_bundle
from crossrank.config import DataConfig
from crossrank.errors import DataError
from crossrank.features import InputSpec
from crossrank.ingest import ingest
from crossrank.serving.token_store import (
    TokenStore,
    TokenStoreError,
    build_token_store,
    decode_tokens,
    encode_tokens,
)


@dataclass(frozen=True)
class ServingData:
    """Real judgments, their catalog and model bundles of one tiny checkpoint.

    `bundle` and `bundle_v2` contain the same graph and tokenizer under model versions
    "v1" and "v2". `bundle_cased` ("v1-cased") has the same graph with a tokenizer that
    keeps upper case, so its token ids differ from the others'.
    """

    root: Path
    judgments: pd.DataFrame
    catalog: pd.DataFrame
    checkpoint: Path
    bundle: Path
    bundle_v2: Path
    bundle_cased: Path


def _write_checkpoint(folder: Path) -> None:
    import torch

    from crossrank.models import DEFAULT_BACKBONE, CrossEncoder

    # The backbone has no classification head, so the head starts from the seeded
    # generator. Larger head weights spread the scores of the untrained model.
    torch.manual_seed(13)
    encoder = CrossEncoder.from_backbone(DEFAULT_BACKBONE, InputSpec(max_length=64), num_layers=2)
    with torch.no_grad():
        for parameter in encoder.model.classifier.parameters():
            parameter.normal_(0.0, 2.0)
    encoder.save(folder)


def _write_bundles(root: Path) -> None:
    from crossrank.export import export_onnx, write_bundle

    checkpoint = root / "checkpoint"
    _write_checkpoint(checkpoint)
    onnx_path = export_onnx(checkpoint, root / "model.onnx")
    write_bundle(onnx_path, checkpoint, root / "bundle", "crossrank-test", model_version="v1")
    write_bundle(onnx_path, checkpoint, root / "bundle_v2", "crossrank-test", model_version="v2")

    # Same vocabulary and special ids, other normalization: the bundle loads, but its ids differ.
    cased = root / "checkpoint_cased"
    shutil.copytree(checkpoint, cased)
    tokenizer = json.loads((cased / TOKENIZER_FILE).read_text(encoding="utf-8"))
    tokenizer["normalizer"]["lowercase"] = False
    (cased / TOKENIZER_FILE).write_text(json.dumps(tokenizer), encoding="utf-8")
    write_bundle(onnx_path, cased, root / "bundle_cased", "crossrank-test", model_version="v1-cased")


def load_serving_data(tmp_path_factory: pytest.TempPathFactory, datasets: Path) -> ServingData:
    """Build the serving test data once per session, in a folder that every test module reuses."""
    root = tmp_path_factory.getbasetemp() / "serving-data"
    done = root / "done"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        judgments = ingest(DataConfig(path=str(datasets / "homedepot"), max_queries=50))
        judgments.to_parquet(root / "judgments.parquet")
        build_catalog(judgments).to_parquet(root / "catalog.parquet")
        _write_bundles(root)
        done.touch()
    return ServingData(
        root=root,
        judgments=pd.read_parquet(root / "judgments.parquet"),
        catalog=pd.read_parquet(root / "catalog.parquet"),
        checkpoint=root / "checkpoint",
        bundle=root / "bundle",
        bundle_v2=root / "bundle_v2",
        bundle_cased=root / "bundle_cased",
    )


@pytest.fixture(scope="session")
def serving_data(tmp_path_factory: pytest.TempPathFactory, datasets: Path) -> ServingData:
    return load_serving_data(tmp_path_factory, datasets)


@pytest.fixture(scope="module")
def bundle(serving_data: ServingData):
    return load_bundle(serving_data.bundle)


def stored_tokens(path: Path, item_ids: list[str]) -> dict[str, list[list[int]]]:
    store = TokenStore(path)
    try:
        return store.get(item_ids)
    finally:
        store.close()


def test_build_stores_tokens_of_every_item(serving_data: ServingData, bundle, tmp_path: Path) -> None:
    catalog = serving_data.catalog
    store_path = tmp_path / "tokens.sqlite"

    stats = build_token_store(catalog, serving_data.bundle, store_path)

    assert (stats.num_items, stats.num_added, stats.num_updated, stats.num_unchanged, stats.num_removed) == (
        len(catalog), len(catalog), 0, 0, 0,
    )
    assert stats.model_version == "v1"
    assert stats.tokenizer_sha256 == file_sha256(serving_data.bundle / TOKENIZER_FILE)
    expected = bundle.builder.encode_products(catalog.to_dict("records"))
    stored = stored_tokens(store_path, catalog["item_id"].tolist())
    assert [stored[item_id] for item_id in catalog["item_id"]] == expected


def test_store_reports_meta_and_count(serving_data: ServingData, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)

    store = TokenStore(store_path)

    assert store.meta.model_version == "v1"
    assert store.meta.input_spec == InputSpec(max_length=64)
    assert store.count() == len(serving_data.catalog)
    assert store.get(["no-such-item"]) == {}
    store.close()


def test_same_catalog_changes_nothing(serving_data: ServingData, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)

    stats = build_token_store(serving_data.catalog, serving_data.bundle, store_path)

    assert (stats.num_added, stats.num_updated, stats.num_unchanged, stats.num_removed) == (
        0, 0, len(serving_data.catalog), 0,
    )


def test_refresh_tokenizes_changed_items(serving_data: ServingData, bundle, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)
    catalog = serving_data.catalog.iloc[2:].reset_index(drop=True)  # two items leave the catalog
    catalog.loc[0, "title"] = "Cordless Hammer Drill Kit"  # one item changes
    new_item = catalog.iloc[[1]].assign(item_id="new-item", brand="Makita")
    catalog = pd.concat([catalog, new_item], ignore_index=True)

    stats = build_token_store(catalog, serving_data.bundle, store_path)

    assert (stats.num_items, stats.num_added, stats.num_updated, stats.num_removed) == (len(catalog), 1, 1, 2)
    assert stats.num_unchanged == len(catalog) - 2
    stored = stored_tokens(store_path, [*serving_data.catalog["item_id"][:2], catalog["item_id"][0], "new-item"])
    assert set(stored) == {catalog["item_id"][0], "new-item"}
    changed, added = bundle.builder.encode_products([catalog.iloc[0].to_dict(), new_item.iloc[0].to_dict()])
    assert stored[catalog["item_id"][0]] == changed
    assert stored["new-item"] == added


def test_other_tokenizer_rebuilds_all(serving_data: ServingData, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)
    before = stored_tokens(store_path, serving_data.catalog["item_id"].tolist())

    stats = build_token_store(serving_data.catalog, serving_data.bundle_cased, store_path)

    assert (stats.num_added, stats.num_updated, stats.num_unchanged) == (0, len(serving_data.catalog), 0)
    after = stored_tokens(store_path, serving_data.catalog["item_id"].tolist())
    assert after != before
    assert TokenStore(store_path).meta.model_version == "v1-cased"


def test_other_tokenizer_store_rejected(serving_data: ServingData, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)
    store = TokenStore(store_path)
    cased = load_bundle(serving_data.bundle_cased)
    built_for = file_sha256(serving_data.bundle / TOKENIZER_FILE)[:12]
    loaded = file_sha256(serving_data.bundle_cased / TOKENIZER_FILE)[:12]

    message = (
        f"token store {store_path} was built for another tokenizer (tokenizer.json sha256 {built_for}..., "
        f"model version v1) than the bundle {serving_data.bundle_cased} (sha256 {loaded}..., model version "
        "v1-cased); build the token store again for this bundle"
    )
    with pytest.raises(TokenStoreError, match=re.escape(message)):
        store.check_compatible(cased)
    store.check_compatible(load_bundle(serving_data.bundle_v2))  # same tokenizer, other model version


def test_other_input_spec_store_rejected(serving_data: ServingData, bundle, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)
    with sqlite3.connect(store_path) as connection:
        spec = InputSpec(max_length=64, max_attribute_tokens=4).model_dump_json()
        connection.execute("UPDATE meta SET value = ? WHERE key = 'input_spec'", (spec,))

    with pytest.raises(TokenStoreError, match="max_attribute_tokens': 4.*max_attribute_tokens': 12"):
        TokenStore(store_path).check_compatible(bundle)


def test_lookup_after_tokenizer_change_fails(serving_data: ServingData, tmp_path: Path) -> None:
    store_path = tmp_path / "tokens.sqlite"
    build_token_store(serving_data.catalog, serving_data.bundle, store_path)
    store = TokenStore(store_path)

    build_token_store(serving_data.catalog, serving_data.bundle_cased, store_path)

    message = "rebuilt for tokenizer sha256 .* after it was opened .*; restart the predictor"
    with pytest.raises(TokenStoreError, match=message):
        store.get(serving_data.catalog["item_id"][:3].tolist())
    store.close()


def test_catalog_missing_column_rejected(serving_data: ServingData, tmp_path: Path) -> None:
    catalog = serving_data.catalog.drop(columns=["gender"])

    message = "catalog lacks the columns ['gender'] that the bundle's input spec needs"
    with pytest.raises(DataError, match=re.escape(message)):
        build_token_store(catalog, serving_data.bundle, tmp_path / "tokens.sqlite")


def test_repeated_item_ids_rejected(serving_data: ServingData, tmp_path: Path) -> None:
    catalog = pd.concat([serving_data.catalog, serving_data.catalog.iloc[:2]], ignore_index=True)
    repeated = serving_data.catalog["item_id"][:2].tolist()

    with pytest.raises(DataError, match=re.escape(f"catalog has 2 repeated item_ids (e.g. {repeated})")):
        build_token_store(catalog, serving_data.bundle, tmp_path / "tokens.sqlite")


def test_missing_store_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TokenStoreError, match=re.escape(f"token store not found: {tmp_path / 'none.sqlite'}")):
        TokenStore(tmp_path / "none.sqlite")


def test_other_file_is_not_a_token_store(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE other (x)")

    with pytest.raises(TokenStoreError, match="is not a token store"):
        TokenStore(path)


def test_tokens_round_trip_empty_fields() -> None:
    segments = [[101, 2023], [], [7], [], [2, 3, 4]]

    assert decode_tokens(encode_tokens(segments), num_fields=5) == segments


def test_corrupted_tokens_are_rejected() -> None:
    blob = encode_tokens([[1, 2], [3]])[:-4]

    with pytest.raises(TokenStoreError, match="do not match 2 field lengths"):
        decode_tokens(blob, num_fields=2)
