import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crossrank import schema
from crossrank.config import StudentConfig, parse_params
from crossrank.errors import ConfigError
from crossrank.models import CrossEncoder
from crossrank.stages import run_distill_student
from crossrank.training import length_sorted_chunks, margin_groups, margin_mse, student_batches, student_loss


def test_margin_mse_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0, 2.0]])
    teacher = torch.tensor([[0.5, 0.5, 1.0]])
    mask = torch.ones(1, 3)
    # Pairs (0,1): (1-0) - (0.5-0.5) = 1 -> 1; (0,2): (1-2) - (0.5-1) = -0.5 -> 0.25;
    # (1,2): (0-2) - (0.5-1) = -1.5 -> 2.25. Mean over 3 pairs: 3.5 / 3.
    assert margin_mse(student, teacher, mask).item() == pytest.approx(3.5 / 3)


def test_margin_mse_ignores_masked_items() -> None:
    student = torch.tensor([[1.0, 0.0, 2.0], [3.0, 3.0, 0.0]])
    teacher = torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # Group 1 keeps pair (0,1): 1 -> 1. Group 2 keeps pair (0,1): (3-3) - (1-0) = -1 -> 1.
    assert margin_mse(student, teacher, mask).item() == pytest.approx(1.0)


def test_margin_mse_zero_for_shifted_scores() -> None:
    teacher = torch.tensor([[0.2, -1.0, 3.0, 0.7]])
    student = teacher + 5.0
    assert margin_mse(student, teacher, torch.ones(1, 4)).item() == pytest.approx(0.0)


def test_margin_mse_gradient_flows() -> None:
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = margin_mse(student, torch.tensor([[0.0, 0.0]]), torch.ones(1, 2))
    loss.backward()
    # d/ds0 of (s0 - s1)^2 = 2 (s0 - s1) = 2; d/ds1 = -2.
    assert student.grad.tolist() == [[2.0, -2.0]]


def test_init_from_teacher_needs_teacher(tmp_path: Path) -> None:
    params = parse_params("student:\n  init_from_teacher: true\n")
    message = "student.init_from_teacher is true, but run_distill_student got no teacher checkpoint"
    with pytest.raises(ConfigError, match=re.escape(message)):
        names = ("pairs", "validation", "test", "student", "scores", "metrics", "curve")
        run_distill_student(params, *(tmp_path / name for name in names))


def test_length_sorted_chunks() -> None:
    lengths = np.array([5, 1, 3, 2, 4])
    assert [chunk.tolist() for chunk in length_sorted_chunks(lengths, 2)] == [[1, 3], [2, 4], [0]]
    assert [chunk.tolist() for chunk in length_sorted_chunks(lengths, None)] == [[0, 1, 2, 3, 4]]


def test_margin_groups_skip_single_item_queries() -> None:
    groups = margin_groups(np.array(["q1", "q2", "q1", "q3", "q3", "q1"]))
    assert sorted(group.tolist() for group in groups) == [[0, 2, 5], [3, 4]]


def test_chunked_forward_matches_one_pass(checkpoint: Path, judgments: pd.DataFrame) -> None:
    """Length-sorted chunks change the padding, not the loss or its gradient."""
    encoder = CrossEncoder.load(checkpoint)
    encoder.model.eval()  # no dropout, so both passes see the same network
    encoded = encoder.builder.encode_pairs(judgments[schema.QUERY].tolist(), judgments.to_dict("records"))
    labels = judgments[schema.LABEL].to_numpy(dtype=np.float32)
    teacher = labels * 4.0 - 2.0
    groups = margin_groups(judgments[schema.QUERY_ID].to_numpy())

    def loss_and_gradient(chunk_size: int | None) -> tuple[float, torch.Tensor]:
        config = StudentConfig(queries_per_batch=6, items_per_query=5, forward_chunk_size=chunk_size)
        batch = next(iter(student_batches(encoder, encoded, teacher, labels, groups, config, epoch=0)))
        encoder.model.zero_grad()
        loss = student_loss(encoder, batch, bce_weight=0.5)
        loss.backward()
        return float(loss.detach()), encoder.model.classifier.weight.grad.clone()

    one_pass, one_pass_gradient = loss_and_gradient(None)
    chunked, chunked_gradient = loss_and_gradient(4)
    # Different padding changes the summation order, so with two threads gradients near
    # 0.5 differed by 1e-4. A wrong mapping back to the items moves them by about 2.
    assert chunked == pytest.approx(one_pass, rel=1e-4)
    torch.testing.assert_close(chunked_gradient, one_pass_gradient, rtol=1e-3, atol=1e-3)
