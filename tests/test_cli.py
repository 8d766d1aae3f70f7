"""The command line as a user runs it: one clear message and no traceback for bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSSRANK = Path(sys.executable).with_name("crossrank")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CROSSRANK), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_params(folder: Path, text: str) -> None:
    (folder / "params.yaml").write_text(text, encoding="utf-8")


def init_dvc_project(folder: Path, experiment: str) -> None:
    """Make `folder` a git + DVC project whose MLflow runs go to `experiment`."""
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run([str(CROSSRANK.with_name("dvc")), "init", "-q"], cwd=folder, check=True)
    write_params(folder, f"tracking:\n  experiment: {experiment}\n")


@pytest.mark.parametrize(
    "command",
    [
        "ingest",
        "validate",
        "split",
        "bm25",
        "train-teacher",
        "label-augmented",
        "distill-student",
        "evaluate",
        "gate-export",
        "register",
        "repro",
        "pipeline compile",
        "pipeline run",
        "pipeline submit",
        "monitor drift",
        "monitor receive",
        "serve",
    ],
)
def test_every_subcommand_has_help(command: str, tmp_path: Path) -> None:
    completed = run_cli(*command.split(), "--help", cwd=tmp_path)
    assert completed.returncode == 0
    assert f"usage: crossrank {command}" in completed.stdout


def test_pipeline_compile_rejects_profile(tmp_path: Path) -> None:
    # `pipeline compile --profile full --params missing.yaml` used to exit 0 and write
    # the same pipeline as without them, because the compiled pipeline reads no parameter file.
    completed = run_cli("pipeline", "compile", "--profile", "full", "--params", "missing.yaml", cwd=tmp_path)
    assert completed.returncode == 2
    assert "unrecognized arguments: --profile full --params missing.yaml" in completed.stderr
    assert not (tmp_path / "crossrank_pipeline.yaml").exists()


def test_missing_data_folder_one_line(tmp_path: Path) -> None:
    write_params(tmp_path, "data:\n  path: data/homedepot\n")
    completed = run_cli("ingest", cwd=tmp_path)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        f"crossrank ingest: error: data folder not found: {tmp_path / 'data' / 'homedepot'}. "
        "Run `dvc update data.dvc` to import the raw data, or set data.path in params.yaml "
        "to a folder with the raw files."
    )


def test_unknown_adapter_one_line(tmp_path: Path) -> None:
    write_params(tmp_path, "data:\n  adapter: amazon\n")
    completed = run_cli("ingest", cwd=tmp_path)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "data.adapter: Input should be 'homedepot', 'crowdflower' or 'generic'" in completed.stderr


def test_missing_column_one_line(tmp_path: Path) -> None:
    (tmp_path / "mine.csv").write_text("query,title\nlamp,Desk Lamp\n", encoding="utf-8")
    write_params(tmp_path, "data:\n  adapter: generic\n  path: mine.csv\n")
    completed = run_cli("ingest", cwd=tmp_path)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "has no column 'label'; found 'query', 'title'" in completed.stderr


def test_unreadable_file_one_line(tmp_path: Path) -> None:
    (tmp_path / "mine.parquet").write_bytes(b"\x00garbage")
    write_params(tmp_path, "data:\n  adapter: generic\n  path: mine.parquet\n")
    completed = run_cli("ingest", cwd=tmp_path)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert f"cannot read {tmp_path / 'mine.parquet'}" in completed.stderr


def test_missing_stage_input_names_stage(tmp_path: Path) -> None:
    write_params(tmp_path, "profile: smoke\n")
    completed = run_cli("split", cwd=tmp_path)
    assert completed.returncode == 2
    assert "input table not found: artifacts/validated/clean.parquet" in completed.stderr


def test_stopped_repro_fails_its_runs(tmp_path: Path) -> None:
    # A `crossrank repro` stopped with SIGTERM used to leave its MLflow runs RUNNING for
    # good, and its stage process went on. PATH here lacks the venv, so
    # this also checks that `crossrank repro` finds the dvc installed beside its Python.
    init_dvc_project(tmp_path, experiment="stopped")
    stage = "import os, time; open('stage.pid', 'w').write(str(os.getpid())); time.sleep(120)"
    (tmp_path / "dvc.yaml").write_text(f'stages:\n  wait:\n    cmd: {sys.executable} -c "{stage}"\n', encoding="utf-8")

    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(
        [str(CROSSRANK), "repro"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pid_file = tmp_path / "stage.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]

    assert process.returncode == 128 + signal.SIGTERM, output
    stage_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage_pid), "the stage process outlived `crossrank repro`"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert run.info.run_name == "pipeline"
    assert run.info.status == "FAILED"


def test_repro_without_activated_venv(tmp_path: Path) -> None:
    # `.venv/bin/crossrank repro` with the venv not activated used to fail at the first
    # stage, whose command calls `crossrank` by name: "crossrank: command not found".
    init_dvc_project(tmp_path, experiment="unactivated")
    (tmp_path / "dvc.yaml").write_text("stages:\n  usage:\n    cmd: crossrank --help > usage.txt\n", encoding="utf-8")
    venv = str(CROSSRANK.parent)
    path = os.pathsep.join(entry for entry in os.environ["PATH"].split(os.pathsep) if entry != venv)
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"} | {"PATH": path}

    completed = subprocess.run([str(CROSSRANK), "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "usage: crossrank" in (tmp_path / "usage.txt").read_text(encoding="utf-8")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
