"""The Kubeflow pipeline: compiled spec, local runs with the kfp runner, submission errors."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO_ROOT, SmokeProject
from crossrank.kfp_driver import compile_pipeline, run_local

TASKS = {
    "start-tracking",
    "ingest-data",
    "validate-data",
    "split-data",
    "score-bm25",
    "train-teacher",
    "generate-pairs",
    "label-shard",
    "merge-labels",
    "distill-student",
    "evaluate-models",
    "gate-and-export",
    "register-model",
    "deploy-model",
    "finish-tracking",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml", "crossrank:test")


def test_compiled_yaml_loads_back(compiled: Path) -> None:
    from kfp import components

    loaded = components.load_component_from_file(str(compiled))
    assert loaded.name == "crossrank"
    assert {"params_yaml", "data_path", "profile", "tracking_uri"} <= set(loaded.component_spec.inputs)


def test_compiled_yaml_has_stages_fanout_condition(compiled: Path) -> None:
    spec = yaml.safe_load(compiled.read_text(encoding="utf-8"))
    executors = spec["deploymentSpec"]["executors"]
    images = {executor["container"]["image"] for executor in executors.values()}
    assert images == {"crossrank:test"}
    for task in TASKS:
        assert f"comp-{task}" in spec["components"], task

    def walk(node):
        if isinstance(node, dict):
            yield node
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    nodes = list(walk(spec["components"]))
    iterators = [node["parameterIterator"] for node in nodes if "parameterIterator" in node]
    assert iterators[0]["items"]["inputParameter"] == "pipelinechannel--generate-pairs-Output"
    conditions = [node["triggerPolicy"]["condition"] for node in nodes if "condition" in node.get("triggerPolicy", {})]
    assert conditions == ["inputs.parameter_values['pipelinechannel--gate-and-export-Output'] == 'accept'"]


def _params_text(overrides: dict) -> str:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["profile"] = "smoke"
    for section, values in overrides.items():
        params[section].setdefault("profiles", {}).setdefault("smoke", {}).update(values)
    return yaml.safe_dump(params, sort_keys=False)


def _tasks_run(run_folder: Path) -> set[str]:
    # Loop iterations are folders of their own, with the task folders inside.
    names = set()
    for task in run_folder.iterdir():
        if task.name.startswith("for-loop-"):
            names.update(inner.name for inner in task.iterdir() if inner.is_dir())
        else:
            names.add(task.name)
    return names


@pytest.fixture(scope="module")
def accepted_run(tmp_path_factory: pytest.TempPathFactory, datasets: Path, smoke_project: SmokeProject) -> Path:
    root = tmp_path_factory.mktemp("kfp-accept")
    (root / "params.yaml").write_text((smoke_project.root / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return run_local((root / "params.yaml").read_text(encoding="utf-8"), "smoke", str(datasets / "homedepot"), root / "pipeline-root", root)


@pytest.mark.slow
def test_local_run_executes_every_task(accepted_run: Path) -> None:
    ran = _tasks_run(accepted_run)
    for task in TASKS - {"finish-tracking"}:
        assert task in ran, f"{task} did not run; ran: {sorted(ran)}"


@pytest.mark.slow
def test_dvc_and_kfp_metrics_agree(accepted_run: Path, smoke_project: SmokeProject) -> None:
    kfp_metrics = next(accepted_run.glob("evaluate-models*/metrics_dir"))
    for model in ("random", "bm25", "teacher", "student"):
        dvc = json.loads((smoke_project.root / "metrics" / f"{model}.json").read_text(encoding="utf-8"))
        kfp = json.loads((kfp_metrics / f"{model}.json").read_text(encoding="utf-8"))
        for metric in ("ndcg@10", "pairwise_accuracy", "mrr", "num_queries"):
            assert kfp["all"][metric] == pytest.approx(dvc["all"][metric], abs=1e-3), (model, metric)


@pytest.mark.slow
def test_rejected_gate_skips_release(tmp_path: Path, datasets: Path) -> None:
    text = _params_text(
        {
            "teacher": {"max_steps": 3, "eval_every_steps": 3, "max_validation_queries": 10},
            "augment": {"max_queries": 10, "num_shards": 2},
            "student": {"max_steps": 3, "eval_every_steps": 3, "max_validation_queries": 10},
            "gate": {"min_ndcg_gain_share": 1000.0},
        }
    )
    env_tracking = tmp_path / "mlflow"
    text = text.replace("store: mlflow", f"store: {env_tracking}")
    run_folder = run_local(text, "smoke", str(datasets / "homedepot"), tmp_path / "pipeline-root", tmp_path)
    ran = _tasks_run(run_folder)
    assert "gate-and-export" in ran
    assert "register-model" not in ran
    assert "deploy-model" not in ran


def test_submit_unreachable_host_one_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [str(BIN / "crossrank"), "pipeline", "submit", "--host", "http://127.0.0.1:9", "--data-path", "/data", "--params", str(REPO_ROOT / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith(
        "crossrank pipeline: error: cannot reach the KFP API server at http://127.0.0.1:9"
    )
