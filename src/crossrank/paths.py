"""Default locations of stage inputs and outputs, relative to the project root.

`dvc.yaml` declares the same paths; the command line uses these defaults and the
KFP components pass their own artifact paths to the stage functions instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of every stage output under one project root."""

    root: Path = Path(".")

    @property
    def judgments(self) -> Path:
        return self.root / "artifacts" / "judgments.parquet"

    @property
    def clean(self) -> Path:
        return self.root / "artifacts" / "validated" / "clean.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "artifacts" / "validated" / "quarantine.parquet"

    @property
    def validation_summary(self) -> Path:
        return self.root / "reports" / "validation.json"

    @property
    def validation_metrics(self) -> Path:
        return self.root / "metrics" / "validation.json"

    @property
    def splits(self) -> Path:
        return self.root / "artifacts" / "splits"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    @property
    def catalog(self) -> Path:
        return self.root / "artifacts" / "catalog.parquet"

    @property
    def scores(self) -> Path:
        return self.root / "artifacts" / "scores"

    def score_file(self, model: str) -> Path:
        return self.scores / f"{model}.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def results_report(self) -> Path:
        return self.root / "reports" / "results.md"
