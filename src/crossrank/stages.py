"""Stage functions: read inputs, run one step of the pipeline, write outputs, log to MLflow.

The command line (and so `dvc.yaml`), the KFP components and the tests call these
functions with explicit paths; none of them reads `params.yaml` or parses arguments.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossrank import schema
from crossrank.bm25 import BM25Index, build_catalog
from crossrank.config import Params
from crossrank.errors import ConfigError, DataError
from crossrank.evaluation import evaluate_scores, random_baseline, results_table
from crossrank.ingest import ingest
from crossrank.split import SPLITS, split
from crossrank.tracking import stage_run
from crossrank.validate import validate, write_outputs

logger = logging.getLogger(__name__)


def read_table(path: Path) -> pd.DataFrame:
    """Read a Parquet table written by an earlier stage, or name the stage that writes it."""
    if not path.is_file():
        raise DataError(
            f"input table not found: {path}. Run the stage that writes it first "
            "(`dvc repro` runs every stage in order)."
        )
    return pd.read_parquet(path)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as Parquet, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def write_json(values: dict[str, Any], path: Path) -> None:
    """Write a JSON document with sorted keys, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_ingest(params: Params, out: Path, root: Path = Path(".")) -> pd.DataFrame:
    """Read the raw judgments with the configured adapter into the canonical table."""
    with stage_run("ingest", params.tracking, params.profile, params.data.model_dump(), root) as run:
        started = time.perf_counter()
        frame = ingest(params.data, root)
        write_table(frame, out)

        run.log_metrics(
            {
                "num_judgments": len(frame),
                "num_queries": frame[schema.QUERY_ID].nunique(),
                "num_items": frame[schema.ITEM_ID].nunique(),
                "duration_s": time.perf_counter() - started,
            }
        )
    return frame


def run_validate(
    params: Params,
    judgments: Path,
    clean: Path,
    quarantine: Path,
    summary: Path,
    metrics: Path,
    root: Path = Path("."),
) -> dict[str, Any]:
    """Run the expectation suite; write clean rows, quarantined rows and the summary.

    `summary` gets every expectation's result; `metrics` gets the row counts only,
    for `dvc metrics show`.

    Raises DataError when the bad fraction is above validate.max_bad_fraction; the
    quarantine file is written first, and the MLflow run is marked failed.
    """
    config = params.validate_
    with stage_run("validate", params.tracking, params.profile, config.model_dump(), root) as run:
        frame = read_table(judgments)
        result = validate(frame, config, quarantine_path=quarantine)
        write_outputs(result, clean, quarantine, summary)

        counts = {key: result.summary[key] for key in ("num_rows", "num_clean", "num_quarantined", "bad_fraction")}
        write_json(counts, metrics)
        run.log_metrics(counts)
        run.log_artifact(summary)
        if len(result.quarantine):
            run.log_artifact(quarantine)
    return result.summary


def run_split(params: Params, clean: Path, splits_dir: Path, catalog: Path, root: Path = Path(".")) -> None:
    """Split clean judgments by query and write the catalog of every judged item."""
    with stage_run("split", params.tracking, params.profile, params.split.model_dump(), root) as run:
        frame = read_table(clean)
        parts = split(frame, params.split)
        for name, part in parts.items():
            write_table(part, splits_dir / f"{name}.parquet")
        write_table(build_catalog(frame), catalog)

        run.log_metrics(
            {
                f"{name}.{key}": value
                for name, part in parts.items()
                for key, value in (("num_judgments", len(part)), ("num_queries", part[schema.QUERY_ID].nunique()))
            }
        )


def run_bm25(params: Params, test: Path, catalog: Path, out: Path, root: Path = Path(".")) -> None:
    """Score each test judgment with BM25 over the whole catalog's product text."""
    with stage_run("bm25", params.tracking, params.profile, params.bm25.model_dump(), root) as run:
        started = time.perf_counter()
        frame = read_table(test)
        index = BM25Index(read_table(catalog), params.bm25)
        frame["bm25_score"] = index.score_pairs(frame[schema.QUERY], frame[schema.ITEM_ID])
        write_table(frame[[schema.QUERY_ID, schema.ITEM_ID, "bm25_score"]], out)

        run.log_metrics({"num_pairs": len(frame), "duration_s": time.perf_counter() - started})


