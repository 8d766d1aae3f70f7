import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crossrank import schema, training
from crossrank.config import EvaluateConfig, StudentConfig, parse_params
from crossrank.errors import ConfigError
from crossrank.models import CrossEncoder
from crossrank.stages import run_distill_student
from crossrank.training import (
    WeightAverage,
    length_sorted_chunks,
    margin_groups,
    margin_mse,
    student_batches,
    student_loss,
    train_loop,
)


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


def test_weight_average_by_hand() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(11.0)
    average.update(model)  # d_1 = min(0.5, 2 / 11): 0 + (11 - 0) * 9 / 11 = 9
    with torch.no_grad():
        model.weight.fill_(13.0)
    average.update(model)  # d_2 = min(0.5, 3 / 12) = 0.25: 9 + (13 - 9) * 0.75 = 12
    assert average.shadow["weight"].item() == pytest.approx(12.0)
    with average.applied(model):
        assert model.weight.item() == pytest.approx(12.0)
    assert model.weight.item() == 13.0  # the trained weights come back after the block


def test_train_loop_saves_averaged_weights(
    tmp_path: Path, judgments: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ema_decay, each checkpoint contains the average of the weights after every step."""
    config = StudentConfig(
        num_layers=1, max_steps=3, eval_every_steps=1, learning_rate=1e-2, warmup_ratio=0.0, ema_decay=0.5
    )
    encoder = CrossEncoder.from_backbone(config.backbone, config.input, config.num_layers)
    encoded = encoder.builder.encode_pairs(judgments[schema.QUERY].tolist(), judgments.to_dict("records"))
    labels = judgments[schema.LABEL].to_numpy(dtype=np.float32)
    groups = margin_groups(judgments[schema.QUERY_ID].to_numpy())
    seen: list[torch.Tensor] = []  # classifier weights before each step

    def loss_of(model: CrossEncoder, batch: dict) -> torch.Tensor:
        seen.append(model.model.classifier.weight.detach().clone())
        return student_loss(model, batch, bce_weight=1.0)

    # Each evaluation scores better than the last, so every one writes a checkpoint.
    rising = iter(range(100))
    monkeypatch.setattr(training, "validation_ndcg", lambda *args: float(next(rising)))

    def batches(epoch: int) -> Iterator[dict]:
        return student_batches(encoder, encoded, labels, labels, groups, config, epoch)

    train_loop(encoder, batches, loss_of, 3, judgments, config, EvaluateConfig(), tmp_path, None, "student")

    trained = [*seen[1:], encoder.model.classifier.weight.detach()]
    expected = seen[0]
    for update, weights in enumerate(trained, start=1):
        decay = min(0.5, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay) * weights
    saved = CrossEncoder.load(tmp_path).model.classifier.weight.detach()
    torch.testing.assert_close(saved, expected)
    assert not torch.allclose(saved, trained[-1])  # the average, not the last trained weights
