"""Where the one-hour recipe's off-policy training step spends its time, by operator
(torch.profiler, self CPU time), float32 or bf16 autocast: what bounds the step
(docs/performance.md).

    uv run python bench/profile_step.py [--bf16] [--top 15]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import build_batch, examples_in_use_order, group_by_length, load_records  # noqa: E402
from losses import DistillationLoss  # noqa: E402
from models import load_model  # noqa: E402
from quant import quantize_model  # noqa: E402

DATASET = Path(__file__).resolve().parent.parent / "assets" / "instructions" / "train_large.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    teacher, tokenizer = load_model(None)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    quantize_model(student, "mxfp4", scale_rule="mse")
    if args.bf16:
        from accelerate.utils import convert_outputs_to_fp32

        student.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(student.forward))
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
