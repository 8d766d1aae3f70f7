"""Read and score with a model bundle: the only artifact that servers load.

A bundle is a folder with

- `model.onnx`: inputs `input_ids`, `attention_mask`, `token_type_ids` (int64,
  shape (batch, sequence)) and one output `logits` of shape (batch,);
- `tokenizer.json`: the tokenizer the model was trained with;
- `config.json`: format version, model name and version, the input spec, the score
  function, precision, whether the graph was optimized, the sha256 of every file, and
  the tokenizer's vocabulary size and special-token ids;
- optional JSON files the exporter adds (metrics, score reference, versions), each
  listed with its sha256 in `config.json`.

This module is on the serving path, so it imports neither torch nor transformers:
only numpy, onnxruntime, tokenizers and the torch-free input builder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crossrank.errors import ConfigError, CrossrankError
from crossrank.features import InputBuilder, InputSpec, load_tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"

# The exception classes onnxruntime 1.32 raises for an unreadable or invalid model;
# they derive from Exception directly, with no common base of their own.
_ORT_LOAD_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)
_REEXPORT = "re-run the export stage to write the bundle again"


class BundleError(CrossrankError):
    """Report a model bundle that is missing, incomplete, corrupted or inconsistent."""


class ScoreFunction(BaseModel):
    """Function that maps a logit to the served score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: Literal["sigmoid"] = "sigmoid"


class TokenizerInfo(BaseModel):
    """Vocabulary size and special-token ids that `tokenizer.json` must reproduce."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=1)
    cls_id: int = Field(ge=0)
    sep_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)


class BundleConfig(BaseModel):
    """Contents of a bundle's `config.json`; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int
    model_name: str = Field(min_length=1)
    model_version: str = Field(min_length=1)
    input_spec: InputSpec
    score: ScoreFunction = ScoreFunction()
    precision: Literal["fp32", "int8"]
    optimized: bool
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")
    tokenizer: TokenizerInfo


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_info(builder: InputBuilder) -> TokenizerInfo:
    """Return the vocabulary size and special-token ids of a builder's tokenizer."""
    return TokenizerInfo(
        vocab_size=builder.tokenizer.get_vocab_size(),
        cls_id=builder.cls_id,
        sep_id=builder.sep_id,
        pad_id=builder.pad_id,
    )


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # float64, like crossrank.models.sigmoid, so a served score equals the evaluated one.
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


