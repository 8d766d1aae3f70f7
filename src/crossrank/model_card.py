"""Model card: a Markdown page with data, metrics, gate results, intended use and limits."""

from __future__ import annotations

from typing import Any

from crossrank.evaluation import results_table


def _check_rows(gate: dict[str, Any]) -> list[str]:
    rows = ["| check | value | threshold | verdict |", "| --- | ---: | ---: | --- |"]
    for name, check in gate["checks"].items():
        value = "—" if check["value"] is None else f"{check['value']:.6g}"
        verdict = "pass" if check["passed"] else "FAIL"
        note = f" ({check['note']})" if check.get("note") else ""
        rows.append(f"| {name} | {value} | {check['comparison']} {check['threshold']:g} | {verdict}{note} |")
    return rows


def render_model_card(
    model_name: str,
    model_version: str,
    results: dict[str, dict[str, Any]],
    gate: dict[str, Any],
    data: dict[str, Any],
    versions: dict[str, str],
) -> str:
    """Render the model card of one bundle as Markdown."""
    lines = [
        f"# {model_name} {model_version}",
        "",
        f"Gate verdict: **{gate['verdict']}**.",
        "",
        "## Model",
        "",
        "A BERT cross-encoder student with one output logit; the relevance score is",
        "sigmoid(logit) in [0, 1]. It was distilled with margin-MSE from a larger teacher",
        "cross-encoder fine-tuned on human soft labels (irrelevant 0, partial 0.5, exact 1).",
        "Input: `[CLS] query [SEP] title [SEP] product_type [SEP] brand [SEP] color [SEP] gender [SEP]`.",
        "",
        "## Data",
        "",
        *[f"- {key}: {value}" for key, value in data.items()],
        *[f"- {key}: {value}" for key, value in versions.items()],
        "",
        "## Test metrics",
        "",
        results_table(results),
        "",
        "## Gate",
        "",
        *_check_rows(gate),
        "",
        "## Intended use",
        "",
        "Re-ranking a retrieved candidate list (tens to a few hundred products) for one",
        "query, as one feature of a downstream ranker such as a GBDT. The score orders",
        "products for a query; it is not a calibrated probability of purchase.",
        "",
        "## Limits",
        "",
        "- Trained on the judged catalog and queries above; new product types, brands or",
        "  languages may score poorly. English text only (uncased WordPiece vocabulary).",
        "- The student reads no description, so products whose title and attributes say",
        "  little are ranked on little evidence.",
        "- Queries longer than the input's query cap are truncated.",
        "- Watch the served score distribution for drift against this model's reference.",
    ]
    return "\n".join(lines) + "\n"
