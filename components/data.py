"""Components of the data stages: ingest, validate, split, BM25."""

from kfp.dsl import Dataset, Input, Metrics, Output


def ingest_data(
    params_yaml: str, profile: str, tracking_uri: str, parent_run_id: str, data_path: str, judgments: Output[Dataset]
) -> None:
    """Read the raw judgments at `data_path` into the canonical table."""
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_ingest

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    params = params.model_copy(update={"data": params.data.model_copy(update={"path": data_path})})
    run_ingest(params, Path(judgments.path))


def validate_data(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    judgments: Input[Dataset],
    clean: Output[Dataset],
    quarantine: Output[Dataset],
    summary: Output[Metrics],
) -> None:
    """Run the expectation suite; quarantined rows keep their failed expectations."""
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import log_json_metrics, stage_params
    from crossrank.stages import run_validate

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    scratch = Path(tempfile.mkdtemp())
    run_validate(
        params, Path(judgments.path), Path(clean.path), Path(quarantine.path), scratch / "summary.json", scratch / "counts.json"
    )
    log_json_metrics(summary, scratch / "counts.json")


def split_data(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    clean: Input[Dataset],
    train: Output[Dataset],
    validation: Output[Dataset],
    test: Output[Dataset],
    catalog: Output[Dataset],
) -> None:
    """Split clean judgments by query hash; write the catalog of judged items."""
    import shutil
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_split

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    splits = Path(tempfile.mkdtemp())
    run_split(params, Path(clean.path), splits, Path(catalog.path))
    for name, artifact in (("train", train), ("validation", validation), ("test", test)):
        shutil.copyfile(splits / f"{name}.parquet", artifact.path)


def score_bm25(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    test: Input[Dataset],
    catalog: Input[Dataset],
    scores: Output[Dataset],
) -> None:
    """Score the test judgments with BM25 over the catalog."""
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_bm25

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    run_bm25(params, Path(test.path), Path(catalog.path), Path(scores.path))
