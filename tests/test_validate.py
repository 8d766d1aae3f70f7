import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossrank import schema
from crossrank.config import DataConfig, GenericSourceConfig, ValidateConfig
from crossrank.errors import DataError
from crossrank.ingest import ingest, read_generic
from crossrank.validate import FAILED_EXPECTATIONS, BadFractionError, validate, write_outputs

# A threshold of 1 lets a test inspect the quarantine of a frame that is mostly bad.
TOLERANT = ValidateConfig(max_bad_fraction=1.0)


@pytest.fixture(scope="module")
def homedepot_head(datasets: Path) -> pd.DataFrame:
    """Return the first 200 real Home Depot judgments, read through the adapter."""
    frame = ingest(DataConfig(adapter="homedepot", path=str(datasets / "homedepot")))
    return frame.head(200).copy()


@pytest.fixture
def rows(homedepot_head: pd.DataFrame) -> pd.DataFrame:
    """Return six real, valid judgments with distinct (query, item_id) pairs."""
    return homedepot_head.head(6).copy()


def test_real_homedepot_rows_all_clean(homedepot_head: pd.DataFrame) -> None:
    result = validate(homedepot_head, ValidateConfig())

    assert result.summary["num_quarantined"] == 0
    assert result.quarantine.empty
    assert list(result.quarantine.columns) == [*homedepot_head.columns, FAILED_EXPECTATIONS]
    pd.testing.assert_frame_equal(result.clean, homedepot_head.reset_index(drop=True))
    assert all(entry["success"] for entry in result.summary["expectations"].values())


def test_wrong_labels_quarantined(rows: pd.DataFrame) -> None:
    rows.loc[1, schema.LABEL] = 1.5
    rows.loc[3, schema.LABEL] = np.nan

    result = validate(rows, TOLERANT)

    assert result.quarantine[schema.ITEM_ID].tolist() == [rows.loc[1, schema.ITEM_ID], rows.loc[3, schema.ITEM_ID]]
    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == [
        "expect_column_values_to_be_between(label)",
        "expect_column_values_to_not_be_null(label)",
    ]
    assert result.quarantine.loc[0, schema.LABEL] == 1.5
    assert np.isnan(result.quarantine.loc[1, schema.LABEL])


def test_empty_title_quarantined(rows: pd.DataFrame) -> None:
    rows.loc[2, schema.TITLE] = ""

    result = validate(rows, TOLERANT)

    assert result.quarantine[schema.ITEM_ID].tolist() == [rows.loc[2, schema.ITEM_ID]]
    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == ["expect_column_value_lengths_to_be_between(title)"]


def test_null_title_quarantined(rows: pd.DataFrame) -> None:
    rows[schema.TITLE] = rows[schema.TITLE].astype(object)
    rows.loc[2, schema.TITLE] = None

    result = validate(rows, TOLERANT)

    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == ["expect_column_values_to_not_be_null(title)"]


def test_duplicate_pair_keeps_first(rows: pd.DataFrame) -> None:
    # Rows 3 and 5 repeat the pair of row 1 with their own labels. Row 1 comes first.
    for position in (3, 5):
        rows.loc[position, [schema.QUERY, schema.ITEM_ID]] = rows.loc[1, [schema.QUERY, schema.ITEM_ID]].tolist()

    result = validate(rows, TOLERANT)

    pd.testing.assert_frame_equal(result.clean, rows.loc[[0, 1, 2, 4]].reset_index(drop=True))
    pd.testing.assert_frame_equal(
        result.quarantine.drop(columns=FAILED_EXPECTATIONS), rows.loc[[3, 5]].reset_index(drop=True)
    )
    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == [
        "expect_compound_columns_to_be_unique(query, item_id)",
    ] * 2
    entry = result.summary["expectations"]["expect_compound_columns_to_be_unique(query, item_id)"]
    assert entry == {"success": False, "unexpected_count": 3, "num_quarantined": 2}