def _attach_scores(test: pd.DataFrame, model: str, path: Path) -> pd.DataFrame:
    scores = read_table(path)
    column = f"{model}_score"
    if column not in scores.columns:
        raise DataError(f"{path} has no column {column!r}; re-run the stage that writes it")
    merged = test.merge(scores[[schema.QUERY_ID, schema.ITEM_ID, column]], on=[schema.QUERY_ID, schema.ITEM_ID], how="left")
    if merged[column].isna().any():
        num_missing = int(merged[column].isna().sum())
        raise DataError(
            f"{path} lacks scores for {num_missing} test judgments; re-run the stage that writes it "
            "on the current test split"
        )
    return merged


def run_evaluate(
    params: Params,
    test: Path,
    score_files: dict[str, tuple[Path, bool]],
    metrics_dir: Path,
    report: Path,
    root: Path = Path("."),
) -> dict[str, dict[str, Any]]:
    """Evaluate every model's test scores and a random order; write metrics and a table.

    `score_files` maps a model name to (Parquet file with `<model>_score`, whether the
    scores are calibrated probabilities). Each model's metrics go to
    `metrics_dir/<model>.json`; the Markdown results table goes to `report`.
    """
    with stage_run("evaluate", params.tracking, params.profile, params.evaluate.model_dump(), root) as run:
        frame = read_table(test)
        rows: dict[str, dict[str, Any]] = {"random": random_baseline(frame, params.evaluate)}
        for model, (path, calibrated) in score_files.items():
            scored = _attach_scores(frame, model, path)
            rows[model] = evaluate_scores(scored, f"{model}_score", params.evaluate, calibrated=calibrated)

        for model, metrics in rows.items():
            write_json(metrics, metrics_dir / f"{model}.json")
            run.log_metrics(metrics, prefix=f"{model}.")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(results_table(rows) + "\n", encoding="utf-8")
        run.log_artifact(report)
    return rows


