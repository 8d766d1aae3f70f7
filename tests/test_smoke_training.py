"""Teacher and student trained by the smoke pipeline on a real slice."""

import json

import pandas as pd
import pytest

from conftest import SmokeProject
from crossrank import schema
from crossrank.models import CrossEncoder


def read_metrics(project: SmokeProject, name: str) -> dict:
    return json.loads((project.root / "metrics" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["teacher", "student"])
def test_training_loss_went_down(smoke_project: SmokeProject, model: str) -> None:
    summary = read_metrics(smoke_project, f"{model}_training")
    assert summary["num_steps"] > 0
    assert summary["final_loss"] < summary["initial_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["teacher", "student"])
def test_title_match_beats_unrelated(smoke_project: SmokeProject, model: str) -> None:
    encoder = CrossEncoder.load(smoke_project.root / "artifacts" / "models" / model)
    test = pd.read_parquet(smoke_project.root / "artifacts" / "splits" / "test.parquet")
    unrelated = {"title": "Stainless Steel Kitchen Sink Strainer", "brand": "Everbilt", "color": "Stainless"}
    unrelated_words = set(" ".join(unrelated.values()).lower().split())
    candidates = test[schema.QUERY].drop_duplicates()
    queries = [q for q in candidates if not set(q.lower().split()) & unrelated_words][:6]
    for query in queries:
        match = {"title": query.title(), "brand": "", "color": ""}
        logits = encoder.predict_logits([query, query], [match, unrelated])
        assert logits[0] > logits[1], f"{model}: {query!r} scored {logits[0]:.3f} for its title, {logits[1]:.3f} unrelated"
