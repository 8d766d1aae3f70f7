from pathlib import Path

import pandas as pd
import pytest

from crossrank import schema
from crossrank.config import DataConfig, GenericSourceConfig
from crossrank.errors import DataError
from crossrank.ingest import clean_attribute, ingest, read_generic, sample_queries


@pytest.fixture(scope="module")
def homedepot(datasets: Path) -> pd.DataFrame:
    return ingest(DataConfig(adapter="homedepot", path=str(datasets / "homedepot")))


@pytest.fixture(scope="module")
def crowdflower(datasets: Path) -> pd.DataFrame:
    return ingest(DataConfig(adapter="crowdflower", path=str(datasets / "crowdflower")))


def test_homedepot_first_row_joined(homedepot: pd.DataFrame) -> None:
    first = homedepot.iloc[0]
    assert list(homedepot.columns) == [*schema.CANONICAL_COLUMNS, "material"]
    assert first[schema.QUERY] == "angle bracket"
    assert first[schema.ITEM_ID] == "100001"
    assert first[schema.TITLE] == "Simpson Strong-Tie 12-Gauge Angle"
    assert first[schema.BRAND] == "Simpson Strong-Tie"
    assert first["material"] == "Galvanized Steel"
    assert first[schema.COLOR] == ""
    assert first[schema.RAW_LABEL] == "3.0"
    assert first[schema.LABEL] == 1.0
    assert first[schema.SOURCE] == "homedepot"


def test_homedepot_counts_and_label_scale(homedepot: pd.DataFrame) -> None:
    assert len(homedepot) == 66_875
    # 10,616 raw search terms; two pairs differ only in surrounding whitespace.
    assert homedepot[schema.QUERY].nunique() == 10_614
    assert homedepot[schema.LABEL].between(0, 1).all()
    # relevance 2.33 (a rater mean) maps to (2.33 - 1) / 2.
    assert homedepot.loc[homedepot[schema.RAW_LABEL] == "2.33", schema.LABEL].iloc[0] == pytest.approx(0.665)


def test_homedepot_missing_text_is_empty_not_nan(homedepot: pd.DataFrame) -> None:
    for column in (*schema.TEXT_COLUMNS, "material"):
        values = homedepot[column]
        assert values.map(type).eq(str).all(), column
        assert not values.str.lower().isin(["nan", "none"]).any(), column


def test_homedepot_color_repeats_collapsed(homedepot: pd.DataFrame) -> None:
    colors = homedepot.loc[homedepot[schema.ITEM_ID] == "100005", schema.COLOR]
    assert colors.iloc[0] == "Chrome"


def test_crowdflower_row_and_label_scale(crowdflower: pd.DataFrame) -> None:
    assert len(crowdflower) == 9_081
    first = crowdflower.iloc[0]
    assert first[schema.QUERY] == "bridal shower decorations"
    assert first[schema.TITLE] == "Accent Pillow with Heart Design - Red/Black"
    assert first[schema.DESCRIPTION].startswith("Red satin accent pillow")
    assert first[schema.LABEL] == 0.0
    assert sorted(crowdflower[schema.LABEL].unique()) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_crowdflower_item_id_from_title(crowdflower: pd.DataFrame) -> None:
    by_title = crowdflower.groupby(schema.TITLE)[schema.ITEM_ID].nunique()
    assert by_title.max() == 1
    assert crowdflower[schema.ITEM_ID].iloc[0].startswith("cf")


def test_crowdflower_descriptions_without_html(crowdflower: pd.DataFrame) -> None:
    assert not crowdflower[schema.DESCRIPTION].str.contains("<br", regex=False).any()
    assert (crowdflower[schema.DESCRIPTION] == "").mean() > 0.1


def test_generic_csv_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "judgments.csv"
    path.write_text(
        "search,product,grade,sku,colour\n"
        "red drill,Cordless Drill Red,4,A1,Red\n"
        "red drill,Hammer,0,A2,\n",
        encoding="utf-8",
    )
    config = DataConfig(
        adapter="generic",
        path=str(path),
        generic=GenericSourceConfig(
            columns={"query": "search", "title": "product", "label": "grade", "item_id": "sku", "color": "colour"},
            label_min=0,
            label_max=4,
        ),
    )
    frame = ingest(config)
    assert frame[schema.ITEM_ID].tolist() == ["A1", "A2"]
    assert frame[schema.LABEL].tolist() == [1.0, 0.0]
    assert frame[schema.COLOR].tolist() == ["Red", ""]
    assert frame[schema.BRAND].tolist() == ["", ""]
    assert frame[schema.SOURCE].tolist() == ["judgments.csv", "judgments.csv"]


def test_generic_parquet_derives_item_id(tmp_path: Path) -> None:
    path = tmp_path / "judgments.parquet"
    pd.DataFrame({"query": ["tv"], "title": ["Smart TV 55"], "label": [1.0]}).to_parquet(path)
    frame = ingest(DataConfig(adapter="generic", path=str(path)))
    assert frame[schema.ITEM_ID].iloc[0].startswith("g")
    assert frame[schema.LABEL].iloc[0] == 1.0


def test_missing_data_folder_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as raised:
        ingest(DataConfig(adapter="homedepot", path=str(missing)))
    assert str(raised.value) == (
        f"data folder not found: {missing}. Run `dvc update data.dvc` to import the raw data, "
        "or set data.path in params.yaml to a folder with the raw files."
    )


def test_missing_column_message(tmp_path: Path) -> None:
    path = tmp_path / "judgments.csv"
    path.write_text("query,title\nlamp,Desk Lamp\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has no column 'label'; found 'query', 'title'"):
        ingest(DataConfig(adapter="generic", path=str(path)))


def test_unreadable_file_message(tmp_path: Path) -> None:
    folder = tmp_path / "homedepot"
    folder.mkdir()
    (folder / "train.csv.zip").write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"cannot read .*train\.csv\.zip: .*Check that the file is a complete CSV"):
        ingest(DataConfig(adapter="homedepot", path=str(folder)))


def test_sample_queries_nested(homedepot: pd.DataFrame) -> None:
    small = sample_queries(homedepot, 50)
    large = sample_queries(homedepot, 200)
    assert small[schema.QUERY_ID].nunique() == 50
    assert set(small[schema.QUERY_ID]) <= set(large[schema.QUERY_ID])


def test_clean_attribute_cases() -> None:
    assert clean_attribute("Chrome Chrome") == "Chrome"
    assert clean_attribute("  Browns / Tans  Tugboat ") == "Browns / Tans Tugboat"
    assert clean_attribute("<b>Oil&amp;Rubbed</b> Bronze") == "Oil&Rubbed Bronze"
    assert clean_attribute("nan") == ""
    assert clean_attribute("N/A") == ""


def test_read_generic_rejects_unknown_canonical(tmp_path: Path) -> None:
    path = tmp_path / "judgments.csv"
    path.write_text("query,title,label\nlamp,Desk Lamp,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown canonical columns \['colour'\]"):
        read_generic(path, GenericSourceConfig(columns={"colour": "title"}))
