"""Shared fixtures: paths to the real datasets and a project copy for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class SmokeProject:
    """A copy of the project where `crossrank repro` ran the smoke profile on real data."""

    root: Path
    env: dict[str, str]
    output: str

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]


def run_checked(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    """Run a command and fail the test with its output when it exits non-zero."""
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return completed


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory, datasets: Path) -> SmokeProject:
    """Copy the pipeline into a new git + DVC project, import the real data, run it.

    Every stage runs once per test session on the smoke profile; tests of later
    stages read its outputs instead of training again.
    """
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = (root / "params.yaml").read_text(encoding="utf-8")
    (root / "params.yaml").write_text(params.replace("profile: default", "profile: smoke"), encoding="utf-8")

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    run_checked(["git", "init", "-q"], root, env)
    run_checked([str(BIN / "dvc"), "init", "-q"], root, env)
    run_checked([str(BIN / "dvc"), "import-url", str(datasets), "data"], root, env)
    completed = run_checked([str(BIN / "crossrank"), "repro"], root, env)
    return SmokeProject(root, env, completed.stdout + completed.stderr)