def test_undecodable_bytes_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "judgments.csv"
    path.write_bytes(
        b"query,title,label\n"
        b"angle bracket,Simpson Strong-Tie 12-Gauge Angle,3\n"
        b"deck over,BEHR Premium Textured DeckOver 1-gal. #SC-141 Tugboat Wood and Concrete Coating,2.5\n"
        # 0xe9 is "e acute" in latin-1 but an invalid start byte in UTF-8.
        b"caf\xe9 table,Round Caf\xe9 Table in Black,2\n"
    )
    frame = read_generic(path, GenericSourceConfig(label_min=1.0, label_max=3.0))

    result = validate(frame, TOLERANT)

    assert result.quarantine[schema.QUERY].tolist() == ["caf\ufffd table"]
    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == [
        "expect_column_values_to_not_match_regex(query); expect_column_values_to_not_match_regex(title)"
    ]
    assert result.clean[schema.QUERY].tolist() == ["angle bracket", "deck over"]


@pytest.mark.parametrize(
    ("column", "config_field"),
    [
        (schema.QUERY, "max_query_chars"),
        (schema.TITLE, "max_title_chars"),
        (schema.BRAND, "max_attribute_chars"),
        (schema.GENDER, "max_attribute_chars"),
        (schema.DESCRIPTION, "max_description_chars"),
    ],
)
def test_overlong_text_quarantined(rows: pd.DataFrame, column: str, config_field: str) -> None:
    # 200 is above every real value in these rows, so only the edited cells count.
    config = ValidateConfig(max_bad_fraction=1.0, **{config_field: 200})
    rows.loc[4, column] = "x" * 201
    rows.loc[5, column] = "y" * 200

    result = validate(rows, config)

    assert result.quarantine[column].tolist() == ["x" * 201]
    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == [f"expect_column_value_lengths_to_be_between({column})"]
    assert result.clean[column].tolist()[-1] == "y" * 200


def test_several_failures_joined_in_suite_order(rows: pd.DataFrame) -> None:
    rows.loc[0, schema.TITLE] = "Angle \ufffd " + "x" * 600
    rows.loc[0, schema.LABEL] = -0.5

    result = validate(rows, TOLERANT)

    assert result.quarantine[FAILED_EXPECTATIONS].tolist() == [
        "expect_column_value_lengths_to_be_between(title); "
        "expect_column_values_to_be_between(label); "
        "expect_column_values_to_not_match_regex(title)"
    ]


def test_clean_keeps_order_and_resets_index(rows: pd.DataFrame) -> None:
    rows.index = [60, 50, 40, 30, 20, 10]
    rows.loc[40, schema.LABEL] = 2.0

    result = validate(rows, TOLERANT)

    assert result.clean.index.tolist() == [0, 1, 2, 3, 4]
    assert result.clean[schema.ITEM_ID].tolist() == rows.drop(index=40)[schema.ITEM_ID].tolist()
    assert result.quarantine.index.tolist() == [0]
    assert result.quarantine[schema.ITEM_ID].tolist() == [rows.loc[40, schema.ITEM_ID]]


def test_summary_counts(rows: pd.DataFrame) -> None:
    rows.loc[1, schema.LABEL] = 1.5
    rows.loc[2, schema.QUERY] = ""

    result = validate(rows, ValidateConfig(max_bad_fraction=0.5))

    summary = result.summary
    assert summary["num_rows"] == 6
    assert summary["num_clean"] == 4
    assert summary["num_quarantined"] == 2
    assert summary["bad_fraction"] == pytest.approx(2 / 6)
    assert summary["max_bad_fraction"] == 0.5
    assert len(summary["expectations"]) == 20
    assert summary["expectations"]["expect_column_values_to_be_between(label)"] == {
        "success": False,
        "unexpected_count": 1,
        "num_quarantined": 1,
    }
    assert summary["expectations"]["expect_column_value_lengths_to_be_between(query)"]["num_quarantined"] == 1
    assert summary["expectations"]["expect_column_values_to_not_be_null(title)"] == {
        "success": True,
        "unexpected_count": 0,
        "num_quarantined": 0,
    }
    assert json.loads(json.dumps(summary)) == summary


