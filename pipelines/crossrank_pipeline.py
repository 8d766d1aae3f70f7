"""The crossrank KFP v2 pipeline: validated data to a gated, registered, deployed student.

It chains the same stage functions as `dvc.yaml`. Teacher labeling fans out over
shards with `dsl.ParallelFor`; registration and deployment run only inside
`dsl.If(verdict == "accept")`. Every component logs to the MLflow tracking URI
given as a pipeline parameter, under one parent run opened by the first task and
closed by an exit handler with the pipeline's final status.
"""


from kfp import dsl

from components import DEFAULT_IMAGE, build_components

PIPELINE_NAME = "crossrank"


def build_pipeline(image: str = DEFAULT_IMAGE):
    """Return the pipeline function with every component running in `image`."""
    c = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distill, gate, register and deploy a cross-encoder re-ranker.")
    def crossrank_pipeline(
        params_yaml: str,
        data_path: str,
        profile: str = "",
        tracking_uri: str = "",
        run_name: str = "kfp-pipeline",
        run_key: str = "",
        namespace: str = "crossrank",
        storage_uri: str = "",
    ) -> None:
        common = {"params_yaml": params_yaml, "profile": profile, "tracking_uri": tracking_uri}
        finish = c.finish_tracking(run_key=run_key, **common)

        with dsl.ExitHandler(finish):
            start = c.start_tracking(run_name=run_name, run_key=run_key, **common)
            common["parent_run_id"] = start.outputs["parent_run_id"]

            ingest = c.ingest_data(data_path=data_path, **common)
            validate = c.validate_data(judgments=ingest.outputs["judgments"], **common)
            split = c.split_data(clean=validate.outputs["clean"], **common)
            bm25 = c.score_bm25(test=split.outputs["test"], catalog=split.outputs["catalog"], **common)

            teacher = c.train_teacher(
                train=split.outputs["train"], validation=split.outputs["validation"], test=split.outputs["test"], **common
            )
            pairs = c.generate_pairs(train=split.outputs["train"], catalog=split.outputs["catalog"], **common)
            with dsl.ParallelFor(items=pairs.outputs["Output"], parallelism=4) as shard:
                # Only pipeline inputs, no task output parameters, inside the loop (see stage_params).
                loop_common = {key: value for key, value in common.items() if key != "parent_run_id"}
                labeled_shard = c.label_shard(
                    shard=shard, pairs=pairs.outputs["pairs"], teacher=teacher.outputs["teacher"], run_key=run_key, **loop_common
                )
            labeled = c.merge_labels(shards=dsl.Collected(labeled_shard.outputs["labeled"]), **common)

            student = c.distill_student(
                labeled=labeled.outputs["labeled"],
                teacher=teacher.outputs["teacher"],
                validation=split.outputs["validation"],
                test=split.outputs["test"],
                **common,
            )
            evaluate = c.evaluate_models(
                test=split.outputs["test"],
                bm25_scores=bm25.outputs["scores"],
                teacher_scores=teacher.outputs["scores"],
                student_scores=student.outputs["scores"],
                **common,
            )
            gate = c.gate_and_export(
                student=student.outputs["student"],
                validation=split.outputs["validation"],
                test=split.outputs["test"],
                teacher_scores=teacher.outputs["scores"],
                metrics_dir=evaluate.outputs["metrics_dir"],
                **common,
            )
            with dsl.If(gate.outputs["Output"] == "accept", name="gate-accepted"):
                c.register_model(bundle=gate.outputs["bundle"], model_card=gate.outputs["model_card"], **common)
                c.deploy_model(bundle=gate.outputs["bundle"], namespace=namespace, storage_uri=storage_uri)

    return crossrank_pipeline
