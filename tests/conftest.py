"""Shared fixtures: paths to the real datasets and a project copy for pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets() -> Path:
    """Return the folder of real judgments that sits beside the repository."""
    if not (DATASETS / "homedepot" / "train.csv.zip").is_file():
        pytest.fail(f"real datasets not found at {DATASETS}; the tests read them from ../shared/datasets")
    return DATASETS