def test_bad_fraction_at_threshold_passes(rows: pd.DataFrame) -> None:
    rows.loc[1, schema.LABEL] = 1.5

    result = validate(rows, ValidateConfig(max_bad_fraction=1 / 6))

    assert result.summary["num_quarantined"] == 1


def test_bad_fraction_above_threshold_raises(rows: pd.DataFrame, tmp_path: Path) -> None:
    rows.loc[1, schema.LABEL] = 1.5
    rows.loc[2, schema.TITLE] = ""
    rows.loc[4, schema.TITLE] = ""
    quarantine_path = tmp_path / "validated" / "quarantine.parquet"

    with pytest.raises(DataError) as raised:
        validate(rows, ValidateConfig(max_bad_fraction=0.25), quarantine_path=quarantine_path)

    assert str(raised.value) == (
        "3 of 6 rows failed validation: bad fraction 0.5000 is above validate.max_bad_fraction = 0.25. "
        "Top failing expectations: expect_column_value_lengths_to_be_between(title): 2 rows; "
        "expect_column_values_to_be_between(label): 1 row. "
        f"The failing rows, with a failed_expectations column, are in {quarantine_path}. "
        "Clean the raw data, or raise validate.max_bad_fraction in params.yaml "
        "if dropping these rows is acceptable."
    )
    written = pd.read_parquet(quarantine_path)
    assert written[schema.ITEM_ID].tolist() == rows.loc[[1, 2, 4], schema.ITEM_ID].tolist()
    assert written[FAILED_EXPECTATIONS].tolist() == [
        "expect_column_values_to_be_between(label)",
        "expect_column_value_lengths_to_be_between(title)",
        "expect_column_value_lengths_to_be_between(title)",
    ]


def test_bad_fraction_error_carries_result(rows: pd.DataFrame) -> None:
    rows.loc[1, schema.LABEL] = 1.5

    with pytest.raises(BadFractionError) as raised:
        validate(rows, ValidateConfig(max_bad_fraction=0.0))

    assert "No quarantine path was given, so the failing rows were not written" in str(raised.value)
    assert raised.value.result.summary["num_quarantined"] == 1


def test_missing_column_raises(rows: pd.DataFrame) -> None:
    frame = rows.drop(columns=[schema.LABEL, schema.BRAND])

    with pytest.raises(DataError) as raised:
        validate(frame, ValidateConfig())

    message = str(raised.value)
    assert message.startswith("the judgments table has no column 'brand', 'label'; found 'query_id', 'query', ")
    assert message.endswith(
        "Build the table with `crossrank ingest`, or map the column in data.generic.columns in params.yaml."
    )


def test_empty_table_raises(rows: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"^the judgments table has no rows\. "):
        validate(rows.head(0), ValidateConfig())


def test_label_of_wrong_type_raises(rows: pd.DataFrame) -> None:
    frame = rows.assign(**{schema.LABEL: rows[schema.RAW_LABEL]})

    with pytest.raises(DataError) as raised:
        validate(frame, ValidateConfig())

    assert str(raised.value) == (
        "expectation expect_column_values_to_be_between(label) could not run: "
        "Column values, min_value, and max_value must either be None or of the same type. "
        "Check the column's type: label must be float and text columns str, as `crossrank ingest` writes them."
    )


def test_no_progress_bars(rows: pd.DataFrame, capfd: pytest.CaptureFixture[str]) -> None:
    validate(rows, ValidateConfig())

    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_write_outputs_round_trip(rows: pd.DataFrame, tmp_path: Path) -> None:
    rows.loc[1, schema.LABEL] = 1.5
    result = validate(rows, TOLERANT)
    paths = {
        "clean": tmp_path / "a" / "clean.parquet",
        "quarantine": tmp_path / "b" / "quarantine.parquet",
        "summary": tmp_path / "c" / "validation.json",
    }

    write_outputs(result, paths["clean"], paths["quarantine"], paths["summary"])

    pd.testing.assert_frame_equal(pd.read_parquet(paths["clean"]), result.clean)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["quarantine"]), result.quarantine)
    assert json.loads(paths["summary"].read_text(encoding="utf-8")) == result.summary
