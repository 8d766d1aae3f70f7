"""Components of the model stages: teacher, labeling fan-out, student, evaluation."""

from typing import List

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def train_teacher(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    train: Input[Dataset],
    validation: Input[Dataset],
    test: Input[Dataset],
    teacher: Output[Model],
    scores: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Fine-tune the teacher with BCE on soft labels and score the test split."""
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import log_json_metrics, stage_params
    from crossrank.stages import run_train_teacher

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    scratch = Path(tempfile.mkdtemp())
    run_train_teacher(
        params, Path(train.path), Path(validation.path), Path(test.path), Path(teacher.path), Path(scores.path),
        scratch / "metrics.json", scratch / "curve.csv",
    )
    log_json_metrics(metrics, scratch / "metrics.json")


def generate_pairs(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    train: Input[Dataset],
    catalog: Input[Dataset],
    pairs: Output[Dataset],
) -> List[int]:
    """Write judged and generated pairs to label; return the shard numbers to fan out over."""
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_generate_pairs

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    run_generate_pairs(params, Path(train.path), Path(catalog.path), Path(pairs.path))
    return list(range(params.augment.num_shards))


def label_shard(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    run_key: str,
    shard: int,
    pairs: Input[Dataset],
    teacher: Input[Model],
    labeled: Output[Dataset],
) -> None:
    """Label one shard of the pairs with the teacher; the parent run is found by `run_key`."""
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_label_shard

    params = stage_params(params_yaml, profile, tracking_uri, "", run_key)
    run_label_shard(params, Path(pairs.path), Path(teacher.path), shard, Path(labeled.path))


def merge_labels(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    shards: Input[List[Dataset]],
    labeled: Output[Dataset],
) -> None:
    """Join the labeled shards into one table."""
    from pathlib import Path

    from crossrank.kfp_support import stage_params
    from crossrank.stages import run_merge_labels

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    run_merge_labels(params, [Path(shard.path) for shard in shards], Path(labeled.path))


def distill_student(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    labeled: Input[Dataset],
    teacher: Input[Model],
    validation: Input[Dataset],
    test: Input[Dataset],
    student: Output[Model],
    scores: Output[Dataset],
    metrics: Output[Metrics],
) -> None:
    """Train the student with margin-MSE on the teacher's logits and score the test split."""
    import tempfile
    from pathlib import Path

    from crossrank.kfp_support import log_json_metrics, stage_params
    from crossrank.stages import run_distill_student

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    scratch = Path(tempfile.mkdtemp())
    run_distill_student(
        params, Path(labeled.path), Path(validation.path), Path(test.path), Path(student.path), Path(scores.path),
        scratch / "metrics.json", scratch / "curve.csv", Path(teacher.path),
    )
    log_json_metrics(metrics, scratch / "metrics.json")


def evaluate_models(
    params_yaml: str,
    profile: str,
    tracking_uri: str,
    parent_run_id: str,
    test: Input[Dataset],
    bm25_scores: Input[Dataset],
    teacher_scores: Input[Dataset],
    student_scores: Input[Dataset],
    results: Output[Markdown],
    metrics: Output[Metrics],
    metrics_dir: Output[Dataset],
) -> None:
    """Evaluate random order, BM25, teacher and student on the test split."""
    from pathlib import Path

    from crossrank.kfp_support import log_json_metrics, stage_params
    from crossrank.stages import run_evaluate

    params = stage_params(params_yaml, profile, tracking_uri, parent_run_id)
    folder = Path(metrics_dir.path)
    score_files = {
        "bm25": (Path(bm25_scores.path), False),
        "teacher": (Path(teacher_scores.path), True),
        "student": (Path(student_scores.path), True),
    }
    run_evaluate(params, Path(test.path), score_files, folder, Path(results.path))
    for model in ("random", *score_files):
        log_json_metrics(metrics, folder / f"{model}.json", prefix=f"{model}.")
