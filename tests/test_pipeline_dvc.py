"""`dvc repro` of the smoke profile on real data, in a fresh project copy."""

import json

import mlflow
import pytest

from conftest import BIN, SmokeProject, run_checked

STAGES = (
    "ingest",
    "validate",
    "split",
    "bm25",
    "train_teacher",
    "label_augmented",
    "distill_student",
    "evaluate",
    "gate_export",
    "register",
    "build_serving_stores",
)


@pytest.mark.slow
def test_repro_runs_every_stage(smoke_project: SmokeProject) -> None:
    for stage in STAGES:
        assert f"Running stage '{stage}'" in smoke_project.output
    metrics = smoke_project.root / "metrics"
    bm25 = json.loads((metrics / "bm25.json").read_text(encoding="utf-8"))
    random_order = json.loads((metrics / "random.json").read_text(encoding="utf-8"))
    assert bm25["all"]["num_queries"] > 20
    assert 0.0 < bm25["all"]["ndcg@10"] <= 1.0
    assert bm25["all"]["pairwise_accuracy"] > random_order["all"]["pairwise_accuracy"]
    for model in ("teacher", "student"):
        scores = json.loads((metrics / f"{model}.json").read_text(encoding="utf-8"))
        assert scores["all"]["num_queries"] == bm25["all"]["num_queries"]
        assert scores["all"]["rmse"] is not None


@pytest.mark.slow
def test_metrics_show_prints_every_row(smoke_project: SmokeProject) -> None:
    shown = run_checked([str(BIN / "dvc"), "metrics", "show"], smoke_project.root, smoke_project.env).stdout
    for name in ("bm25", "random", "teacher", "student", "teacher_training", "student_training"):
        assert f"metrics/{name}.json" in shown


@pytest.mark.slow
def test_second_repro_does_nothing(smoke_project: SmokeProject) -> None:
    again = run_checked([str(BIN / "dvc"), "repro"], smoke_project.root, smoke_project.env).stdout
    assert "Running stage" not in again
    assert "Data and pipelines are up to date." in again


@pytest.mark.slow
def test_mlflow_parent_with_stage_children(smoke_project: SmokeProject) -> None:
    client = mlflow.MlflowClient(tracking_uri=smoke_project.tracking_uri)
    experiment = client.get_experiment_by_name("crossrank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    for child in children:
        assert child.data.tags["crossrank.profile"] == "smoke"
        assert child.data.tags["crossrank.data_version"] != "unknown"
        assert child.data.tags["crossrank.git_commit"]
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert "bm25.all.ndcg_at_10" in evaluate.data.metrics
    teacher = next(r for r in children if r.info.run_name == "train_teacher")
    assert "train_loss" in teacher.data.metrics
    assert "validation_ndcg_at_10" in teacher.data.metrics
