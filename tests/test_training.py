import re
from pathlib import Path

import pytest
import torch

from crossrank.config import parse_params
from crossrank.errors import ConfigError
from crossrank.stages import run_distill_student
from crossrank.training import margin_mse


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
