"""Cross-encoder input: one builder for training, evaluation, export and serving.

The student's sequence is

    [CLS] query [SEP] title [SEP] product_type [SEP] brand [SEP] color [SEP] gender [SEP]

with the attribute list and order from the config. An empty attribute keeps its slot
(its [SEP] stays), so the model can locate each field by counting separators.
The teacher's sequence appends extra fields (such as material and the description)
after the attributes, each closed by its own [SEP].

Token types follow BERT's sentence-pair convention: 0 for `[CLS] query [SEP]`, 1 for
the product part. The query is capped at `max_query_tokens` on its own; when the
sequence is still longer than `max_length`, product text is cut, description first,
then the other extra fields, then the title, then attributes from the last one, and
the query is never cut to make room for product text.

Only the `tokenizers` package is needed, so the serving path imports no torch. The
product part can be encoded once per item (`encode_product`) and joined with a new
query later (`assemble`): that is what the item token store keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from crossrank.errors import ConfigError


class InputSpec(BaseModel):
    """Layout of one model's input; stored with every checkpoint and model bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attributes: tuple[str, ...] = ("product_type", "brand", "color", "gender")
    extra_fields: tuple[str, ...] = Field(
        default=(), description="teacher-only fields after the attributes; `description` is cut first"
    )
    max_length: int = Field(default=64, ge=8, le=512)
    max_query_tokens: int = Field(default=16, ge=1)
    max_attribute_tokens: int = Field(default=12, ge=1)

    @property
    def fields(self) -> tuple[str, ...]:
        """Product fields in sequence order: title, attributes, then extra fields."""
        return ("title", *self.attributes, *self.extra_fields)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` with its built-in truncation and padding turned off.

    The builder does its own truncation and padding; a tokenizer that pads to 128 on
    its own (as the MiniLM file does) would otherwise break the layout.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer file not found: {path}; a model folder or bundle must contain tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"tokenizer has no {token} token; a BERT WordPiece tokenizer is expected")
    return token_id


class InputBuilder:
    """Turn (query, product) pairs into padded `input_ids`, `attention_mask`, `token_type_ids`."""

    def __init__(self, tokenizer: Tokenizer, spec: InputSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.cls_id = _special_id(tokenizer, "[CLS]")
        self.sep_id = _special_id(tokenizer, "[SEP]")
        self.pad_id = _special_id(tokenizer, "[PAD]")
        # The fixed part: [CLS], the [SEP] after the query and one [SEP] per product field.
        self.num_special = 2 + len(spec.fields)
        if self.num_special + spec.max_query_tokens >= spec.max_length:
            raise ConfigError(
                f"max_length {spec.max_length} leaves no room for product text after "
                f"{spec.max_query_tokens} query tokens and {self.num_special} special tokens; "
                "raise max_length or lower max_query_tokens"
            )
        # Cut order when the sequence is too long: description, other extras, title, attributes.
        extras = list(spec.extra_fields)
        if "description" in extras:
            extras.remove("description")
            extras.insert(0, "description")
        attribute_positions = [1 + i for i in range(len(spec.attributes))][::-1]
        extra_positions = [1 + len(spec.attributes) + spec.extra_fields.index(name) for name in extras]
        self._cut_order = [*extra_positions, 0, *attribute_positions]

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_queries(self, queries: Sequence[str]) -> list[list[int]]:
        """Return the token ids of each query, capped at `max_query_tokens`."""
        return [ids[: self.spec.max_query_tokens] for ids in self._encode(queries)]

    def encode_products(self, products: Sequence[Mapping[str, Any]]) -> list[list[list[int]]]:
        """Return, for each product, the token ids of every field in sequence order.

        Attributes are capped at `max_attribute_tokens`; the title and extra fields are
        cut later, in `assemble`, only as far as the query leaves no room.
        """
        fields = self.spec.fields
        texts = [str(product.get(field, "") or "") for product in products for field in fields]
        flat = self._encode(texts)
        segments: list[list[list[int]]] = []
        num_fields = len(fields)
        attribute_slots = range(1, 1 + len(self.spec.attributes))
        for start in range(0, len(flat), num_fields):
            product = flat[start : start + num_fields]
            for slot in attribute_slots:
                product[slot] = product[slot][: self.spec.max_attribute_tokens]
            segments.append(product)
        return segments

    def assemble(self, query_ids: Sequence[int], product_segments: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """Join one encoded query and one encoded product into ids and token types."""
        query_ids = list(query_ids[: self.spec.max_query_tokens])
        budget = self.spec.max_length - self.num_special - len(query_ids)
        lengths = [len(segment) for segment in product_segments]
        excess = sum(lengths) - budget
        for position in self._cut_order:
            if excess <= 0:
                break
            cut = min(excess, lengths[position])
            lengths[position] -= cut
            excess -= cut

        ids = [self.cls_id, *query_ids, self.sep_id]
        num_query_part = len(ids)
        for segment, length in zip(product_segments, lengths, strict=True):
            ids.extend(segment[:length])
            ids.append(self.sep_id)
        type_ids = [0] * num_query_part + [1] * (len(ids) - num_query_part)
        return ids, type_ids

    def pad(self, sequences: Sequence[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        """Pad (ids, token types) pairs to the longest in the batch; arrays are int64 (batch, length)."""
        length = max(len(ids) for ids, _ in sequences)
        batch = len(sequences)
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((batch, length), dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        for row, (ids, type_ids) in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            token_type_ids[row, : len(ids)] = type_ids
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}

    def encode_pairs(self, queries: Sequence[str], products: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int]]]:
        """Return unpadded (ids, token types) for each (query, product) pair."""
        if len(queries) != len(products):
            raise ValueError(f"got {len(queries)} queries but {len(products)} products; pass one product per query")
        query_ids = self.encode_queries(queries)
        segments = self.encode_products(products)
        return [self.assemble(q, s) for q, s in zip(query_ids, segments, strict=True)]

    def build(self, queries: Sequence[str], products: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Return the padded model inputs for (query, product) pairs."""
        return self.pad(self.encode_pairs(queries, products))
