"""Teacher fine-tuning (soft-label BCE) and student distillation (margin-MSE).

Both share one loop: AdamW with linear warm-up and decay, evaluation of NDCG@10 on
validation queries every `eval_every_steps`, a checkpoint at each improvement and
early stopping after `patience` evaluations without one. With `ema_decay` set, the
evaluated and saved weights are an exponential moving average of the trained ones.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from crossrank import schema
from crossrank.config import EvaluateConfig, StudentConfig, TeacherConfig, TrainingConfig
from crossrank.errors import DataError
from crossrank.evaluation import evaluate_scores
from crossrank.ingest import sample_queries
from crossrank.models import CrossEncoder
from crossrank.tracking import StageRun

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def margin_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the margin-MSE loss over every item pair of each query group.

    For items i and j of one query, the loss term is
    ((s_i - s_j) - (t_i - t_j))^2, averaged over all pairs i < j whose items are both
    present (Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation").

    Args:
        student: student logits, shape (groups, items).
        teacher: teacher logits, shape (groups, items).
        mask: 1 where an item is present, shape (groups, items).
    """
    student_margins = student.unsqueeze(2) - student.unsqueeze(1)  # (groups, items, items)
    teacher_margins = teacher.unsqueeze(2) - teacher.unsqueeze(1)
    pair_mask = (mask.unsqueeze(2) * mask.unsqueeze(1)).triu(diagonal=1)
    squared = (student_margins - teacher_margins).pow(2) * pair_mask
    return squared.sum() / pair_mask.sum().clamp(min=1)


@dataclass
class TrainResult:
    """Outcome of a training run: the best checkpoint and the curves."""

    checkpoint: Path
    best_ndcg: float
    best_step: int
    num_steps: int
    duration_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def initial_loss(self) -> float:
        """Mean loss of the first ten steps."""
        return float(np.mean(self.losses[:10]))

    @property
    def final_loss(self) -> float:
        """Mean loss of the last ten steps."""
        return float(np.mean(self.losses[-10:]))

    def summary(self) -> dict[str, float | int]:
        """Return the numbers worth logging: best NDCG@10, steps, losses and duration."""
        return {
            "best_validation_ndcg@10": self.best_ndcg,
            "best_step": self.best_step,
            "num_steps": self.num_steps,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "duration_s": self.duration_s,
        }


