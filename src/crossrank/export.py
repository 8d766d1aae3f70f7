"""Export a checkpoint to ONNX, optimize and quantize the graph, write the model bundle.

The steps, each a function so the export stage and the tests call the same code:

1. `export_onnx`: trace the PyTorch classifier into `model.onnx` with dynamic batch
   and sequence axes and one logit per pair.
2. `optimize_onnx` (optional): fuse attention, layer normalization and GELU with
   ONNX Runtime's transformer optimizer.
3. `quantize_int8` (optional): int8 MatMul weights, and activations quantized at run
   time with one scale per token.
4. `check_parity` and `ranking_agreement`: compare the graph with PyTorch, and int8
   rankings with fp32 rankings, on real pairs.
5. `write_bundle`: copy the graph and tokenizer into a bundle folder with its
   `config.json` (see `crossrank.bundle` for the format).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from crossrank.bundle import (
    CONFIG_FILE,
    FORMAT_VERSION,
    INPUT_NAMES,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    BundleConfig,
    file_sha256,
    load_bundle,
    tokenizer_info,
)
from crossrank.errors import ConfigError
from crossrank.features import InputBuilder, InputSpec, load_tokenizer
from crossrank.models import INPUT_SPEC_FILE, CrossEncoder

logger = logging.getLogger(__name__)

# Op types that only ONNX Runtime's transformer optimizer writes, and those that only
# int8 quantization writes; `write_bundle` reads the graph's state from them.
FUSED_OP_TYPES = frozenset(
    {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu"}
)
INT8_OP_TYPES = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "MatMulIntegerToFloat"}
)
# Fused attention ops, whose projection weights `quantize_int8` cannot reach.
_ATTENTION_OP_TYPES = frozenset({"Attention", "MultiHeadAttention"})
# Prefix of the names of the initializers and nodes that `quantize_int8` adds.
_INT8_PREFIX = "int8_"
# Keys of the metadata that `export_onnx` stores in the graph for `optimize_onnx`.
NUM_HEADS_KEY = "num_attention_heads"
HIDDEN_SIZE_KEY = "hidden_size"


class _LogitsOnly(torch.nn.Module):
    """Wrap a one-logit classifier so the graph returns logits of shape (batch,)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return output.logits.squeeze(-1)  # (batch, 1) -> (batch,)


def _dummy_batch(builder: InputBuilder) -> dict[str, np.ndarray]:
    # Two pairs of different lengths, so the trace contains padding and both token types.
    queries = ["drill", "cordless hammer drill with two batteries"]
    products = [
        {"title": "Cordless Drill", "brand": "DeWalt"},
        {"title": "20-Volt Max Lithium-Ion Brushless Hammer Drill Kit", "product_type": "drills", "color": "yellow"},
    ]
    return builder.build(queries, products)


