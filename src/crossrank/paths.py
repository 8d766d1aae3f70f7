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

    def checkpoint(self, model: str) -> Path:
        return self.root / "artifacts" / "models" / model

    @property
    def augmented_shards(self) -> Path:
        return self.root / "artifacts" / "augmented" / "shards"

    @property
    def labeled_pairs(self) -> Path:
        return self.root / "artifacts" / "augmented" / "labeled_pairs.parquet"

    def training_metrics(self, model: str) -> Path:
        return self.root / "metrics" / f"{model}_training.json"

    def training_curve(self, model: str) -> Path:
        return self.root / "reports" / "plots" / f"{model}_curve.csv"

    @property
    def bundle(self) -> Path:
        return self.root / "artifacts" / "bundle"

    @property
    def gate_decision(self) -> Path:
        return self.root / "metrics" / "gate.json"

    @property
    def model_card(self) -> Path:
        return self.root / "reports" / "model_card.md"

    @property
    def registry(self) -> Path:
        return self.root / "reports" / "registry.json"

    @property
    def token_store(self) -> Path:
        return self.root / "artifacts" / "serving" / "token_store.sqlite"

    @property
    def score_cache(self) -> Path:
        return self.root / "artifacts" / "serving" / "score_cache.sqlite"

    @property
    def serving_stats(self) -> Path:
        return self.root / "metrics" / "serving_stores.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def results_report(self) -> Path:
        return self.root / "reports" / "results.md"
