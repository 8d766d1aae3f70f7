"""Components that open and close the pipeline's MLflow parent run."""

from typing import NamedTuple

from kfp import dsl


def start_tracking(
    params_yaml: str, profile: str, tracking_uri: str, run_name: str, run_key: str
) -> NamedTuple("TrackingOutputs", [("parent_run_id", str)]):
    """Create the MLflow parent run of this pipeline run, tagged with `run_key`; return its id.

    The output has its own name: the kfp 2.17 local runner mixes up two upstream
    outputs that are both called `Output` when they meet inside a ParallelFor.
    """
    from collections import namedtuple

    from crossrank.kfp_support import stage_params
    from crossrank.tracking import start_pipeline_run

    params = stage_params(params_yaml, profile, tracking_uri, "")
    run_id = start_pipeline_run(params.tracking, params.profile, run_name=run_name, run_key=run_key)
    return namedtuple("TrackingOutputs", ["parent_run_id"])(run_id)


def finish_tracking(
    params_yaml: str, profile: str, tracking_uri: str, run_key: str, status: dsl.PipelineTaskFinalStatus
) -> None:
    """Mark the parent run tagged `run_key` FINISHED or FAILED from the pipeline's final status.

    An exit task may not depend on other tasks, so it finds the parent run by its key
    instead of taking the id from `start_tracking`.
    """
    from crossrank.kfp_support import stage_params
    from crossrank.tracking import end_pipeline_run_by_key

    params = stage_params(params_yaml, profile, tracking_uri, "")
    end_pipeline_run_by_key(params.tracking, run_key, succeeded=status.state == "SUCCEEDED")