@dataclass(eq=False)
class Bundle:
    """A loaded model bundle: its config, input builder and ONNX Runtime session.

    Build it with `load_bundle`; the session and tokenizer are created once there and
    reused for every batch.
    """

    path: Path
    config: BundleConfig
    builder: InputBuilder
    session: ort.InferenceSession

    def logits(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run the model on a padded batch; return float32 logits of shape (batch,).

        `batch` contains int64 arrays of shape (batch, sequence) under the names in
        `INPUT_NAMES`, as `InputBuilder.pad` returns them.
        """
        missing = [name for name in INPUT_NAMES if name not in batch]
        if missing:
            raise ValueError(f"batch lacks {', '.join(missing)}; build it with Bundle.builder.pad or .build")
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        return np.asarray(logits, dtype=np.float32).reshape(-1)

    def score_sequences(self, sequences: Sequence[tuple[list[int], list[int]]], batch_size: int = 50) -> np.ndarray:
        """Score encoded pairs, (ids, token types) as `InputBuilder.assemble` returns them.

        Sequences are sorted by length and batched, so each batch pads little; a
        pair's score does not depend on its batch neighbours. Returns float64
        sigmoid(logit) scores in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._check_lengths(sequences)
        scores = np.empty(len(sequences), dtype=np.float64)
        order = np.argsort([len(ids) for ids, _ in sequences], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.builder.pad([sequences[i] for i in rows])
            scores[rows] = _sigmoid(self.logits(batch))
        return scores

    def score(self, queries: Sequence[str], products: Sequence[Mapping[str, Any]], batch_size: int = 50) -> np.ndarray:
        """Score (query, product) pairs; products are mappings of field name to text."""
        return self.score_sequences(self.builder.encode_pairs(queries, products), batch_size)

    def _check_lengths(self, sequences: Sequence[tuple[list[int], list[int]]]) -> None:
        max_length = self.config.input_spec.max_length
        for position, (ids, type_ids) in enumerate(sequences):
            if not 1 <= len(ids) <= max_length or len(type_ids) != len(ids):
                raise ValueError(
                    f"sequence {position} has {len(ids)} ids and {len(type_ids)} token types; expected "
                    f"the same number, between 1 and max_length {max_length}: build sequences with "
                    "Bundle.builder"
                )


def load_bundle(path: str | Path, verify: bool = True, intra_op_threads: int | None = None) -> Bundle:
    """Load a model bundle folder and check that its files agree with each other.

    With `verify`, every file's sha256 is compared with `config.json`.
    `intra_op_threads` sets ONNX Runtime's thread count; None keeps its default (one
    per physical core). Raises BundleError, naming the file and the fix, when

    - the folder, a required file or a file listed in `config.json` is missing;
    - `config.json` is not JSON, has another format_version or an invalid key;
    - a file's sha256 differs from the recorded one;
    - `tokenizer.json` does not match the recorded vocabulary size or special-token ids;
    - `model.onnx` fails to load, or lacks the expected inputs or output.
    """
    started = time.perf_counter()
    folder = Path(path)

    # Files: the folder and the three required files exist.
    if not folder.is_dir():
        raise BundleError(
            f"model bundle folder not found: {folder}; pass the folder that the export stage "
            "wrote (it contains model.onnx, tokenizer.json and config.json)"
        )
    for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise BundleError(f"model bundle {folder} has no {name}; {_REEXPORT}")

    # Config and checksums.
    config = _read_config(folder / CONFIG_FILE)
    if verify:
        _verify_checksums(folder, config)

    # Tokenizer and input builder, checked against the recorded ids.
    builder = _load_builder(folder / TOKENIZER_FILE, config)

    # ONNX Runtime session, checked against the input and output names.
    session = _load_session(folder / MODEL_FILE, intra_op_threads)

    logger.info(
        "loaded model bundle %s: %s version %s, %s, optimized=%s, in %.0f ms",
        folder,
        config.model_name,
        config.model_version,
        config.precision,
        config.optimized,
        (time.perf_counter() - started) * 1000,
    )
    return Bundle(path=folder, config=config, builder=builder, session=session)


def _read_config(path: Path) -> BundleConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON ({err}); {_REEXPORT}") from err
    if not isinstance(raw, dict):
        raise BundleError(f"{path} must contain a JSON object, got {type(raw).__name__}; {_REEXPORT}")

    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}, expected {FORMAT_VERSION}; export the bundle "
            "again with this crossrank version, or serve it with the version that wrote it"
        )

    try:
        config = BundleConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in err.errors()
        )
        raise BundleError(f"invalid {path}: {problems}; {_REEXPORT}") from err
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if name not in config.files:
            raise BundleError(f"{path} lists no sha256 for {name} under `files`; {_REEXPORT}")
    return config


def _verify_checksums(folder: Path, config: BundleConfig) -> None:
    for name, expected in config.files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"model bundle {folder} has no {name}, which config.json lists; {_REEXPORT}")
        actual = file_sha256(file)
        if actual != expected:
            raise BundleError(
                f"{file} is corrupted: its sha256 is {actual}, but config.json records {expected}; "
                "copy the bundle again or re-run the export stage"
            )


def _load_builder(path: Path, config: BundleConfig) -> InputBuilder:
    # tokenizers 0.23 raises a bare Exception for a file it cannot parse.
    try:
        tokenizer = load_tokenizer(path)
    except Exception as err:
        raise BundleError(f"{path} is not a valid tokenizer file ({err}); {_REEXPORT}") from err
    try:
        builder = InputBuilder(tokenizer, config.input_spec)
    except ConfigError as err:
        raise BundleError(f"{path} cannot build the model input: {err}; {_REEXPORT}") from err

    found = tokenizer_info(builder)
    if found != config.tokenizer:
        raise BundleError(
            f"{path} does not match config.json: the tokenizer has {found.model_dump()}, but "
            f"config.json records {config.tokenizer.model_dump()}; the tokenizer file belongs to "
            "another model, so copy the bundle again or re-run the export stage"
        )
    return builder


def _load_session(path: Path, intra_op_threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _ORT_LOAD_ERRORS as err:
        raise BundleError(f"{path} failed to load in ONNX Runtime ({err}); {_REEXPORT}") from err

    inputs = [node.name for node in session.get_inputs()]
    outputs = [node.name for node in session.get_outputs()]
    if sorted(inputs) != sorted(INPUT_NAMES) or OUTPUT_NAME not in outputs:
        raise BundleError(
            f"{path} has inputs {inputs} and outputs {outputs}; expected inputs "
            f"{list(INPUT_NAMES)} and an output {OUTPUT_NAME!r}: export the model with "
            "crossrank.export.export_onnx"
        )
    return session
