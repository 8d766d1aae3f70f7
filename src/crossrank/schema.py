"""Column names of the canonical judgments table that every stage reads."""

from typing import Final

QUERY_ID: Final = "query_id"
QUERY: Final = "query"
ITEM_ID: Final = "item_id"
TITLE: Final = "title"
PRODUCT_TYPE: Final = "product_type"
BRAND: Final = "brand"
COLOR: Final = "color"
GENDER: Final = "gender"
DESCRIPTION: Final = "description"
LABEL: Final = "label"
RAW_LABEL: Final = "raw_label"
SOURCE: Final = "source"

# Product attributes in the student's input order, after the title.
ATTRIBUTE_COLUMNS: Final = (PRODUCT_TYPE, BRAND, COLOR, GENDER)
TEXT_COLUMNS: Final = (QUERY, TITLE, *ATTRIBUTE_COLUMNS, DESCRIPTION)
CANONICAL_COLUMNS: Final = (
    QUERY_ID,
    QUERY,
    ITEM_ID,
    TITLE,
    *ATTRIBUTE_COLUMNS,
    DESCRIPTION,
    LABEL,
    RAW_LABEL,
    SOURCE,
)
