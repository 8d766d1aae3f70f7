"""KFP v2 components: thin wrappers that call the stage functions of `crossrank.stages`.

`build_components(image)` turns the plain functions of this folder into components
that run in `image` (built from the repository's Dockerfile).
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components import data, models, release, tracking

DEFAULT_IMAGE = "ghcr.io/crossrank/crossrank:0.1.0"

_FUNCTIONS = (
    tracking.start_tracking,
    tracking.finish_tracking,
    data.ingest_data,
    data.validate_data,
    data.split_data,
    data.score_bm25,
    models.train_teacher,
    models.generate_pairs,
    models.label_shard,
    models.merge_labels,
    models.distill_student,
    models.evaluate_models,
    release.gate_and_export,
    release.register_model,
    release.deploy_model,
)


def build_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Return every component, keyed by function name, set to run in `image`."""
    return SimpleNamespace(**{function.__name__: dsl.component(function, base_image=image) for function in _FUNCTIONS})
