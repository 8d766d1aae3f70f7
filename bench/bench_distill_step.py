"""Time one student training step with and without length-sorted forward chunks.

Usage (after `dvc update data.dvc`):

    python bench/bench_distill_step.py --steps 10 --rounds 4
    python bench/bench_distill_step.py --pairs artifacts/augmented/labeled_pairs.parquet

A step is what `distill_student` does per batch: the forward pass (in chunks of
`forward_chunk_size` items sorted by length, or one padded pass), margin-MSE, the
backward pass and an AdamW update. Batches are sampled as the stage samples them.
With `--pairs`, they come from the teacher-labeled pairs that `label_augmented`
wrote, judged and generated alike. Without it, they come from the Home Depot
judgments, and the teacher logits are stand-ins (the soft label scaled to [-2, 2]),
which is enough to measure time. The chunked and the single pass give the same
loss up to rounding, and the script checks this on the first batch.

Variants run in rounds, each round timing every variant on the same batches in
turn, so a slow spell of the machine hits all of them. The script prints the median
step time of each variant, its ratio to the single pass and the padded tokens per
step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import pandas as pd
import torch

from crossrank import schema
from crossrank.config import load_params
from crossrank.ingest import ingest
from crossrank.models import CrossEncoder
from crossrank.training import margin_groups, student_batches, student_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pairs", default=None, help="teacher-labeled pairs (Parquet) in place of the raw judgments")
    parser.add_argument("--chunks", default="none,32,16,8", help="comma-separated forward_chunk_size values, where none means one pass")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = load_params(args.params, profile="default")
    judgments = pd.read_parquet(args.pairs) if args.pairs else ingest(params.data)
    print(f"{len(judgments)} pairs; machine {platform.machine()}, torch threads {torch.get_num_threads()}")

    variants = []
    for value in args.chunks.split(","):
        if value != "none" and not (value.isdigit() and int(value) > 0):
            parser.error(f"--chunks has an invalid value {value!r}; give positive integers or none, e.g. --chunks none,16")
        variants.append(None if value == "none" else int(value))
    configs = {size: params.student.model_copy(update={"forward_chunk_size": size}) for size in variants}
    encoders = {}
    for size in variants:
        encoders[size] = CrossEncoder.from_backbone(configs[size].backbone, configs[size].input, configs[size].num_layers)
    optimizers = {size: torch.optim.AdamW(encoders[size].model.parameters(), lr=1e-5) for size in variants}
    for encoder in encoders.values():
        encoder.model.train()

    base = encoders[variants[0]]
    encoded = base.builder.encode_pairs(judgments[schema.QUERY].tolist(), judgments.to_dict("records"))
    labels = judgments[schema.LABEL].to_numpy(dtype=np.float32)
    teacher = judgments["teacher_logit"].to_numpy(dtype=np.float32) if args.pairs else labels * 4.0 - 2.0
    groups = margin_groups(judgments[schema.QUERY_ID].to_numpy())

    def batches(size: int | None, epoch: int) -> list[dict]:
        count = args.steps + 2
        out = []
        for batch in student_batches(base, encoded, teacher, labels, groups, configs[size], epoch):
            out.append(batch)
            if len(out) == count:
                break
        return out

    # Every variant samples with the same seed, so the items are the same and only the chunks differ.
    first = {}
    for size in variants:
        first[size] = next(iter(student_batches(base, encoded, teacher, labels, groups, configs[size], epoch=0)))
    base.model.eval()  # no dropout for the check, so both passes see the same network
    with torch.no_grad():
        reference = float(student_loss(base, first[variants[0]], 0.0))
        for size in variants[1:]:
            value = float(student_loss(base, first[size], 0.0))
            print(f"loss check, chunk {size}: {value:.6f} against {reference:.6f} in one pass")
    base.model.train()

    times: dict[int | None, list[float]] = {size: [] for size in variants}
    padded: dict[int | None, list[int]] = {size: [] for size in variants}
    for round_number in range(args.rounds):
        for size in variants:
            encoder, optimizer = encoders[size], optimizers[size]
            for step, batch in enumerate(batches(size, round_number + 1)):
                started = time.perf_counter()
                loss = student_loss(encoder, batch, 0.0)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - started
                if step >= 2:  # the first two steps of a round warm the caches, so they are not timed
                    times[size].append(elapsed)
                    padded[size].append(sum(chunk["input_ids"].size for chunk in batch["inputs"]))

    single = statistics.median(times[variants[0]])
    print(f"\n{'forward_chunk_size':>18} {'median step s':>14} {'ratio':>7} {'padded tokens':>14}")
    for size in variants:
        median = statistics.median(times[size])
        print(f"{str(size):>18} {median:>14.3f} {single / median:>7.2f} {statistics.mean(padded[size]):>14.0f}")


if __name__ == "__main__":
    main()
