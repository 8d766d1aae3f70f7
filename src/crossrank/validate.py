"""Check the canonical judgments table with a Great Expectations suite and quarantine bad rows.

The suite has two kinds of expectations. Table expectations (every canonical column
exists, the table has rows) stop the stage with a DataError, because no quarantine can
repair them. Row expectations mark single rows as bad: those rows move to the
quarantine table with the names of the expectations they failed, and the rest go on as
the clean table. The stage fails when the share of bad rows exceeds
`validate.max_bad_fraction`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from crossrank import schema
from crossrank.config import ValidateConfig
from crossrank.errors import DataError

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.expectations import Expectation
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

logger = logging.getLogger(__name__)

FAILED_EXPECTATIONS = "failed_expectations"
"""Quarantine column: the names of the failed expectations, joined by "; "."""

# The adapters decode with errors="replace", which writes U+FFFD for every byte that is
# invalid in the file's encoding. The pattern is the escape, so it reads clearly in JSON.
REPLACEMENT_CHARACTER_PATTERN = r"\ufffd"

NUM_TOP_FAILURES = 3
_DUPLICATE_PAIR_COLUMNS = [schema.QUERY, schema.ITEM_ID]


@dataclass
class ValidationResult:
    """Clean rows, quarantined rows and the counts of one validation run.

    `clean` and `quarantine` keep the input's columns and row order with a fresh
    RangeIndex; `quarantine` adds the `failed_expectations` column. `summary` is
    JSON-serializable.
    """

    clean: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any]


class BadFractionError(DataError):
    """Report that more rows failed validation than `validate.max_bad_fraction` allows.

    `result` contains the full ValidationResult, so a caller that passed no quarantine
    path can still inspect the failing rows.
    """

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


def validate(
    frame: pd.DataFrame, config: ValidateConfig, quarantine_path: Path | None = None
) -> ValidationResult:
    """Run the expectation suite on the judgments table and split off the failing rows.

    Row expectations, with bounds from `config`:
    - `query`, `item_id`, `title` and `label` are not null.
    - `query` has 1 to `max_query_chars` characters and `title` 1 to `max_title_chars`.
      Attributes and `description` may be "" and have at most `max_attribute_chars`
      and `max_description_chars`.
    - `label` lies in [0, 1].
    - No text column contains U+FFFD, the mark of undecodable bytes.
    - Each (query, item_id) pair occurs once. Great Expectations flags every row of a
      repeated pair, so this function quarantines the second and later occurrences in
      row order and keeps the first. Another expectation can still quarantine the first.

    When `quarantine_path` is given, the quarantine table is written there as Parquet
    on every call, before any bad-fraction error, so no failing row is lost.

    Raises DataError when a canonical column is missing, the table has no rows, or an
    expectation cannot run on a column's type. Raises BadFractionError, a DataError,
    when the fraction of quarantined rows exceeds `config.max_bad_fraction`.
    """
    start = time.perf_counter()
    # GE reports failing rows by index label, so positions must be the labels.
    rows = frame.reset_index(drop=True)

    # Run the whole suite in one pass over the data.
    table_expectations = _table_expectations()
    row_expectations = _row_expectations(config)
    outcome = _run_suite(rows, [*table_expectations, *row_expectations])
    results = {_expectation_name(result.expectation_config): result for result in outcome.results}

    # Stop on problems that no quarantine can fix.
    _raise_for_table_problems(results, rows)

    # Mark every failing (row, expectation) and split the table.
    row_names = [_expectation_name(expectation.configuration) for expectation in row_expectations]
    failures = _failure_mask(rows, results, row_names)
    result = _split_rows(rows, failures, results, config)

    # Write the quarantine before any error, so the rows can be inspected.
    if quarantine_path is not None:
        _write_parquet(result.quarantine, quarantine_path)

    summary = result.summary
    logger.info(
        "validated %d rows in %.1f s: %d clean, %d quarantined (bad fraction %.4f, max %g)",
        summary["num_rows"],
        time.perf_counter() - start,
        summary["num_clean"],
        summary["num_quarantined"],
        summary["bad_fraction"],
        summary["max_bad_fraction"],
    )
    if summary["bad_fraction"] > config.max_bad_fraction:
        raise BadFractionError(_bad_fraction_message(summary, quarantine_path), result)
    if summary["num_quarantined"] > 0:
        logger.warning("quarantined rows by expectation: %s", _format_failures(summary))
    return result


def write_outputs(
    result: ValidationResult, clean_path: Path, quarantine_path: Path, summary_path: Path
) -> None:
    """Write the clean and quarantine tables as Parquet and the summary as JSON.

    Parent folders are created as needed; existing files are replaced.
    """
    _write_parquet(result.clean, Path(clean_path))
    _write_parquet(result.quarantine, Path(quarantine_path))
    summary_path = Path(summary_path)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")


def _great_expectations() -> Any:
    # Imported on first use because the import takes about 3.5 s (measured on 2 CPU
    # cores), and GE 1.24 logs about 200 INFO lines while importing. Its logger is raised to WARNING unless the caller
    # has already set a level for it.
    ge_logger = logging.getLogger("great_expectations")
    if ge_logger.level == logging.NOTSET:
        ge_logger.setLevel(logging.WARNING)

    import great_expectations as gx

    return gx


def _table_expectations() -> list[Expectation]:
    expectations = _great_expectations().expectations
    return [
        *(expectations.ExpectColumnToExist(column=column) for column in schema.CANONICAL_COLUMNS),
        expectations.ExpectTableRowCountToBeBetween(min_value=1),
    ]


def _row_expectations(config: ValidateConfig) -> list[Expectation]:
    expectations = _great_expectations().expectations
    max_chars = {
        schema.QUERY: config.max_query_chars,
        schema.TITLE: config.max_title_chars,
        **{column: config.max_attribute_chars for column in schema.ATTRIBUTE_COLUMNS},
        schema.DESCRIPTION: config.max_description_chars,
    }
    # Only query and title must be non-empty. Attributes and description may be "".
    min_chars = {schema.QUERY: 1, schema.TITLE: 1}

    return [
        *(
            expectations.ExpectColumnValuesToNotBeNull(column=column)
            for column in (schema.QUERY, schema.ITEM_ID, schema.TITLE, schema.LABEL)
        ),
        *(
            expectations.ExpectColumnValueLengthsToBeBetween(
                column=column, min_value=min_chars.get(column), max_value=max_chars[column]
            )
            for column in schema.TEXT_COLUMNS
        ),
        expectations.ExpectColumnValuesToBeBetween(column=schema.LABEL, min_value=0.0, max_value=1.0),
        expectations.ExpectCompoundColumnsToBeUnique(column_list=_DUPLICATE_PAIR_COLUMNS),
        *(
            expectations.ExpectColumnValuesToNotMatchRegex(column=column, regex=REPLACEMENT_CHARACTER_PATTERN)
            for column in schema.TEXT_COLUMNS
        ),
    ]


def _run_suite(rows: pd.DataFrame, expectations: list[Expectation]) -> ExpectationSuiteValidationResult:
    gx = _great_expectations()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Without this config, GE 1.24 creates a temporary docs folder for every ephemeral
    # context and draws a tqdm progress bar on stderr for every validation.
    context_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=context_config)
    batch_definition = (
        context.data_sources.add_pandas("crossrank")
        .add_dataframe_asset("judgments")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": rows})

    suite = gx.ExpectationSuite(name="crossrank_judgments", expectations=expectations)
    # COMPLETE is the only result format that lists every failing row's index.
    return batch.validate(suite, result_format={"result_format": "COMPLETE"})


def _expectation_name(configuration: ExpectationConfiguration) -> str:
    kwargs = configuration.kwargs
    if "column" in kwargs:
        return f"{configuration.type}({kwargs['column']})"
    if "column_list" in kwargs:
        return f"{configuration.type}({', '.join(kwargs['column_list'])})"
    return configuration.type


def _exception_messages(result: ExpectationValidationResult) -> list[str]:
    # GE 1.24 stores an error raised by the expectation itself at the top level of
    # exception_info, and errors raised by its metrics in one entry per metric.
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return [str(info.get("exception_message"))]
    return [
        str(entry.get("exception_message"))
        for entry in info.values()
        if isinstance(entry, dict) and entry.get("raised_exception")
    ]


def _raise_for_table_problems(results: dict[str, ExpectationValidationResult], rows: pd.DataFrame) -> None:
    missing = [
        column
        for column in schema.CANONICAL_COLUMNS
        if not results[f"expect_column_to_exist({column})"].success
    ]
    if missing:
        raise DataError(
            f"the judgments table has no column {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(repr(str(c)) for c in rows.columns)}. "
            f"Every stage expects the canonical columns {', '.join(schema.CANONICAL_COLUMNS)}. "
            "Build the table with `crossrank ingest`, or map the column in "
            "data.generic.columns in params.yaml."
        )

    if not results["expect_table_row_count_to_be_between"].success:
        raise DataError(
            "the judgments table has no rows. Check that the raw judgments file under "
            "data.path in params.yaml has data rows."
        )

    for name, result in results.items():
        messages = _exception_messages(result)
        if messages:
            raise DataError(
                f"expectation {name} could not run: {' '.join(messages)} "
                f"Check the column's type: {schema.LABEL} must be float and text columns "
                "str, as `crossrank ingest` writes them."
            )


def _failure_mask(
    rows: pd.DataFrame, results: dict[str, ExpectationValidationResult], row_names: list[str]
) -> pd.DataFrame:
    """Return a (num_rows, num_row_expectations) bool frame, True where a row failed."""
    mask = pd.DataFrame(False, index=rows.index, columns=row_names)
    duplicate_name = f"expect_compound_columns_to_be_unique({', '.join(_DUPLICATE_PAIR_COLUMNS)})"
    for name in row_names:
        result = results[name]
        if result.success:
            continue
        positions = result.result["unexpected_index_list"]
        if name == duplicate_name:
            positions = _later_occurrences(rows, positions)
        mask.loc[positions, name] = True
    return mask


def _later_occurrences(rows: pd.DataFrame, positions: list[int]) -> list[int]:
    # GE returns all members of every repeated pair. Among them, keep="first" marks
    # all but the earliest row of each pair.
    members = rows.loc[sorted(positions), _DUPLICATE_PAIR_COLUMNS]
    return members.index[members.duplicated(keep="first")].tolist()


def _split_rows(
    rows: pd.DataFrame,
    failures: pd.DataFrame,
    results: dict[str, ExpectationValidationResult],
    config: ValidateConfig,
) -> ValidationResult:
    bad = failures.any(axis=1)
    names = np.array(failures.columns)
    failed_names = ["; ".join(names[flags]) for flags in failures[bad].to_numpy()]

    clean = rows[~bad].reset_index(drop=True)
    quarantine = rows[bad].reset_index(drop=True)
    quarantine[FAILED_EXPECTATIONS] = pd.Series(failed_names, dtype=object)

    num_rows = len(rows)
    summary = {
        "num_rows": num_rows,
        "num_clean": len(clean),
        "num_quarantined": len(quarantine),
        "bad_fraction": len(quarantine) / num_rows,
        "max_bad_fraction": config.max_bad_fraction,
        # GE's unexpected_count counts every member of a repeated pair, while
        # num_quarantined counts only the rows this stage moved to the quarantine.
        "expectations": {
            name: {
                "success": bool(results[name].success),
                "unexpected_count": int(results[name].result.get("unexpected_count", 0)),
                "num_quarantined": int(failures[name].sum()),
            }
            for name in failures.columns
        },
    }
    return ValidationResult(clean=clean, quarantine=quarantine, summary=summary)


def _format_failures(summary: dict[str, Any], limit: int | None = None) -> str:
    counts = [
        (name, entry["num_quarantined"])
        for name, entry in summary["expectations"].items()
        if entry["num_quarantined"] > 0
    ]
    counts.sort(key=lambda item: item[1], reverse=True)
    return "; ".join(f"{name}: {_rows(count)}" for name, count in counts[:limit])


def _bad_fraction_message(summary: dict[str, Any], quarantine_path: Path | None) -> str:
    if quarantine_path is not None:
        where = f"The failing rows, with a {FAILED_EXPECTATIONS} column, are in {quarantine_path}."
    else:
        where = (
            "No quarantine path was given, so the failing rows were not written; "
            "they are in the `result` attribute of this error."
        )
    return (
        f"{summary['num_quarantined']} of {_rows(summary['num_rows'])} failed validation: "
        f"bad fraction {summary['bad_fraction']:.4f} is above "
        f"validate.max_bad_fraction = {summary['max_bad_fraction']:g}. "
        f"Top failing expectations: {_format_failures(summary, NUM_TOP_FAILURES)}. "
        f"{where} Clean the raw data, or raise validate.max_bad_fraction in params.yaml "
        "if dropping these rows is acceptable."
    )


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