def _write_curve(result: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(path, index=False)


def _score_test(checkpoint: Path, test: Path, model: str, out: Path) -> None:
    from crossrank.models import CrossEncoder, sigmoid

    encoder = CrossEncoder.load(checkpoint)
    frame = read_table(test)
    logits = encoder.predict_logits(frame[schema.QUERY].tolist(), frame.to_dict("records"), progress=True)
    scores = frame[[schema.QUERY_ID, schema.ITEM_ID]].assign(**{f"{model}_logit": logits, f"{model}_score": sigmoid(logits)})
    write_table(scores, out)


def run_train_teacher(
    params: Params,
    train: Path,
    validation: Path,
    test: Path,
    checkpoint: Path,
    scores: Path,
    metrics: Path,
    curve: Path,
    root: Path = Path("."),
) -> dict[str, Any]:
    """Fine-tune the teacher, then score the test split with its best checkpoint."""
    from crossrank.training import train_teacher

    with stage_run("train_teacher", params.tracking, params.profile, params.teacher.model_dump(), root) as run:
        result = train_teacher(
            read_table(train), read_table(validation), params.teacher, params.evaluate, checkpoint, run
        )
        summary = result.summary()
        write_json(summary, metrics)
        _write_curve(result, curve)
        _score_test(checkpoint, test, "teacher", scores)

        run.log_metrics(summary)
        run.log_artifact(curve)
    return summary


def _log_labeled(run: Any, labeled: pd.DataFrame, started: float) -> None:
    from crossrank.labeling import ORIGIN

    counts = labeled[ORIGIN].value_counts().to_dict()
    run.log_metrics(
        {
            "num_pairs": len(labeled),
            **{f"num_{origin}": count for origin, count in counts.items()},
            "mean_teacher_score": float(labeled["teacher_score"].mean()),
            "duration_s": time.perf_counter() - started,
        }
    )


def run_label_augmented(
    params: Params,
    train: Path,
    catalog: Path,
    teacher: Path,
    shard_dir: Path,
    out: Path,
    root: Path = Path("."),
) -> pd.DataFrame:
    """Generate pairs for the training queries and label them, with the judged pairs, by the teacher.

    The output has the judged training pairs (`origin` "judged", with its label), all of
    them unless `augment.max_judged_queries` is set, and every generated pair (label
    NaN), each with `teacher_logit` and `teacher_score`.
    Shards are scored by parallel worker processes and resume after a crash.
    """
    from crossrank.labeling import label_pairs, pairs_to_label

    with stage_run("label_augmented", params.tracking, params.profile, params.augment.model_dump(), root) as run:
        started = time.perf_counter()
        pairs = pairs_to_label(read_table(train), read_table(catalog), params.augment, params.bm25)
        labeled = label_pairs(pairs, teacher, shard_dir, params.augment)
        write_table(labeled, out)
        _log_labeled(run, labeled, started)
    return labeled


def run_generate_pairs(params: Params, train: Path, catalog: Path, out: Path, root: Path = Path(".")) -> int:
    """Write the judged and generated pairs that the teacher will label; return their count."""
    from crossrank.labeling import pairs_to_label

    with stage_run("generate_pairs", params.tracking, params.profile, params.augment.model_dump(), root) as run:
        pairs = pairs_to_label(read_table(train), read_table(catalog), params.augment, params.bm25)
        write_table(pairs, out)
        run.log_metrics({"num_pairs": len(pairs)})
    return len(pairs)


def run_label_shard(params: Params, pairs: Path, teacher: Path, shard: int, out: Path, root: Path = Path(".")) -> None:
    """Label one shard of the pairs with the teacher (one task of a fan-out)."""
    from crossrank.labeling import label_shard

    config = params.augment
    with stage_run(f"label_shard_{shard}", params.tracking, params.profile, {"shard": shard}, root) as run:
        labeled = label_shard(read_table(pairs), teacher, shard, config.num_shards, config.batch_size)
        write_table(labeled, out)
        run.log_metrics({"num_pairs": len(labeled)})


def run_merge_labels(params: Params, shards: list[Path], out: Path, root: Path = Path(".")) -> pd.DataFrame:
    """Join labeled shards into one table, in the row order `label_pairs` gives."""
    from crossrank.labeling import SHARD_COLUMN

    with stage_run("label_augmented", params.tracking, params.profile, params.augment.model_dump(), root) as run:
        started = time.perf_counter()
        parts = sorted((read_table(path) for path in shards), key=lambda part: int(part[SHARD_COLUMN].iloc[0]) if len(part) else -1)
        labeled = pd.concat(parts, ignore_index=True)
        write_table(labeled, out)
        _log_labeled(run, labeled, started)
    return labeled


def run_distill_student(
    params: Params,
    pairs: Path,
    validation: Path,
    test: Path,
    checkpoint: Path,
    scores: Path,
    metrics: Path,
    curve: Path,
    teacher: Path | None = None,
    root: Path = Path("."),
) -> dict[str, Any]:
    """Distill the student from the teacher-labeled pairs, then score the test split.

    With `student.init_from_teacher`, the student starts from the `teacher` checkpoint
    cut to its first `num_layers` layers (with its pooler and head) instead of the backbone.
    """
    from crossrank.labeling import ORIGIN
    from crossrank.training import distill_student

    config = params.student
    if config.init_from_teacher:
        if teacher is None:
            raise ConfigError(
                "student.init_from_teacher is true, but run_distill_student got no teacher checkpoint; "
                "pass the teacher folder or set student.init_from_teacher: false in params.yaml"
            )
        config = config.model_copy(update={"backbone": str(teacher)})
    with stage_run("distill_student", params.tracking, params.profile, config.model_dump(), root) as run:
        frame = read_table(pairs)
        if not config.use_augmented:
            frame = frame[frame[ORIGIN] == "judged"].reset_index(drop=True)
        result = distill_student(frame, read_table(validation), config, params.evaluate, checkpoint, run)
        summary = result.summary()
        write_json(summary, metrics)
        _write_curve(result, curve)
        _score_test(checkpoint, test, "student", scores)

        run.log_metrics(summary)
        run.log_artifact(curve)
    return summary


def _reference(bundle_scores: Any, test: pd.DataFrame, teacher_scores: pd.DataFrame, spec: Any, model_version: str) -> dict[str, Any]:
    teacher = test.merge(teacher_scores, on=[schema.QUERY_ID, schema.ITEM_ID], how="left")["teacher_score"]
    missing = (test[list(spec.attributes)].astype(str) == "").sum(axis=1)
    return {
        "model_version": model_version,
        "scores": [float(v) for v in bundle_scores],
        "teacher_scores": [float(v) for v in teacher.fillna(0.0)],
        "query_num_tokens": [len(q.split()) for q in test[schema.QUERY]],
        "num_missing_attributes": [int(v) for v in missing],
    }


def _latency_p50_ms(bundle: Any, test: pd.DataFrame, num_runs: int) -> float:
    # One request of 100 candidates for one real query: the serving shape.
    query = str(test[schema.QUERY].iloc[0])
    products = (test.to_dict("records") * (100 // max(len(test), 1) + 1))[:100]
    bundle.score([query] * 100, products)  # warm-up
    timings = []
    for _ in range(num_runs):
        started = time.perf_counter()
        bundle.score([query] * 100, products)
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings))


def run_gate_export(
    params: Params,
    student: Path,
    validation: Path,
    test: Path,
    teacher_scores: Path,
    metrics_dir: Path,
    bundle_out: Path,
    decision_out: Path,
    model_card_out: Path,
    root: Path = Path("."),
) -> str:
    """Export the student to ONNX, measure every gate check, write the bundle and the decision.

    The bundle is written whatever the verdict, so a rejected student can be
    inspected; `decision_out` says whether it may ship. Returns "accept" or "reject".
    """
    import shutil
    import tempfile

    from crossrank.bundle import load_bundle
    from crossrank.evaluation import evaluate_scores
    from crossrank.export import check_parity, export_onnx, optimize_onnx, quantize_int8, ranking_agreement, write_bundle
    from crossrank.gate import decide
    from crossrank.model_card import render_model_card
    from crossrank.tracking import data_version, git_commit

    config = params.gate
    with stage_run("gate_export", params.tracking, params.profile, config.model_dump(), root) as run:
        work = Path(tempfile.mkdtemp(prefix="crossrank-export-"))
        test_frame = read_table(test)
        queries, products = test_frame[schema.QUERY].tolist(), test_frame.to_dict("records")

        # Export and parity on real validation pairs, in one batch with mixed padding.
        sample = read_table(validation).head(64)
        graph = export_onnx(student, work / "model.fp32.onnx")
        parity = [check_parity(student, graph, sample[schema.QUERY].tolist(), sample.to_dict("records"))["max_abs_diff"]]
        if config.optimize:
            # int8 quantizes the attention projections, so they stay unfused MatMuls.
            graph = optimize_onnx(graph, work / "model.optimized.onnx", fuse_attention=config.precision != "int8")
            parity.append(check_parity(student, graph, sample[schema.QUERY].tolist(), sample.to_dict("records"))["max_abs_diff"])

        # fp32 scores of the test split, then the int8 graph against them.
        fp32_bundle = load_bundle(write_bundle(graph, student, work / "fp32", config.registered_model))
        fp32_scores = fp32_bundle.score(queries, products)
        final_graph, int8_drop, int8_agreement = graph, None, None
        if config.precision == "int8":
            final_graph = quantize_int8(graph, work / "model.int8.onnx")
            int8_scores = load_bundle(write_bundle(final_graph, student, work / "int8", config.registered_model)).score(queries, products)
            ndcg = {
                name: evaluate_scores(test_frame.assign(s=scores), "s", params.evaluate, calibrated=True)["all"]["ndcg@10"]
                for name, scores in (("fp32", fp32_scores), ("int8", int8_scores))
            }
            int8_drop = (ndcg["fp32"] - ndcg["int8"]) / ndcg["fp32"]
            int8_agreement = ranking_agreement(fp32_scores, int8_scores, test_frame[schema.QUERY_ID].tolist())

        # The shipped graph: latency, reference scores, then the decision.
        candidate = load_bundle(write_bundle(final_graph, student, work / "final", config.registered_model))
        latency = _latency_p50_ms(candidate, test_frame, config.num_latency_runs)
        results = {model: json.loads((metrics_dir / f"{model}.json").read_text(encoding="utf-8")) for model in ("random", "bm25", "teacher", "student")}
        decision = decide(results, max(parity), int8_drop, int8_agreement, latency, config).to_dict()
        model_version = candidate.config.model_version
        reference = _reference(candidate.score(queries, products), test_frame, read_table(teacher_scores), candidate.builder.spec, model_version)

        # The bundle with its metrics, reference and versions, and the model card.
        versions = {"data_version": data_version(root), "code_version": git_commit(root)}
        if bundle_out.exists():
            shutil.rmtree(bundle_out)
        write_bundle(
            final_graph,
            student,
            bundle_out,
            config.registered_model,
            model_version=model_version,
            extra_files={
                "metrics.json": {"results": results, "gate": decision},
                "reference.json": reference,
                "versions.json": {**versions, "params": params.model_dump(mode="json", by_alias=True)},
            },
        )
        write_json(decision, decision_out)
        card = render_model_card(
            config.registered_model,
            model_version,
            results,
            decision,
            {"profile": params.profile, "adapter": params.data.adapter, "num_test_pairs": len(test_frame)},
            versions,
        )
        model_card_out.parent.mkdir(parents=True, exist_ok=True)
        model_card_out.write_text(card, encoding="utf-8")
        shutil.rmtree(work, ignore_errors=True)

        run.log_metrics({name: check["value"] for name, check in decision["checks"].items() if check["value"] is not None})
        run.log_dict(decision, "gate_decision.json")
        run.log_artifact(model_card_out)
        run.log_artifact(bundle_out / "reference.json", "reference")
        mlflow_tags = {"crossrank.gate_verdict": decision["verdict"], "crossrank.model_version": model_version}
        import mlflow

        mlflow.set_tags(mlflow_tags)
    return decision["verdict"]


def run_register(
    params: Params, bundle: Path, accepted: bool | Path, model_card: Path, out: Path, root: Path = Path(".")
) -> dict[str, Any]:
    """Register the bundle as a new model version; move `champion` only when accepted.

    `accepted` is the verdict itself or the path of the gate's decision file.
    """
    from crossrank.bundle import load_bundle
    from crossrank.tracking import register_bundle

    if isinstance(accepted, Path):
        accepted = json.loads(accepted.read_text(encoding="utf-8"))["verdict"] == "accept"
    loaded = load_bundle(bundle)
    with stage_run("register", params.tracking, params.profile, {"registered_model": params.gate.registered_model}, root) as run:
        registered = register_bundle(
            run,
            bundle,
            params.gate.registered_model,
            accepted,
            model_card.read_text(encoding="utf-8"),
            tags={"model_version": loaded.config.model_version, "gate_verdict": "accept" if accepted else "reject"},
        )
        run.log_artifact(model_card)
        write_json(registered, out)
    return registered


def run_build_serving_stores(
    params: Params, catalog: Path, judgments: Path, bundle: Path, token_store: Path, score_cache: Path, root: Path = Path(".")
) -> dict[str, Any]:
    """Build or refresh the item token store and the head-query score cache for a bundle.

    The token store keeps each catalog item's token ids, so a request of item ids
    tokenizes only the query; a refresh tokenizes only new or changed items. The
    score cache holds the bundle's scores for the judged items of head queries.
    """
    from dataclasses import asdict

    from crossrank.serving.score_cache import build_score_cache
    from crossrank.serving.token_store import build_token_store

    config = params.serving
    with stage_run("build_serving_stores", params.tracking, params.profile, config.model_dump(), root) as run:
        tokens = asdict(build_token_store(read_table(catalog), bundle, token_store))
        cache = asdict(
            build_score_cache(
                read_table(judgments), bundle, score_cache, config.query_log or None, config.num_cached_queries
            )
        )
        stats = {"token_store": tokens, "score_cache": cache}
        run.log_metrics(stats)
    return stats


__all__ = [
    "SPLITS",
    "run_bm25",
    "run_distill_student",
    "run_evaluate",
    "run_gate_export",
    "run_register",
    "run_ingest",
    "run_label_augmented",
    "run_split",
    "run_train_teacher",
    "run_validate",
]
