"""MLflow tracking: one parent run per pipeline run, one child run per stage.

The store is a SQLite file under the project (an absolute path, so every stage and
`mlflow ui` find the same one) unless MLFLOW_TRACKING_URI is set. A driver that runs
several stages (`crossrank repro`, the KFP pipeline) opens the parent run and passes
its id to each stage in CROSSRANK_PARENT_RUN_ID; a stage started alone gets a run of
its own. Every run carries the git commit, the data version and the profile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import RunStatus

from crossrank.config import TrackingConfig

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "CROSSRANK_PARENT_RUN_ID"
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")


def tracking_uri(config: TrackingConfig, root: Path = Path(".")) -> str:
    """Return MLFLOW_TRACKING_URI if set, else the project's SQLite store (created once)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = (root / config.store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def metric_key(name: str) -> str:
    """Turn a metric name such as `ndcg@10` into one MLflow accepts (`ndcg_at_10`)."""
    return _UNSAFE_KEY.sub("_", name.replace("@", "_at_"))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(root: Path = Path(".")) -> str:
    """Return the HEAD commit, with "-dirty" when tracked files changed, or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_version(root: Path = Path(".")) -> str:
    """Return the md5 that `data.dvc` records for the raw data folder, or "unknown"."""
    dvc_file = root / "data.dvc"
    try:
        outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8")).get("outs", [])
        return str(outs[0]["md5"])
    except (OSError, AttributeError, IndexError, KeyError, yaml.YAMLError):
        return "unknown"


def _experiment_id(config: TrackingConfig) -> str:
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        # With SQLite, MLflow would put artifacts under ./mlruns of whatever folder the
        # first run starts in; keep them next to the database file instead.
        database = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(config.experiment, artifact_location=artifact_location)


def _tags(profile: str, root: Path) -> dict[str, str]:
    return {
        "crossrank.git_commit": git_commit(root),
        "crossrank.data_version": data_version(root),
        "crossrank.profile": profile,
    }


RUN_KEY_TAG = "crossrank.run_key"


def start_pipeline_run(
    config: TrackingConfig, profile: str, root: Path = Path("."), run_name: str = "pipeline", run_key: str = ""
) -> str:
    """Create the parent run of a pipeline run and return its id; it stays RUNNING.

    `run_key`, when given, is stored as a tag so a task that cannot receive the run
    id (a KFP exit handler) can find the run.
    """
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment_id = _experiment_id(config)
    tags = _tags(profile, root)
    if run_key:
        tags[RUN_KEY_TAG] = run_key
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
    logger.info("MLflow parent run %s in %s", run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


def end_pipeline_run(run_id: str, succeeded: bool) -> None:
    """Mark a parent run FINISHED or FAILED."""
    status = RunStatus.FINISHED if succeeded else RunStatus.FAILED
    mlflow.MlflowClient().set_terminated(run_id, status=RunStatus.to_string(status))


def _runs_with_key(config: TrackingConfig, run_key: str, root: Path) -> list[Any]:
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        return []
    return mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'"
    )


def find_pipeline_run(config: TrackingConfig, run_key: str, root: Path = Path(".")) -> str | None:
    """Return the id of the parent run tagged with `run_key`, or None."""
    runs = _runs_with_key(config, run_key, root)
    return runs[0].info.run_id if runs else None


def end_pipeline_run_by_key(config: TrackingConfig, run_key: str, succeeded: bool, root: Path = Path(".")) -> None:
    """Mark the parent run tagged with `run_key` FINISHED or FAILED; log a warning if none exists."""
    runs = _runs_with_key(config, run_key, root)
    if not runs:
        logger.warning("no MLflow parent run has run key %s; nothing to close", run_key)
        return
    for run in runs:
        end_pipeline_run(run.info.run_id, succeeded)


@contextlib.contextmanager
def pipeline_run(
    config: TrackingConfig, profile: str, root: Path = Path("."), run_name: str = "pipeline"
) -> Iterator[str]:
    """Open the parent run of a pipeline run and yield its id.

    The run ends FAILED when the body raises (or exits non-zero through SystemExit),
    FINISHED otherwise.
    """
    run_id = start_pipeline_run(config, profile, root, run_name)
    succeeded = False
    try:
        yield run_id
        succeeded = True
    finally:
        end_pipeline_run(run_id, succeeded)


class StageRun:
    """Log parameters, metrics and artifacts of one stage to its MLflow run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log nested parameters under dotted keys; values are stored as text."""
        flat = {metric_key(k): ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
        """Log every numeric leaf of nested metrics, skipping None."""
        flat = {
            metric_key(f"{prefix}{k}"): float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        mlflow.log_metrics(flat, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, values: Mapping[str, Any], name: str) -> None:
        """Store a JSON document as an artifact."""
        mlflow.log_text(json.dumps(values, indent=2, default=str), name)


@contextlib.contextmanager
def stage_run(
    stage: str,
    config: TrackingConfig,
    profile: str,
    params: Mapping[str, Any] | None = None,
    root: Path = Path("."),
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, a child of CROSSRANK_PARENT_RUN_ID when set.

    The run ends FAILED when the body raises, so a failed stage stays visible in the UI.
    """
    mlflow.set_tracking_uri(tracking_uri(config, root))
    experiment_id = _experiment_id(config)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {**_tags(profile, root), "crossrank.stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent

    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        logger.info("MLflow run %s for stage %s (parent %s)", run.info.run_id, stage, parent or "none")
        tracked = StageRun(run.info.run_id)
        if params:
            tracked.log_params(params)
        yield tracked


CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"


def register_bundle(
    run: StageRun,
    bundle_dir: Path,
    registered_model: str,
    accepted: bool,
    description: str,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log a model bundle to the run and register it as a new model version.

    The new version gets the alias `challenger`. Only when the gate `accepted` it,
    the alias `champion` moves to it, and the version that held `champion` before
    keeps `previous-champion`, so a rollback is one alias move. `description` (the
    model card, Markdown) becomes the version's description in the MLflow UI.
    """
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    run.log_artifact(bundle_dir, "bundle")
    source = f"{mlflow.get_run(run.run_id).info.artifact_uri}/bundle"
    try:
        client.create_registered_model(registered_model, description="crossrank student cross-encoder bundles")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        registered_model, source, run_id=run.run_id, description=description, tags=dict(tags or {})
    )
    client.set_registered_model_alias(registered_model, CHALLENGER, version.version)

    previous = None
    if accepted:
        try:
            previous = client.get_model_version_by_alias(registered_model, CHAMPION).version
        except MlflowException:
            previous = None
        if previous is not None and previous != version.version:
            client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION, previous)
        client.set_registered_model_alias(registered_model, CHAMPION, version.version)
    logger.info(
        "registered %s version %s (%s)%s",
        registered_model,
        version.version,
        "champion" if accepted else "challenger only",
        f"; previous champion {previous}" if previous else "",
    )
    return {
        "registered_model": registered_model,
        "version": version.version,
        "champion": accepted,
        "previous_champion": previous,
        "source": source,
    }
