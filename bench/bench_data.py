"""Data set-up of a run on a large chat dataset: tokenizing every record (what train.py did)
against tokenizing only the records the run draws (``data.examples_in_use_order``).

The dataset is synthetic, in tulu-3's ``messages`` schema (a user turn and an assistant turn
of a few hundred characters each), with the embedded model's tokenizer and chat template;
the run draws ``--steps`` x ``--examples-per-step`` examples. Medians over repeats.

    uv run python bench/bench_data.py [--records 100000] [--steps 100] [--examples-per-step 4]
"""

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import examples_in_use_order, prepare_examples  # noqa: E402
from models import load_tokenizer  # noqa: E402

WORDS = "the model learns a quantized student from its teacher on every step of the run with data".split()


def conversation(rng: random.Random) -> dict:
    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return {"messages": [{"role": "user", "content": text(rng.randint(20, 80))},
                         {"role": "assistant", "content": text(rng.randint(40, 160))}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--examples-per-step", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    tokenizer = load_tokenizer()
    rng = random.Random(0)
    records = [conversation(rng) for _ in range(args.records)]
    count = args.steps * args.examples_per_step
    times = {"all records": [], "drawn records": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        prepare_examples(records, tokenizer, max_length=512)
        times["all records"].append(time.perf_counter() - start)
        start = time.perf_counter()
        examples_in_use_order(records, tokenizer, max_length=512, count=count, seed=42)
        times["drawn records"].append(time.perf_counter() - start)
    base = statistics.median(times["all records"])
    print(f"{args.records:,} records, a run of {args.steps} steps x {args.examples_per_step} examples ({count:,})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  tokenize {name:14s} {median:8.2f} s   {base / median:7.1f}x")


if __name__ == "__main__":
    main()
