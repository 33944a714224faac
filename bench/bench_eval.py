"""Evaluation cost on the embedded model: lm-eval batch sizes, and a full teacher + ptq + student run.

1. One lm-eval task (--task, default arc_easy, --limit items) on the embedded teacher at
   each batch size in --batch-sizes: seconds and the ratio to the fastest. eval.py's
   default (16) must not be more than 20% slower than the best fixed size.
2. With --embedded: `eval.py --embedded`'s held-out metrics of the MXFP4 round-to-nearest
   student (held-out KL, greedy completions, the teacher's NLL of them) with greedy
   decoding in batches of each of --embedded-batches (default heldout.EMBEDDED_BATCH; 8 was
   the former default), median seconds, and the teacher-forced KL's share of them.
3. With --scoring: each of the five tasks and wikitext at --limit items on the embedded
   teacher, scored by stock lm-eval HFLM and by eval.py's continuation-only scoring
   (alternating, median of --repeats): seconds, speed-up, and whether every item's scores
   are identical.
4. With --bound: what bounds a row: the embedded teacher's forward over a batch of 2 x 2048
   tokens (a perplexity batch: every position scored) in GFLOP/s, counted from its weights
   and causal attention, against the float32 matrix-product rate of this machine (a
   2048 x 2048 product). A forward near that rate leaves no 2x without less arithmetic.
5. With --full CHECKPOINT: wall time of `eval.py CHECKPOINT` (teacher, ptq, student rows,
   all five tasks and perplexity, --limit items per task, no row cache).

Needs local benchmark copies (--data-dir, default ../shared/data/benchmarks).

    uv run python bench/bench_eval.py [--limit 100] [--embedded] [--scoring] [--bound] [--full dump/run --full-limit 200]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_quant import timed  # noqa: E402
from harness import run_lm_eval  # noqa: E402
from models import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "benchmarks"))
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--embedded", action="store_true", help="time the embedded held-out metrics instead")
    parser.add_argument("--embedded-batches", default=None, help="decoding batch sizes for --embedded, e.g. 8,64")
    parser.add_argument("--scoring", action="store_true", help="stock HFLM against continuation-only scoring")
    parser.add_argument("--scoring-tasks", default="hellaswag,arc_easy,arc_challenge,winogrande,mmlu,wikitext",
                        help="with --scoring: the tasks to time")
    parser.add_argument("--bound", action="store_true", help="a forward's arithmetic rate against the machine's")
    parser.add_argument("--full", help="a checkpoint or run directory for the end-to-end timing")
    parser.add_argument("--full-limit", type=int, default=200)
    args = parser.parse_args()
    if args.embedded:
        return time_embedded(args.repeats, args.embedded_batches)
    if args.bound:
        return arithmetic_bound(args.repeats)
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"no benchmark copies at {args.data_dir}; pass --data-dir")
    model, tokenizer = load_model()
    model.eval()
    if args.scoring:
        return time_scoring(model, tokenizer, args)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    times = {s: [] for s in sizes}
    run_lm_eval(model, tokenizer, [args.task], args.data_dir, 8, 0, 4, 2048)  # warm-up
    for _ in range(args.repeats):
        for size in sizes:
            start = time.perf_counter()
            with torch.no_grad():
                run_lm_eval(model, tokenizer, [args.task], args.data_dir, args.limit, 0, size, 2048)
            times[size].append(time.perf_counter() - start)
    medians = {s: statistics.median(t) for s, t in times.items()}
    best = min(medians.values())
    print(f"{args.task}, {args.limit} items, embedded model, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for size, seconds in medians.items():
        print(f"  batch size {size:3d}: {seconds:7.1f} s  {seconds / best:.2f}x the fastest")
    if args.full:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "eval.py"), args.full, "--data-dir", args.data_dir,
                        "--limit", str(args.full_limit), "--no-cache"], check=True)
        print(f"eval.py {args.full} --limit {args.full_limit} (teacher + ptq + student, 5 tasks + perplexity): "
              f"{time.perf_counter() - start:.0f} s")


def time_scoring(model, tokenizer, args) -> None:
    from lm_eval.models.huggingface import HFLM

    from harness import PERPLEXITY_TASK, TASKS, continuation_scoring_lm, lm_eval_output

    print(f"lm-eval scoring, embedded teacher, --limit {args.limit}, batch 16, max length 2048, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| task | stock HFLM (s) | continuation-only (s) | speed-up | items identical |")
    print("|---|---|---|---|---|")
    totals = {"stock": 0.0, "ours": 0.0}
    for task in args.scoring_tasks.split(","):
        if task not in TASKS + (PERPLEXITY_TASK,):
            raise SystemExit(f"--scoring-tasks: unknown task {task!r}")
        times, samples = {"stock": [], "ours": []}, {}
        for _ in range(args.repeats):
            for name, make in (("stock", HFLM), ("ours", continuation_scoring_lm)):
                lm = make(pretrained=model, tokenizer=tokenizer, batch_size=16, max_length=2048)
                start = time.perf_counter()
                output = lm_eval_output(lm, [task], args.data_dir, args.limit, 0)[0]
                times[name].append(time.perf_counter() - start)
                samples[name] = {k: sorted((s["doc_id"], s["resps"]) for s in v) for k, v in output["samples"].items()}
        stock, ours = statistics.median(times["stock"]), statistics.median(times["ours"])
        totals["stock"] += stock
        totals["ours"] += ours
        print(f"| {task} | {stock:.1f} | {ours:.1f} | {stock / ours:.2f}x | {samples['stock'] == samples['ours']} |",
              flush=True)
    print(f"| all | {totals['stock']:.1f} | {totals['ours']:.1f} | {totals['stock'] / totals['ours']:.2f}x | |")


def arithmetic_bound(repeats: int, batch: int = 2, length: int = 2048) -> None:
    model, _ = load_model()
    model.eval()
    config = model.config
    params = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size * (
        0 if config.tie_word_embeddings else 1)  # the embedding lookup is no arithmetic; the head is
    attention = 2 * config.num_hidden_layers * length * config.hidden_size  # QK^T and AV, causal: half of 4 T d
    flops = batch * length * (2 * params + attention)
    ids = torch.randint(0, config.vocab_size, (batch, length))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.no_grad():
        model(input_ids=ids)
        forward = statistics.median(timed(lambda: model(input_ids=ids)) for _ in range(repeats))
        torch.mm(a, b)
        product = statistics.median(timed(lambda: torch.mm(a, b)) for _ in range(max(repeats, 5)))
    machine = 2 * 2048 ** 3 / product / 1e9
    print(f"embedded teacher forward, {batch} x {length} tokens, {torch.get_num_threads()} threads: "
          f"{forward:.2f} s, {batch * length / forward:.0f} tokens/s, {flops / forward / 1e9:.1f} GFLOP/s")
    print(f"float32 2048 x 2048 matrix product: {machine:.1f} GFLOP/s; the forward runs at "
          f"{flops / forward / 1e9 / machine:.0%} of it")


def time_embedded(repeats: int, batches: str | None) -> None:
    import copy

    from heldout import EMBEDDED_BATCH, embedded_eval, heldout_examples, heldout_kl_sums
    from quant import frozen_quant, quantize_model

    teacher, tokenizer = load_model()
    teacher.eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, "mxfp4")
    student.eval()
    sizes = [int(b) for b in batches.split(",")] if batches else [EMBEDDED_BATCH]
    times, results = {size: [] for size in sizes}, {}
    kl_times = []
    examples = heldout_examples(tokenizer)
    for _ in range(repeats):
        for size in sizes:
            start = time.perf_counter()
            results[size] = embedded_eval(teacher, student, tokenizer, batch_size=size)
            times[size].append(time.perf_counter() - start)
        start = time.perf_counter()
        with frozen_quant(student), torch.no_grad():
            heldout_kl_sums(teacher, student, examples, tokenizer.pad_token_id)
        kl_times.append(time.perf_counter() - start)
    base = statistics.median(times[sizes[0]])
    print(f"embedded held-out metrics of the mxfp4 round-to-nearest student ({len(examples)} prompts), "
          f"median of {repeats}, {torch.get_num_threads()} threads")
    for size, values in times.items():
        print(f"  decoding batch {size:3d}: {statistics.median(values):6.1f} s  {base / statistics.median(values):.2f}x"
              f"  {results[size]}")
    print(f"  of which the teacher-forced KL (both models' forwards): {statistics.median(kl_times):6.1f} s")


if __name__ == "__main__":
    main()
