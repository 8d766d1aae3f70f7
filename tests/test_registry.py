"""Registry aliases and the runs a reviewer finds through a real `mlflow server`."""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, SmokeProject
from crossrank.config import load_params
from crossrank.stages import run_register
from crossrank.tracking import PARENT_RUN_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_champion_moves_only_when_accepted(smoke_project: SmokeProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    params = load_params(smoke_project.root / "params.yaml")
    bundle = smoke_project.root / "artifacts" / "bundle"
    card = smoke_project.root / "reports" / "model_card.md"

    first = run_register(params, bundle, True, card, tmp_path / "first.json")
    rejected = run_register(params, bundle, False, card, tmp_path / "rejected.json")
    client = mlflow.MlflowClient()
    name = params.gate.registered_model
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]
    assert client.get_model_version_by_alias(name, "challenger").version == rejected["version"]

    accepted = run_register(params, bundle, True, card, tmp_path / "accepted.json")
    assert client.get_model_version_by_alias(name, "champion").version == accepted["version"]
    assert client.get_model_version_by_alias(name, "previous-champion").version == first["version"]
    assert accepted["previous_champion"] == first["version"]
    assert client.get_model_version(name, accepted["version"]).description.startswith("# crossrank-student")


@pytest.mark.slow
def test_mlflow_server_shows_pipeline(smoke_project: SmokeProject) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", smoke_project.tracking_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=smoke_project.root,
        env=smoke_project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def get(path: str, **query: str) -> dict:
        url = f"{base}/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{base}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        for _ in range(120):
            try:
                experiment = get("experiments/get-by-name", experiment_name="crossrank")["experiment"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer on 127.0.0.1 within 60 s")

        runs = post("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        names = {run["info"]["run_name"]: run for run in runs}
        parent_id = names["pipeline"]["info"]["run_id"]
        children = [
            run for run in runs
            if any(tag["key"] == "mlflow.parentRunId" and tag["value"] == parent_id for tag in run["data"].get("tags", []))
        ]
        assert {"train_teacher", "distill_student", "gate_export", "register"} <= {run["info"]["run_name"] for run in children}

        gate_run = next(run for run in children if run["info"]["run_name"] == "gate_export")
        artifacts = get("artifacts/list", run_id=gate_run["info"]["run_id"])
        assert "gate_decision.json" in {item["path"] for item in artifacts["files"]}

        champion = get("registered-models/alias", name="crossrank-student", alias="champion")["model_version"]
        assert champion["run_id"] in {run["info"]["run_id"] for run in children}
        assert "Gate verdict: **accept**" in champion["description"]
    finally:
        server.terminate()
        server.wait(timeout=30)
