import pytest

from crossrank.config import GateConfig
from crossrank.gate import decide, gain_share


def results(student_ndcg: float, student_pairwise: float) -> dict:
    return {
        "bm25": {"all": {"ndcg@10": 0.90, "pairwise_accuracy": 0.55}},
        "teacher": {"all": {"ndcg@10": 0.94, "pairwise_accuracy": 0.65}},
        "student": {"all": {"ndcg@10": student_ndcg, "pairwise_accuracy": student_pairwise}},
    }


def test_gain_share_by_hand() -> None:
    # (0.93 - 0.90) / (0.94 - 0.90) = 0.75
    assert gain_share(0.93, 0.94, 0.90) == pytest.approx(0.75)


def test_gain_share_undefined_without_teacher_gain() -> None:
    assert gain_share(0.93, 0.90, 0.90) is None


def test_accepting_gate() -> None:
    decision = decide(results(0.94, 0.645), 2e-5, 0.001, 0.99, 20.0, GateConfig()).to_dict()
    assert decision["verdict"] == "accept"
    assert decision["failed"] == []
    assert decision["checks"]["student_ndcg@10_gain_share"]["value"] == pytest.approx(1.0)
    assert decision["checks"]["student_pairwise_accuracy_gain_share"]["value"] == pytest.approx(0.95)


def test_rejecting_gate_names_failed_checks() -> None:
    decision = decide(results(0.92, 0.645), 5e-4, 0.02, 0.99, 500.0, GateConfig()).to_dict()
    assert decision["verdict"] == "reject"
    assert decision["failed"] == [
        "student_ndcg@10_gain_share",
        "onnx_parity_max_abs_diff",
        "int8_ndcg@10_relative_drop",
        "latency_p50_ms_100_candidates",
    ]
    check = decision["checks"]["latency_p50_ms_100_candidates"]
    assert (check["value"], check["threshold"], check["comparison"], check["passed"]) == (500.0, 100.0, "<=", False)


def test_teacher_without_gain_rejects() -> None:
    flat = results(0.95, 0.70)
    flat["teacher"]["all"]["ndcg@10"] = 0.89
    decision = decide(flat, 1e-5, None, None, 10.0, GateConfig()).to_dict()
    assert decision["verdict"] == "reject"
    assert decision["checks"]["student_ndcg@10_gain_share"]["note"] == "the teacher does not beat BM25"


def test_fp32_bundle_skips_int8_checks() -> None:
    decision = decide(results(0.94, 0.65), 1e-5, None, None, 10.0, GateConfig(precision="fp32")).to_dict()
    assert decision["verdict"] == "accept"
    assert decision["checks"]["int8_ranking_agreement"]["note"] == "fp32 bundle"
