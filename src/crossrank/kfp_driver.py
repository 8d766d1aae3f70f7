"""Compile, run locally or submit the Kubeflow pipeline (the `crossrank pipeline` driver)."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from crossrank.config import parse_params
from crossrank.errors import CrossrankError
from crossrank.tracking import tracking_uri

logger = logging.getLogger(__name__)


def compile_pipeline(output: Path, image: str) -> Path:
    """Write the pipeline's KFP v2 IR YAML to `output`."""
    from kfp import compiler

    from pipelines.crossrank_pipeline import build_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image), str(output))
    return output


def run_local(params_yaml: str, profile: str, data_path: str, pipeline_root: Path, root: Path = Path(".")) -> Path:
    """Run the pipeline with the kfp local runner in this Python environment.

    Returns the folder of this run's task outputs under `pipeline_root`. Raises
    CrossrankError when a task fails.
    """
    from kfp import local

    from pipelines.crossrank_pipeline import build_pipeline

    params = parse_params(params_yaml, profile or None)
    data = Path(data_path)
    if not data.is_absolute():
        data = (root / data).resolve()
    pipeline_root = pipeline_root.resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.perf_counter()
    try:
        build_pipeline()(
            params_yaml=params_yaml,
            data_path=str(data),
            profile=params.profile,
            tracking_uri=tracking_uri(params.tracking, root),
            run_key=uuid.uuid4().hex,
        )
    except RuntimeError as err:
        raise CrossrankError(f"the local pipeline run failed: {err}. The failing task's log is above.") from err
    run_folders = sorted(set(pipeline_root.iterdir()) - before)
    logger.info("local pipeline run finished in %.0f s; task outputs in %s", time.perf_counter() - started, run_folders)
    return run_folders[-1] if run_folders else pipeline_root


def submit(
    host: str,
    params_yaml: str,
    profile: str,
    data_path: str,
    image: str,
    experiment: str,
    run_name: str | None,
    mlflow_uri: str,
    timeout_s: float,
) -> str:
    """Submit the pipeline to the KFP API server at `host`; return the run id.

    Raises CrossrankError with one line when the server cannot be reached or rejects
    the run.
    """
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    params = parse_params(params_yaml, profile or None)
    run_name = run_name or f"crossrank-{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    arguments: dict[str, Any] = {
        "params_yaml": params_yaml,
        "data_path": data_path,
        "profile": params.profile,
        "tracking_uri": mlflow_uri,
        "run_name": run_name,
        "run_key": uuid.uuid4().hex,
    }
    with tempfile.TemporaryDirectory() as folder:
        package = compile_pipeline(Path(folder) / "crossrank_pipeline.yaml", image)
        try:
            client = kfp.Client(host=host)
            client._run_api.api_client.configuration.retries = urllib3.Retry(total=0, connect=0)  # fail fast
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment
            )
        except (urllib3.exceptions.HTTPError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise CrossrankError(
                f"cannot reach the KFP API server at {host} ({reason}); check --host and that the "
                "server, or a port-forward to it, is running"
            ) from None
        except ApiException as err:
            raise CrossrankError(
                f"the KFP API server at {host} rejected the run: HTTP {err.status} {err.reason}: {(err.body or '')[:300]}"
            ) from None
    logger.info("submitted run %s (%s) to %s in experiment %s", result.run_id, run_name, host, experiment)
    return result.run_id