def export_onnx(checkpoint: Path, out_path: Path, opset: int = 17) -> Path:
    """Export a checkpoint to ONNX with dynamic `batch` and `sequence` axes.

    The graph takes the int64 inputs in `crossrank.bundle.INPUT_NAMES` and returns
    `logits` of shape (batch,). Its metadata records the model's number of attention
    heads and hidden size for `optimize_onnx`. It uses the TorchScript exporter
    (`dynamo=False`) because the default exporter of torch 2.13 needs the onnxscript
    package, which is not a dependency. Check the result with `check_parity`.
    """
    started = time.perf_counter()
    encoder = CrossEncoder.load(checkpoint)
    # Eager attention traces to the MatMul-Softmax pattern that ONNX Runtime's
    # optimizer fuses into one Attention node; the SDPA graph of transformers 5.25
    # does not fuse.
    encoder.model.set_attn_implementation("eager")
    # A new Module starts in training mode; the trace must not contain dropout.
    wrapper = _LogitsOnly(encoder.model).eval()
    batch = _dummy_batch(encoder.builder)
    args = tuple(torch.from_numpy(batch[name]) for name in INPUT_NAMES)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    out_path.parent.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings():
        # Expected warnings with torch 2.13 and transformers 5.25, checked by parity:
        # the tracer turns the mask's "pad to key length" test into a constant, which
        # is correct because an encoder's key length always equals the mask length.
        # The index warning concerns negative indices, but the mask is indexed with
        # aranges. The legacy exporter also announces its deprecation.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        torch.onnx.export(
            wrapper,
            args,
            str(out_path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
        )
    graph = onnx.load(str(out_path))
    model_config = encoder.model.config
    props = {NUM_HEADS_KEY: str(model_config.num_attention_heads), HIDDEN_SIZE_KEY: str(model_config.hidden_size)}
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(out_path))

    logger.info(
        "exported %s to %s (opset %d, %.1f MB) in %.1f s",
        checkpoint,
        out_path,
        opset,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return out_path


def optimize_onnx(
    in_path: Path,
    out_path: Path,
    num_heads: int | None = None,
    hidden_size: int | None = None,
    fuse_attention: bool = True,
) -> Path:
    """Fuse attention, layer normalization and GELU with ONNX Runtime's BERT optimizer.

    With `fuse_attention=False` the attention projections stay plain MatMuls, which
    `quantize_int8` can then quantize; the other fusions still apply.

    `num_heads` and `hidden_size` are the model's `num_attention_heads` and
    `hidden_size`; None reads them from the metadata that `export_onnx` stores. They
    are needed because onnxruntime 1.32 fails to detect them in this graph and then
    leaves attention unfused. Fused ops are ONNX Runtime contrib ops, so the result
    runs only in ONNX Runtime. Logs the count of each fused op type, and a warning
    when the graph is not fully fused.
    """
    started = time.perf_counter()
    if num_heads is None or hidden_size is None:
        stored = _attention_shape(in_path)
        num_heads = stored[0] if num_heads is None else num_heads
        hidden_size = stored[1] if hidden_size is None else hidden_size
    options = FusionOptions("bert")
    options.enable_attention = fuse_attention
    optimizer = optimize_model(
        str(in_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, optimization_options=options
    )
    fused = {op: count for op, count in optimizer.get_fused_operator_statistics().items() if count}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    optimizer.save_model_to_file(str(out_path))

    logger.info("optimized %s to %s in %.1f s; fused ops: %s", in_path, out_path, time.perf_counter() - started, fused)
    if fuse_attention and not optimizer.is_fully_optimized():
        logger.warning("%s is not fully fused (fused ops: %s); it still runs, but slower", out_path, fused)
    return out_path


def _attention_shape(onnx_path: Path) -> tuple[int, int]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    if NUM_HEADS_KEY not in props or HIDDEN_SIZE_KEY not in props:
        raise ValueError(
            f"{onnx_path} has no {NUM_HEADS_KEY} and {HIDDEN_SIZE_KEY} metadata; pass num_heads and "
            "hidden_size from the model config, or export the graph with export_onnx"
        )
    return int(props[NUM_HEADS_KEY]), int(props[HIDDEN_SIZE_KEY])


def quantize_int8(in_path: Path, out_path: Path) -> Path:
    """Quantize every MatMul with a constant weight to int8, with one activation scale per token.

    Weights become signed int8 with one scale per output column. At run time each
    token's activation vector (the last axis) gets its own scale, max|x| / 127, and is
    stored as uint8 with zero point 128; `MatMulIntegerToFloat` multiplies the int8
    product by the weight scales, and a `Mul` by the token's scale. No scale spans two
    tokens, so a pair's score does not depend on its batch neighbours or on padding.
    ONNX Runtime's `quantize_dynamic` takes one activation scale for the whole batch,
    and that moved scores by about 4e-5 with the neighbours. MatMuls of two computed
    tensors (attention's query-key and value products), embeddings, layer norms and
    Gemm layers (pooler, classifier) stay in fp32. Check the result with
    `ranking_agreement`.

    Raises ValueError for a graph with fused Attention ops, whose projections this
    cannot reach: optimize it with `optimize_onnx(..., fuse_attention=False)`.
    """
    started = time.perf_counter()
    model = onnx.load(str(in_path))
    graph = model.graph
    fused = sorted({node.op_type for node in graph.node} & _ATTENTION_OP_TYPES)
    if fused:
        raise ValueError(
            f"{in_path} has fused {', '.join(fused)} ops, whose weights quantize_int8 cannot reach; "
            "optimize the graph with optimize_onnx(..., fuse_attention=False) before quantizing"
        )
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 17)
    weights = {tensor.name: tensor for tensor in graph.initializer}
    constants = [
        numpy_helper.from_array(np.array(value, dtype=dtype), name)
        for name, value, dtype in (
            (f"{_INT8_PREFIX}zero_point", 128, np.uint8),
            (f"{_INT8_PREFIX}offset", 128.0, np.float32),
            (f"{_INT8_PREFIX}one", 1.0, np.float32),
            (f"{_INT8_PREFIX}inverse_127", 1.0 / 127.0, np.float32),
            (f"{_INT8_PREFIX}min_max", 1e-12, np.float32),
            (f"{_INT8_PREFIX}last_axis", [-1], np.int64),
        )
    ]
    nodes: list[onnx.NodeProto] = []
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 tensor, per-token scale)
    num_quantized = 0
    for node in graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        num_quantized += 1
        values = numpy_helper.to_array(weight)
        scales = (np.maximum(np.abs(values).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        ints = np.clip(np.rint(values / scales), -127, 127).astype(np.int8)
        weight_name, scale_name = f"{_INT8_PREFIX}{num_quantized}_weight", f"{_INT8_PREFIX}{num_quantized}_scale"
        constants += [numpy_helper.from_array(ints, weight_name), numpy_helper.from_array(scales, scale_name)]

        activation = node.input[0]
        if activation not in quantized:  # the query, key and value projections share one
            nodes += _quantize_per_token(activation, f"{_INT8_PREFIX}{num_quantized}", opset)
            quantized[activation] = (f"{_INT8_PREFIX}{num_quantized}_uint8", f"{_INT8_PREFIX}{num_quantized}_token_scale")
        ints_in, token_scale = quantized[activation]
        output = node.output[0]
        nodes += [
            onnx.helper.make_node(
                "MatMulIntegerToFloat",
                [ints_in, weight_name, f"{_INT8_PREFIX}one", scale_name, f"{_INT8_PREFIX}zero_point"],
                [f"{output}_{_INT8_PREFIX}unscaled"],
                name=f"{node.name or output}_int8",
                domain="com.microsoft",
            ),
            onnx.helper.make_node("Mul", [f"{output}_{_INT8_PREFIX}unscaled", token_scale], [output]),
        ]
    if not quantized:
        raise ValueError(f"{in_path} has no MatMul with a constant 2-D float weight; there is nothing to quantize")

    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    initializers = [tensor for tensor in [*graph.initializer, *constants] if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    if not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    logger.info(
        "quantized %d MatMuls of %s to int8 with per-token activation scales at %s (%.1f MB -> %.1f MB) in %.1f s",
        num_quantized,
        in_path,
        out_path,
        in_path.stat().st_size / 1e6,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return out_path


def _quantize_per_token(activation: str, prefix: str, opset: int) -> list[onnx.NodeProto]:
    """Nodes that write `{prefix}_uint8` (round(x / s) + 128) and `{prefix}_token_scale` (s per token)."""
    make = onnx.helper.make_node
    absolute, peak = f"{prefix}_abs", f"{prefix}_peak"
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        reduce = make("ReduceMax", [absolute, f"{_INT8_PREFIX}last_axis"], [peak], keepdims=1)
    else:
        reduce = make("ReduceMax", [absolute], [peak], axes=[-1], keepdims=1)
    return [
        make("Abs", [activation], [absolute]),
        reduce,
        # An all-zero token keeps a tiny positive scale instead of dividing by zero.
        make("Max", [peak, f"{_INT8_PREFIX}min_max"], [f"{prefix}_peak_safe"]),
        make("Mul", [f"{prefix}_peak_safe", f"{_INT8_PREFIX}inverse_127"], [f"{prefix}_token_scale"]),
        make("Div", [activation, f"{prefix}_token_scale"], [f"{prefix}_scaled"]),
        make("Round", [f"{prefix}_scaled"], [f"{prefix}_rounded"]),
        make("Add", [f"{prefix}_rounded", f"{_INT8_PREFIX}offset"], [f"{prefix}_shifted"]),
        make("Cast", [f"{prefix}_shifted"], [f"{prefix}_uint8"], to=onnx.TensorProto.UINT8),
    ]


def check_parity(
    checkpoint: Path,
    onnx_path: Path,
    queries: Sequence[str],
    products: Sequence[Mapping[str, Any]],
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime logits on real pairs; raise nothing on a mismatch.

    All pairs go into one batch built by the checkpoint's input builder, so the
    comparison covers padding and both token types. Returns `max_abs_diff`,
    `num_pairs`, `atol` and `passed` (max_abs_diff <= atol).
    """
    encoder = CrossEncoder.load(checkpoint)
    encoder.model.eval()
    batch = encoder.builder.build(queries, products)

    with torch.inference_mode():
        torch_logits = encoder.forward(batch).float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {name: batch[name] for name in INPUT_NAMES})

    max_abs_diff = float(np.max(np.abs(torch_logits - onnx_logits.reshape(-1))))
    result = {"max_abs_diff": max_abs_diff, "num_pairs": len(queries), "atol": atol, "passed": max_abs_diff <= atol}
    log = logger.info if result["passed"] else logger.warning
    log(
        "parity of %s with %s on %d pairs: max abs logit diff %.2e (atol %.0e)",
        onnx_path,
        checkpoint,
        len(queries),
        max_abs_diff,
        atol,
    )
    return result


def ranking_agreement(scores_a: np.ndarray, scores_b: np.ndarray, query_ids: Sequence[Any]) -> float:
    """Return the share of same-query item pairs that both score arrays order the same way.

    A pair agrees when the sign of the score difference is the same in both arrays,
    so a tie in one array and not the other counts as a disagreement. Raises
    ValueError when the lengths differ or no query has two items.
    """
    scores_a = np.asarray(scores_a, dtype=np.float64)
    scores_b = np.asarray(scores_b, dtype=np.float64)
    query_ids = np.asarray(query_ids)
    if not len(scores_a) == len(scores_b) == len(query_ids):
        raise ValueError(
            f"got {len(scores_a)} and {len(scores_b)} scores for {len(query_ids)} query ids; pass one of each per pair"
        )

    num_pairs = 0
    num_agreeing = 0
    _, groups = np.unique(query_ids, return_inverse=True)
    for group in np.unique(groups):
        rows = np.flatnonzero(groups == group)
        upper = np.triu_indices(len(rows), k=1)
        order_a = np.sign(scores_a[rows][:, None] - scores_a[rows][None, :])[upper]  # (num_pairs_in_query,)
        order_b = np.sign(scores_b[rows][:, None] - scores_b[rows][None, :])[upper]
        num_pairs += len(order_a)
        num_agreeing += int(np.sum(order_a == order_b))

    if num_pairs == 0:
        raise ValueError("no query has two or more items; ranking agreement needs same-query pairs")
    return num_agreeing / num_pairs


def _graph_op_types(onnx_path: Path) -> set[str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def _resolve_flag(name: str, requested: Any, detected: Any, onnx_path: Path) -> Any:
    if requested is not None and requested != detected:
        raise ValueError(
            f"{name}={requested!r} was given, but the op types of {onnx_path} show {name}={detected!r}; "
            f"pass the matching graph, or leave {name} unset to read it from the graph"
        )
    return detected


def _check_bundle_target(out_dir: Path, extra_files: Mapping[str, Any]) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"bundle folder {out_dir} exists and is not empty; remove it or choose a new folder")
    for name in extra_files:
        if name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE) or "/" in name or not name.endswith(".json"):
            raise ValueError(
                f"invalid extra bundle file name {name!r}: expected a plain file name ending in .json "
                f"other than {MODEL_FILE}, {TOKENIZER_FILE} and {CONFIG_FILE}"
            )


def _load_checkpoint_builder(checkpoint: Path) -> InputBuilder:
    # Reads only the input spec and tokenizer, so a large teacher's weights stay on disk.
    spec_path = checkpoint / INPUT_SPEC_FILE
    if not spec_path.is_file():
        raise ConfigError(f"checkpoint {checkpoint} has no {INPUT_SPEC_FILE}; it was not written by crossrank")
    spec = InputSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    return InputBuilder(load_tokenizer(checkpoint / TOKENIZER_FILE), spec)


def write_bundle(
    onnx_path: Path,
    checkpoint: Path,
    out_dir: Path,
    model_name: str,
    model_version: str | None = None,
    precision: Literal["fp32", "int8"] | None = None,
    optimized: bool | None = None,
    extra_files: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a model bundle folder and load it back once to check it.

    Copies `onnx_path` to `model.onnx` and the checkpoint's tokenizer.json, writes
    each of `extra_files` (name ending in `.json` -> JSON object) and `config.json`
    with the sha256 of every file. `model_version` defaults to the first 12 hex
    digits of model.onnx's sha256. `precision` and `optimized` are read from the
    graph's op types when None; a given value that contradicts the graph raises
    ValueError. `out_dir` must be missing or empty, so no file of an older bundle
    stays behind.
    """
    started = time.perf_counter()
    _check_bundle_target(out_dir, extra_files or {})
    builder = _load_checkpoint_builder(checkpoint)

    # Graph state: precision and fusion, from the op types.
    op_types = _graph_op_types(onnx_path)
    precision = _resolve_flag("precision", precision, "int8" if op_types & INT8_OP_TYPES else "fp32", onnx_path)
    optimized = _resolve_flag("optimized", optimized, bool(op_types & FUSED_OP_TYPES), onnx_path)

    # Files: graph, tokenizer and the caller's JSON files.
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, out_dir / MODEL_FILE)
    shutil.copyfile(checkpoint / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    for name, content in (extra_files or {}).items():
        (out_dir / name).write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    files = {name: file_sha256(out_dir / name) for name in [MODEL_FILE, TOKENIZER_FILE, *(extra_files or {})]}

    # config.json, validated by the same model the server reads it with.
    config = BundleConfig(
        format_version=FORMAT_VERSION,
        model_name=model_name,
        model_version=model_version or files[MODEL_FILE][:12],
        input_spec=builder.spec,
        precision=precision,
        optimized=optimized,
        files=files,
        tokenizer=tokenizer_info(builder),
    )
    (out_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")

    # Load it back as a server would, so a bundle that fails to load is never left as a success.
    load_bundle(out_dir)
    logger.info(
        "wrote model bundle %s: %s version %s, %s, optimized=%s, %d files, in %.1f s",
        out_dir,
        model_name,
        config.model_version,
        precision,
        optimized,
        len(files) + 1,
        time.perf_counter() - started,
    )
    return out_dir
