"""Offline gate: decide from measured evidence whether a student may ship.

Each check compares one measured value with a threshold from `params.yaml` and
records value, threshold and verdict. The student ships ("accept") only when every
check passes; otherwise the decision is "reject" and later stages read it instead of
failing the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from crossrank.config import GateConfig

logger = logging.getLogger(__name__)

Verdict = Literal["accept", "reject"]


@dataclass(frozen=True)
class Check:
    """One gate check: the measured value, its threshold and whether it passed."""

    name: str
    value: float | None
    threshold: float
    comparison: Literal[">=", "<="]
    passed: bool
    note: str = ""


@dataclass
class GateDecision:
    """The verdict with every check behind it."""

    verdict: Verdict
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: verdict, failed check names and every check."""
        return {
            "verdict": self.verdict,
            "failed": [check.name for check in self.checks if not check.passed],
            "checks": {check.name: asdict(check) for check in self.checks},
        }


def gain_share(student: float, teacher: float, baseline: float) -> float | None:
    """Return (student - baseline) / (teacher - baseline), the share of the teacher's gain kept.

    None when the teacher does not beat the baseline, because a share of no gain is
    undefined (and such a teacher is itself a reason to reject).
    """
    gain = teacher - baseline
    if gain <= 0:
        return None
    return (student - baseline) / gain


def _at_least(name: str, value: float | None, threshold: float, note: str = "") -> Check:
    passed = value is not None and value >= threshold
    return Check(name, value, threshold, ">=", passed, note)


def _at_most(name: str, value: float | None, threshold: float, note: str = "") -> Check:
    passed = value is not None and value <= threshold
    return Check(name, value, threshold, "<=", passed, note)


def decide(
    metrics: dict[str, dict[str, Any]],
    parity_max_abs_diff: float,
    int8_ndcg_change: float | None,
    int8_ranking_agreement: float | None,
    latency_p50_ms: float,
    config: GateConfig,
) -> GateDecision:
    """Run every check and return the decision.

    `metrics` maps "bm25", "teacher" and "student" to their evaluation results
    (`metrics[model]["all"]["ndcg@10"]` and `["pairwise_accuracy"]`). The int8
    values are None when the bundle ships fp32; their checks then pass with a note.
    """
    overall = {model: metrics[model]["all"] for model in ("bm25", "teacher", "student")}
    checks = []
    for metric, threshold in (("ndcg@10", config.min_ndcg_gain_share), ("pairwise_accuracy", config.min_pairwise_gain_share)):
        share = gain_share(overall["student"][metric], overall["teacher"][metric], overall["bm25"][metric])
        note = "" if share is not None else "the teacher does not beat BM25"
        checks.append(_at_least(f"student_{metric}_gain_share", share, threshold, note))

    checks.append(_at_most("onnx_parity_max_abs_diff", parity_max_abs_diff, config.max_parity_abs_diff))
    if int8_ndcg_change is None:
        checks.append(Check("int8_ndcg@10_relative_drop", None, config.max_int8_ndcg_drop, "<=", True, "fp32 bundle"))
        checks.append(Check("int8_ranking_agreement", None, config.min_int8_ranking_agreement, ">=", True, "fp32 bundle"))
    else:
        checks.append(_at_most("int8_ndcg@10_relative_drop", int8_ndcg_change, config.max_int8_ndcg_drop))
        checks.append(_at_least("int8_ranking_agreement", int8_ranking_agreement, config.min_int8_ranking_agreement))
    checks.append(_at_most("latency_p50_ms_100_candidates", latency_p50_ms, config.max_latency_p50_ms))

    verdict: Verdict = "accept" if all(check.passed for check in checks) else "reject"
    decision = GateDecision(verdict, checks)
    failed = decision.to_dict()["failed"]
    logger.info("gate verdict: %s%s", verdict, f" (failed: {', '.join(failed)})" if failed else "")
    return decision
