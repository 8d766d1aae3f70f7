"""`dvc repro` of the smoke profile on real data, in a fresh project copy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, datasets: Path) -> tuple[Path, dict[str, str]]:
    """Copy the pipeline into a new git + DVC project and import the real data."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = (root / "params.yaml").read_text(encoding="utf-8")
    (root / "params.yaml").write_text(params.replace("profile: default", "profile: smoke"), encoding="utf-8")

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    run(["git", "init", "-q"], root, env)
    run([str(BIN / "dvc"), "init", "-q"], root, env)
    run([str(BIN / "dvc"), "import-url", str(datasets), "data"], root, env)
    return root, env


@pytest.fixture(scope="module")
def reproduced(project: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str], str]:
    root, env = project
    completed = run([str(BIN / "crossrank"), "repro"], root, env)
    return root, env, completed.stdout + completed.stderr


@pytest.mark.slow
def test_repro_runs_every_stage(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, _, output = reproduced
    for stage in ("ingest", "validate", "split", "bm25", "evaluate"):
        assert f"Running stage '{stage}'" in output
    bm25 = json.loads((root / "metrics" / "bm25.json").read_text(encoding="utf-8"))
    random_order = json.loads((root / "metrics" / "random.json").read_text(encoding="utf-8"))
    assert bm25["all"]["num_queries"] > 20
    assert 0.0 < bm25["all"]["ndcg@10"] <= 1.0
    assert bm25["all"]["pairwise_accuracy"] > random_order["all"]["pairwise_accuracy"]


@pytest.mark.slow
def test_metrics_show_prints_bm25_row(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = reproduced
    shown = run([str(BIN / "dvc"), "metrics", "show"], root, env).stdout
    assert "metrics/bm25.json" in shown
    assert "metrics/random.json" in shown


@pytest.mark.slow
def test_second_repro_does_nothing(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = reproduced
    again = run([str(BIN / "dvc"), "repro"], root, env).stdout
    assert "Running stage" not in again
    assert "Data and pipelines are up to date." in again


@pytest.mark.slow
def test_mlflow_parent_with_stage_children(reproduced: tuple[Path, dict[str, str], str]) -> None:
    root, env, _ = reproduced
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("crossrank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["bm25", "evaluate", "ingest", "split", "validate"]
    for child in children:
        assert child.data.tags["crossrank.profile"] == "smoke"
        assert child.data.tags["crossrank.data_version"] != "unknown"
        assert child.data.tags["crossrank.git_commit"]
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert "bm25.all.ndcg_at_10" in evaluate.data.metrics
