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

from crossrank.export import (
    check_parity,
    optimize_onnx,
    quantize_int8,
    ranking_agreement,
)
from crossrank.models import CrossEncoder

NUM_HEADS = 12  # MiniLM-L6: 12 heads of 32 dimensions each
HIDDEN_SIZE = 384


@pytest.fixture(scope="module")
def pairs(judgments: pd.DataFrame) -> tuple[list[str], list[dict]]:
    return judgments["query"].tolist(), judgments.to_dict("records")


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> CrossEncoder:
    encoder = CrossEncoder.load(checkpoint)
    encoder.model.eval()
    return encoder


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

    assert "MatMulIntegerToFloat" in op_types
    assert "MatMul" in op_types  # attention's products of two computed tensors stay fp32
    # The word embeddings (47 of the 91 MB) stay fp32.
    assert int8_onnx.stat().st_size < 0.7 * fp32_onnx.stat().st_size


def test_int8_ranking_agreement(int8_onnx: Path, encoder: CrossEncoder, judgments: pd.DataFrame, pairs) -> None:
    queries, products = pairs
    session = ort.InferenceSession(str(int8_onnx), providers=["CPUExecutionProvider"])

    reference = encoder.predict_logits(queries, products)
    (quantized,) = session.run(["logits"], encoder.builder.build(queries, products))
    agreement = ranking_agreement(reference, quantized, judgments["query_id"].tolist())

    assert agreement >= 0.9, f"int8 orders {agreement:.3f} of same-query pairs like fp32"


def _single_matmul_graph(path: Path, weight: np.ndarray, opset: int) -> Path:
    """Save a graph y = x @ weight, with x of shape (batch, tokens, rows of weight)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "single_matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "tokens", weight.shape[0]])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "tokens", weight.shape[1]])],
        [onnx.numpy_helper.from_array(weight, "weight")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.mark.parametrize("opset", [17, 18])
def test_int8_matmul_hand_computed(tmp_path: Path, opset: int) -> None:
    weight = np.array([[1.0, -0.5], [0.25, 2.0], [-1.0, 0.0]], dtype=np.float32)
    x = np.array([[[0.4, -1.0, 0.25], [3.0, 0.0, -1.2]], [[0.0, 0.0, 0.0], [1e-3, 3e-3, -4e-3]]], dtype=np.float32)
    graph = quantize_int8(_single_matmul_graph(tmp_path / "fp32.onnx", weight, opset), tmp_path / "int8.onnx")

    # By hand: weight columns have scales 1/127 and 2/127, so they become
    # [[127, -32], [32, 127], [-127, 0]] (0.25 * 127 = 31.75 rounds to 32). Token
    # [0.4, -1, 0.25] has scale 1/127 and becomes [51, -127, 32].
    weight_scales = np.array([1 / 127, 2 / 127], dtype=np.float32)
    weight_ints = np.array([[127, -32], [32, 127], [-127, 0]])
    assert np.array_equal(np.rint(weight / weight_scales), weight_ints)
    token_scales = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    token_ints = np.rint(x / token_scales)
    assert np.array_equal(token_ints[0, 0], [51, -127, 32])
    expected = (token_ints @ weight_ints) * weight_scales * token_scales

    (result,) = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(result[1, 0], 0.0)  # an all-zero token stays zero, without dividing by zero
    np.testing.assert_allclose(result, x @ weight, atol=0.05)


def test_int8_rejects_fused_attention(optimized_onnx: Path, tmp_path: Path) -> None:
    message = (
        f"{optimized_onnx} has fused Attention ops, whose weights quantize_int8 cannot reach; optimize the "
        "graph with optimize_onnx(..., fuse_attention=False) before quantizing"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize_int8(optimized_onnx, tmp_path / "int8.onnx")


def test_int8_score_batch_independent(int8_onnx: Path, encoder: CrossEncoder, pairs) -> None:
    queries, products = pairs
    session = ort.InferenceSession(str(int8_onnx), providers=["CPUExecutionProvider"])
    batch = encoder.builder.build(queries[:32], products[:32])
    lengths = batch["attention_mask"].sum(axis=1)
    shortest = int(np.argmin(lengths))
    assert lengths.max() > lengths[shortest]  # the shortest pair is padded in the batch

    (in_batch,) = session.run(["logits"], batch)
    (alone,) = session.run(["logits"], encoder.builder.build([queries[shortest]], [products[shortest]]))

    # Per-tensor dynamic quantization moved this score by about 4e-5.
    assert abs(float(in_batch[shortest]) - float(alone[0])) <= 1e-6


def test_int8_after_fusion_without_attention(fp32_onnx: Path, checkpoint: Path, pairs, tmp_path: Path) -> None:
    # What the export stage ships with precision int8: fused layer norms, unfused attention.
    fused = optimize_onnx(fp32_onnx, tmp_path / "fused.onnx", fuse_attention=False)
    op_types = {node.op_type for node in onnx.load(str(fused)).graph.node}
    assert "SkipLayerNormalization" in op_types
    assert not op_types & {"Attention", "MultiHeadAttention"}
    queries, products = pairs

    assert check_parity(checkpoint, fused, queries, products)["max_abs_diff"] <= 1e-4
    graph = quantize_int8(fused, tmp_path / "int8.onnx")
    assert "MatMulIntegerToFloat" in {node.op_type for node in onnx.load(str(graph)).graph.node}


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