class WeightAverage:
    """Exponential moving average of a model's trainable parameters.

    After update t the average moves towards the weights by 1 - d_t with
    d_t = min(decay, (1 + t) / (10 + t)), so early updates, when the average still
    contains the starting weights, weigh more. `applied` swaps the average into the
    model for evaluation or saving and restores the trained weights after.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average one step towards the model's current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        parameters = dict(model.named_parameters())
        for name, average in self.shadow.items():
            average.lerp_(parameters[name].detach(), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the averaged weights into `model` for the block, then restore the trained ones."""
        parameters = dict(model.named_parameters())
        trained = {name: parameters[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, average in self.shadow.items():
                parameters[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, weights in trained.items():
                    parameters[name].copy_(weights)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _validation_subset(validation: pd.DataFrame, config: TrainingConfig) -> pd.DataFrame:
    if config.max_validation_queries is None:
        return validation
    return sample_queries(validation, config.max_validation_queries)


def validation_ndcg(encoder: CrossEncoder, validation: pd.DataFrame, evaluate: EvaluateConfig) -> float:
    """Return NDCG@10 of the encoder's scores on the validation judgments."""
    products = validation.to_dict("records")
    scored = validation.assign(model_score=encoder.predict_logits(validation[schema.QUERY].tolist(), products))
    metrics = evaluate_scores(scored, "model_score", evaluate, calibrated=False)
    return float(metrics["all"]["ndcg@10"] or 0.0)


def train_loop(
    encoder: CrossEncoder,
    batches: Callable[[int], Iterator[Batch]],
    loss_of: Callable[[CrossEncoder, Batch], torch.Tensor],
    num_steps: int,
    validation: pd.DataFrame,
    config: TrainingConfig,
    evaluate: EvaluateConfig,
    out_dir: Path,
    run: StageRun | None,
    name: str,
) -> TrainResult:
    """Run the optimisation loop shared by teacher and student.

    `batches(epoch)` yields the batches of one epoch; `loss_of` turns a batch into a
    scalar loss. The best checkpoint by validation NDCG@10 is written to `out_dir`.
    """
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(
        encoder.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * num_steps), num_steps)
    history: list[dict[str, float]] = []
    losses: list[float] = []
    best_ndcg, best_step, evals_without_gain, step = -math.inf, 0, 0, 0
    smoothed_loss: float | None = None
    average = WeightAverage(encoder.model, config.ema_decay) if config.ema_decay else None

    def evaluate_and_checkpoint() -> bool:
        nonlocal best_ndcg, best_step, evals_without_gain
        # The averaged weights, when there are any, are both scored and saved.
        with average.applied(encoder.model) if average is not None else nullcontext():
            ndcg = validation_ndcg(encoder, validation, evaluate)
            history.append({"step": step, "loss": smoothed_loss or 0.0, "validation_ndcg@10": ndcg})
            if run is not None:
                run.log_metrics({"validation_ndcg@10": ndcg}, step=step)
            logger.info("%s step %d: loss %.4f, validation NDCG@10 %.4f", name, step, smoothed_loss or 0.0, ndcg)
            if ndcg > best_ndcg:
                best_ndcg, best_step, evals_without_gain = ndcg, step, 0
                encoder.save(out_dir, metadata={"step": step, "validation_ndcg@10": ndcg})
                return False
        evals_without_gain += 1
        return evals_without_gain >= config.patience

    encoder.model.train()
    progress = tqdm(total=num_steps, desc=f"train {name}", unit="step", mininterval=5)
    stop = evaluate_and_checkpoint()
    epoch = 0
    while not stop and step < num_steps:
        for batch in batches(epoch):
            loss = loss_of(encoder, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update(encoder.model)
            step += 1
            progress.update(1)

            value = float(loss.detach())
            losses.append(value)
            smoothed_loss = value if smoothed_loss is None else 0.95 * smoothed_loss + 0.05 * value
            if run is not None and step % 10 == 0:
                run.log_metrics({"train_loss": smoothed_loss}, step=step)
            if step % config.eval_every_steps == 0 or step == num_steps:
                stop = evaluate_and_checkpoint()
            if stop or step >= num_steps:
                break
        epoch += 1
    progress.close()
    duration = time.perf_counter() - started
    logger.info("%s: best validation NDCG@10 %.4f at step %d of %d (%.0f s)", name, best_ndcg, best_step, step, duration)
    return TrainResult(out_dir, best_ndcg, best_step, step, duration, history, losses)


def _length_bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Sort within chunks of 50 batches so each batch pads little, then shuffle batches.
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def add_random_negatives(train: pd.DataFrame, per_query: int, seed: int) -> pd.DataFrame:
    """Append `per_query` random items of the training table to each query, with label 0.

    Human judgments cover retrieved, mostly relevant products; a few random products
    per query teach the model what an unrelated product looks like. Items the query
    already has a judgment for are never drawn. The new rows have `raw_label` "".
    """
    if per_query == 0:
        return train
    rng = np.random.default_rng(seed)
    items = train.drop_duplicates(schema.ITEM_ID).reset_index(drop=True)
    judged = train.groupby(schema.QUERY_ID)[schema.ITEM_ID].agg(set).to_dict()
    rows = []
    for query_id, query in train.drop_duplicates(schema.QUERY_ID)[[schema.QUERY_ID, schema.QUERY]].itertuples(index=False):
        drawn = [i for i in rng.choice(len(items), size=min(len(items), per_query + 5), replace=False) if items.at[i, schema.ITEM_ID] not in judged[query_id]]
        for i in drawn[:per_query]:
            rows.append({**items.iloc[i].to_dict(), schema.QUERY_ID: query_id, schema.QUERY: query, schema.LABEL: 0.0, schema.RAW_LABEL: ""})
    negatives = pd.DataFrame(rows, columns=train.columns)
    logger.info("added %d random negatives (%d per query)", len(negatives), per_query)
    return pd.concat([train, negatives], ignore_index=True)


def train_teacher(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    config: TeacherConfig,
    evaluate: EvaluateConfig,
    out_dir: Path,
    run: StageRun | None = None,
) -> TrainResult:
    """Fine-tune the teacher as a one-logit classifier with BCE on the soft labels.

    Raises DataError when the training table has no judgments.
    """
    _seed_everything(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.max_train_queries is not None:
        train = sample_queries(train, config.max_train_queries)
    if train.empty:
        raise DataError("the training split has no judgments; check data.max_queries and the split fractions")
    validation = _validation_subset(validation, config)
    train = add_random_negatives(train, config.num_random_negatives, config.seed)

    encoder = CrossEncoder.from_backbone(config.backbone, config.input, config.num_layers)
    encoded = encoder.builder.encode_pairs(train[schema.QUERY].tolist(), train.to_dict("records"))
    lengths = np.array([len(ids) for ids, _ in encoded])
    labels = train[schema.LABEL].to_numpy(dtype=np.float32)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    num_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    logger.info("teacher: %d training pairs, %d steps, sequence length mean %.1f", len(encoded), num_steps, lengths.mean())

    def batches(epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng(config.seed + epoch)
        for rows in _length_bucketed(rng.permutation(len(encoded)), lengths, config.batch_size, rng):
            yield {"inputs": encoder.builder.pad([encoded[i] for i in rows]), "labels": torch.from_numpy(labels[rows])}

    def loss_of(model: CrossEncoder, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model.forward(batch["inputs"]), batch["labels"])

    return train_loop(encoder, batches, loss_of, num_steps, validation, config, evaluate, out_dir, run, "teacher")


def distill_student(
    pairs: pd.DataFrame,
    validation: pd.DataFrame,
    config: StudentConfig,
    evaluate: EvaluateConfig,
    out_dir: Path,
    run: StageRun | None = None,
) -> TrainResult:
    """Train the student with margin-MSE against the teacher's logits.

    `pairs` contains query-item rows with `teacher_logit` (human-judged and augmented
    pairs alike) and `label` (NaN for augmented pairs). Each batch samples
    `queries_per_batch` queries with at least two items and up to `items_per_query`
    items of each, uniformly without replacement; every pair of sampled items of one
    query contributes a margin. With `bce_weight` > 0, BCE of the student's logit
    against human soft labels is added for judged items.

    After training, the classifier bias is shifted so the student's mean logit on
    the training pairs (a seeded sample of up to 20,000) equals the teacher's:
    margin-MSE leaves that offset free, and this keeps sigmoid(logit) on the
    teacher's scale.
    """
    _seed_everything(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if "teacher_logit" not in pairs.columns:
        raise DataError("distillation pairs have no teacher_logit column; run label_augmented first")
    validation = _validation_subset(validation, config)

    encoder = CrossEncoder.from_backbone(config.backbone, config.input, config.num_layers)
    encoded = encoder.builder.encode_pairs(pairs[schema.QUERY].tolist(), pairs.to_dict("records"))
    teacher = pairs["teacher_logit"].to_numpy(dtype=np.float32)
    labels = pairs[schema.LABEL].to_numpy(dtype=np.float32)
    groups = margin_groups(pairs[schema.QUERY_ID].to_numpy())
    if not groups:
        raise DataError("no query has two or more items to form a margin; check the augmented pairs")
    steps_per_epoch = math.ceil(len(groups) / config.queries_per_batch)
    num_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    logger.info("student: %d pairs over %d queries, %d steps", len(pairs), len(groups), num_steps)

    def batches(epoch: int) -> Iterator[Batch]:
        return student_batches(encoder, encoded, teacher, labels, groups, config, epoch)

    def loss_of(model: CrossEncoder, batch: Batch) -> torch.Tensor:
        return student_loss(model, batch, config.bce_weight)

    result = train_loop(encoder, batches, loss_of, num_steps, validation, config, evaluate, out_dir, run, "student")
    _align_offset(result.checkpoint, pairs, teacher, config.seed)
    return result


def margin_groups(query_ids: np.ndarray) -> list[np.ndarray]:
    """Return the row positions of each query that has two or more items to form a margin."""
    groups = [rows.to_numpy() for _, rows in pd.Series(range(len(query_ids))).groupby(query_ids)]
    return [rows for rows in groups if len(rows) >= 2]


def length_sorted_chunks(lengths: np.ndarray, chunk_size: int | None) -> list[np.ndarray]:
    """Split positions 0..len(lengths)-1 into chunks of `chunk_size`, shortest first.

    Each chunk is padded only to its own longest sequence. With `chunk_size` None
    the result is one chunk in the original order.
    """
    if chunk_size is None:
        return [np.arange(len(lengths))]
    order = np.argsort(lengths, kind="stable")
    return [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]


def student_batches(
    encoder: CrossEncoder,
    encoded: list[tuple[list[int], list[int]]],
    teacher: np.ndarray,
    labels: np.ndarray,
    groups: list[np.ndarray],
    config: StudentConfig,
    epoch: int,
) -> Iterator[Batch]:
    """Yield the student's batches of one epoch (see `distill_student` for the sampling).

    A batch's inputs are a list of padded chunks of similar length
    (`forward_chunk_size`), and `positions` maps the concatenated chunk outputs back
    to the sampled items' order.
    """
    rng = np.random.default_rng(config.seed + epoch)
    order = rng.permutation(len(groups))
    k = config.items_per_query
    for start in range(0, len(order), config.queries_per_batch):
        chosen = [groups[g] for g in order[start : start + config.queries_per_batch]]
        sampled = [rng.choice(rows, size=min(k, len(rows)), replace=False) for rows in chosen]
        flat = np.concatenate(sampled)
        mask = np.zeros((len(sampled), k), dtype=np.float32)
        index = np.zeros((len(sampled), k), dtype=np.int64)
        offset = 0
        for g, rows in enumerate(sampled):
            mask[g, : len(rows)] = 1.0
            index[g, : len(rows)] = np.arange(offset, offset + len(rows))
            offset += len(rows)
        chunks = length_sorted_chunks(np.array([len(encoded[i][0]) for i in flat]), config.forward_chunk_size)
        yield {
            "inputs": [encoder.builder.pad([encoded[flat[j]] for j in chunk]) for chunk in chunks],
            "positions": torch.from_numpy(np.argsort(np.concatenate(chunks))),
            "teacher": torch.from_numpy(teacher[flat]),
            "labels": torch.from_numpy(labels[flat]),
            "mask": torch.from_numpy(mask),
            "index": torch.from_numpy(index),
        }


def student_loss(model: CrossEncoder, batch: Batch, bce_weight: float) -> torch.Tensor:
    """Return margin-MSE (plus the optional pointwise BCE term) of one student batch."""
    logits = torch.cat([model.forward(chunk) for chunk in batch["inputs"]])[batch["positions"]]  # (items,)
    student_grid = logits[batch["index"]]  # (groups, k)
    teacher_grid = batch["teacher"][batch["index"]]
    loss = margin_mse(student_grid, teacher_grid, batch["mask"])
    judged = ~torch.isnan(batch["labels"])
    if bce_weight > 0 and judged.any():
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits[judged], batch["labels"][judged])
    return loss


ALIGN_SAMPLE_SIZE = 20_000  # pairs whose mean logit sets the student's offset


def _align_offset(checkpoint: Path, pairs: pd.DataFrame, teacher: np.ndarray, seed: int) -> None:
    best = CrossEncoder.load(checkpoint)
    rows = np.arange(len(pairs))
    # A sample's mean is accurate enough, and scoring every pair would take minutes.
    if len(rows) > ALIGN_SAMPLE_SIZE:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=ALIGN_SAMPLE_SIZE, replace=False))
    sample = pairs.iloc[rows]
    student = best.predict_logits(sample[schema.QUERY].tolist(), sample.to_dict("records"))
    shift = float(np.mean(teacher[rows]) - np.mean(student))
    with torch.no_grad():
        best.model.classifier.bias += shift
    metadata_path = checkpoint / "training.json"
    best.save(checkpoint, metadata={**_read_json(metadata_path), "logit_offset": shift})
    logger.info("student: shifted the output bias by %.4f to match the teacher's mean logit", shift)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
