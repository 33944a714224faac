"""Where the one-hour recipe's off-policy training step spends its time, by operator
(torch.profiler, self CPU time), float32 or bf16 autocast: what bounds the step
(docs/performance.md).

    uv run python bench/profile_step.py [--bf16] [--top 15]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_throughput import DATASET, one_hour_models, trainable_copy  # noqa: E402
from data import build_batch, examples_in_use_order, group_by_length, load_records  # noqa: E402
from losses import DistillationLoss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    teacher, student, tokenizer = one_hour_models()
    student = trainable_copy(student, args.bf16)
    loss_fn = DistillationLoss(student, teacher, beta=0.0, vocab_size=len(tokenizer))
    examples = group_by_length(examples_in_use_order(load_records(str(DATASET)), tokenizer, 512, 8, 42), 4, 8, 42)
    batches = [build_batch([e.prompt_ids for e in examples[i:i + 4]], [e.completion_ids for e in examples[i:i + 4]],
                           tokenizer.pad_token_id, 512) for i in (0, 4)]
    tokens = int((batches[1]["labels"] != -100).sum())
    loss_fn(batches[0], tokens).backward()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss_fn(batches[1], tokens).backward()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
