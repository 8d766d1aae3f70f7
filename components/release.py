"""Components of the release stages: gate and export, registration, deployment."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def gate_and_export(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    student: Input[Model],
    validation: Input[Dataset],
    test: Input[Dataset],
    teacher_scores: Input[Dataset],
    metrics_dir: Input[Dataset],
    bundle: Output[Model],
    decision: Output[Metrics],
    model_card: Output[Markdown],
) -> str:
    """Export the student to an ONNX bundle, run the offline gate, return its verdict.

    The verdict is the plain `Output` parameter: the kfp 2.17 local runner did not
    resolve a named output in the `dsl.If` condition.
    """
    import json
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_gate_export

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    decision_path = Path(tempfile.mkdtemp()) / "gate.json"
    verdict = run_gate_export(
        params, Path(student.path), Path(validation.path), Path(test.path), Path(teacher_scores.path),
        Path(metrics_dir.path), Path(bundle.path), decision_path, Path(model_card.path),
    )
    for name, check in json.loads(decision_path.read_text(encoding="utf-8"))["checks"].items():
        if check["value"] is not None:
            decision.log_metric(name, float(check["value"]))
    decision.metadata["verdict"] = verdict
    return verdict


def register_model(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    bundle: Input[Model],
    model_card: Input[Markdown],
) -> str:
    """Register the accepted bundle in MLflow and move the `champion` alias to it."""
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_register

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    out = Path(tempfile.mkdtemp()) / "registry.json"
    registered = run_register(params, Path(bundle.path), True, Path(model_card.path), out)
    return str(registered["version"])


def deploy_model(bundle: Input[Model], namespace: str, storage_uri: str, manifest: Output[Artifact]) -> str:
    """Render the InferenceService for the bundle; apply it when running inside a cluster."""
    from pathlib import Path

    from crossrank.deploy import deploy_inference_service

    return deploy_inference_service(storage_uri or bundle.uri, Path(manifest.path), namespace)
