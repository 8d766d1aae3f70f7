"""Export a checkpoint to ONNX, optimize and quantize the graph, write the model bundle.

The steps, each a function so the export stage and the tests call the same code:

1. `export_onnx`: trace the PyTorch classifier into `model.onnx` with dynamic batch
   and sequence axes and one logit per pair.
2. `optimize_onnx` (optional): fuse attention, layer normalization and GELU with
   ONNX Runtime's transformer optimizer.
3. `quantize_int8` (optional): dynamic int8 quantization of the MatMul weights.
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
from onnxruntime.quantization import QuantType, quantize_dynamic
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
# dynamic quantization writes; `write_bundle` reads the graph's state from them.
FUSED_OP_TYPES = frozenset(
    {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu", "FastGelu"}
)
INT8_OP_TYPES = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention"})
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


def optimize_onnx(in_path: Path, out_path: Path, num_heads: int | None = None, hidden_size: int | None = None) -> Path:
    """Fuse attention, layer normalization and GELU with ONNX Runtime's BERT optimizer.

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
    optimizer = optimize_model(str(in_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    fused = {op: count for op, count in optimizer.get_fused_operator_statistics().items() if count}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    optimizer.save_model_to_file(str(out_path))

    logger.info("optimized %s to %s in %.1f s; fused ops: %s", in_path, out_path, time.perf_counter() - started, fused)
    if not optimizer.is_fully_optimized():
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
    """Quantize MatMul weights (and fused Attention weights) to int8, dynamically.

    Weights are stored as signed int8 with one scale per output channel. Activations
    are quantized per batch at run time, so no calibration data is needed.
    Embeddings, layer norms, the pooler and the classifier head stay in fp32. Check
    the result with `ranking_agreement`.
    """
    started = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        in_path,
        out_path,
        op_types_to_quantize=["MatMul", "Attention"],
        weight_type=QuantType.QInt8,
        # Per-channel scales raised the share of same-query pairs ordered as in fp32
        # from 0.87 to 0.92 (MiniLM-L6 with a random head, 253 Home Depot pairs).
        per_channel=True,
        # An optimized graph has contrib ops (Attention, SkipLayerNormalization) that
        # ONNX shape inference cannot type; their outputs are float32.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    logger.info(
        "quantized %s to int8 at %s (%.1f MB -> %.1f MB) in %.1f s",
        in_path,
        out_path,
        in_path.stat().st_size / 1e6,
        out_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return out_path


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
