"""The command line as a user runs it: one clear message and no traceback for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSSRANK = Path(sys.executable).with_name("crossrank")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CROSSRANK), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_params(folder: Path, text: str) -> None:
    (folder / "params.yaml").write_text(text, encoding="utf-8")


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
