"""Distillation tokens per second of the one-hour recipe's off-policy step, by phase, and
the whole as a fraction of the machine's matrix rate (docs/performance.md).

The step of RESULTS.md's one-hour run (embedded SmolLM2-135M, MXFP4 student with the mse
rule, lambda 0: dataset completions, forward KL, fused loss, AdamW), on the same examples
for every variant, each variant a fresh student, the first step a warm-up, medians of the
rest:

* ``as drawn``: float32, batches as train.py draws them (the baseline);
* ``grouped``: float32, the same examples regrouped as ``--group-by-length`` does (similar
  lengths share a step; the warm-up step included, so step times differ, totals do not);
* ``bf16`` / ``bf16 grouped``: the same under ``--mixed-precision bf16`` (the student's
  forward autocast to bfloat16 as accelerate does; weights, optimizer and teacher float32);
  ``+ bf16 teacher``: also ``--teacher-dtype bfloat16``;
* ``micro-batch 8`` and ``micro-batch 2``: other batch sizes (grouped, float32);
* ``... once a step``: the step's forwards reuse one quantization of the weights
  (``quant.reused_quant``, as train.py's step does) instead of quantizing at every forward;
* ``... + frozen``: ``--freeze-quantized``: the quantized layers' weights frozen and
  quantized once for all steps (``quant.frozen_quant``), the backward computes no weight
  gradients for them, AdamW steps the unquantized parameters only.

Tokens are real (non-padding) tokens of prompt + completion; the loss scores the
completion tokens. The bound: FLOPs per token from the models' shapes (6 per linear
parameter for the student's forward and backward, 4 where the weights are frozen, 2 for
the teacher's forward, the head included, attention left out) over a float32 and a
bfloat16 GEMM rate measured in the same run on the embedded model's MLP shape.

    uv run python bench/bench_throughput.py [--steps 6] [--out results/bench/throughput.json]
"""

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import build_batch, examples_in_use_order, group_by_length, load_records  # noqa: E402
from losses import DistillationLoss  # noqa: E402
from models import load_model  # noqa: E402
from quant import FakeQuantLinear, frozen_quant, quantize_model, reused_quant  # noqa: E402

DATASET = Path(__file__).resolve().parent.parent / "assets" / "instructions" / "train_large.jsonl"
MAX_LENGTH = 512


def gemm_rate(dtype: torch.dtype, rows: int = 1024, inner: int = 576, cols: int = 1536, repeats: int = 20) -> float:
    """Best-of GFLOP/s of one [rows, inner] x [inner, cols] product in ``dtype``."""
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * rows * inner * cols / best / 1e9


def linear_parameters(model) -> int:
    """Parameters a token multiplies: every linear layer and the head (tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def one_hour_models():
    """(teacher, the round-to-nearest MXFP4 student of the one-hour recipe, tokenizer)."""
    teacher, tokenizer = load_model(None)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    quantize_model(student, "mxfp4", scale_rule="mse")
    return teacher, student, tokenizer


def trainable_copy(student, bf16: bool, frozen: bool = False):
    """A fresh trainable copy of ``student``; with ``bf16`` its forward autocast to bfloat16
    as accelerate's mixed_precision="bf16" does to the prepared student; ``frozen``: its
    quantized layers' weights not trained (``--freeze-quantized``)."""
    student = copy.deepcopy(student).train().requires_grad_(True)
    for layer in (m for m in student.modules() if isinstance(m, FakeQuantLinear)) if frozen else ():
        layer.weight.requires_grad_(False)
    if bf16:
        from accelerate.utils import convert_outputs_to_fp32

        student.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(student.forward))
    return student


def run_variant(teacher, student_start, tokenizer, examples, micro_batch: int, step_examples: int, bf16: bool,
                steps: int, reuse: str | None = None) -> dict:
    """``reuse``: None (quantize at every forward), "step" (once a step) or "frozen" (once)."""
    student = trainable_copy(student_start, bf16, frozen=reuse == "frozen")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    held = frozen_quant(student) if reuse == "frozen" else contextlib.nullcontext()
    with held:
        return measured_steps(student, optimizer, teacher, tokenizer, examples, micro_batch, step_examples, steps,
                              reuse == "step")


def measured_steps(student, optimizer, teacher, tokenizer, examples, micro_batch: int, step_examples: int,
                   steps: int, reuse_a_step: bool) -> dict:
    loss_fn = DistillationLoss(student, teacher, beta=0.0, vocab_size=len(tokenizer))
    records = []
    for step in range(steps + 1):
        chosen = examples[step * step_examples:(step + 1) * step_examples]
        micro = [chosen[i:i + micro_batch] for i in range(0, len(chosen), micro_batch)]
        batches = [build_batch([e.prompt_ids for e in m], [e.completion_ids for e in m], tokenizer.pad_token_id,
                               MAX_LENGTH) for m in micro]
        loss_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        timing = {"teacher_s": 0.0, "student_s": 0.0}
        started = time.perf_counter()
        with reused_quant(student) if reuse_a_step else contextlib.nullcontext():
            for batch in batches:
                begun = time.perf_counter()
                loss = loss_fn(batch, loss_tokens)
                loss.backward()
                timing["teacher_s"] += loss_fn.teacher_seconds
                timing["student_s"] += time.perf_counter() - begun - loss_fn.teacher_seconds
        begun = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timing["optimizer_s"] = time.perf_counter() - begun
        timing["step_s"] = time.perf_counter() - started
        timing["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
        timing["padded_tokens"] = sum(b["attention_mask"].numel() for b in batches)
        timing["loss_tokens"] = loss_tokens
        records.append(timing)
    measured = records[1:]  # the first step warms up allocators and kernels
    median = {k: statistics.median(r[k] for r in measured) for k in ("teacher_s", "student_s", "optimizer_s", "step_s")}
    tokens, padded = sum(r["tokens"] for r in measured), sum(r["padded_tokens"] for r in measured)
    total_s = sum(r["step_s"] for r in measured)
    return {**median, "tokens_per_s": tokens / total_s,
            "loss_tokens_per_s": sum(r["loss_tokens"] for r in measured) / total_s,
            "padding": 1 - tokens / padded, "tokens": tokens}


def quantization_seconds(student) -> float:
    """One pass of every layer's fake quantization: what each student forward recomputes."""
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    times = []
    with torch.no_grad():
        for _ in range(4):  # the first pass warms up
            started = time.perf_counter()
            for layer in layers:
                layer.quantized_weight()
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="the one-hour recipe's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", default="as drawn,grouped,grouped once a step,bf16,bf16 grouped,"
                                                "bf16 grouped + bf16 teacher,micro-batch 8,micro-batch 2,"
                                                "micro-batch 2 once a step,grouped + frozen,"
                                                "bf16 grouped + bf16 teacher + frozen")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    teacher, student, tokenizer = one_hour_models()
    step_examples = 8  # every variant sees the same examples per step: 8 = 2 x 4 = 1 x 8 = 4 x 2
    # the measured steps' examples, as drawn and regrouped among themselves: the same tokens
    count = step_examples * (args.steps + 1)
    drawn = examples_in_use_order(load_records(str(DATASET)), tokenizer, MAX_LENGTH, count, args.seed)
    grouped = group_by_length(drawn, step_examples, count, args.seed)
    teacher_bf16 = copy.deepcopy(teacher).to(torch.bfloat16)
    # name: (examples, micro-batch, bf16, teacher, reuse)
    variants = {"as drawn": (drawn, args.batch_size, False, teacher, None),
                "grouped": (grouped, args.batch_size, False, teacher, None),
                "grouped once a step": (grouped, args.batch_size, False, teacher, "step"),
                "bf16": (drawn, args.batch_size, True, teacher, None),
                "bf16 grouped": (grouped, args.batch_size, True, teacher, None),
                "bf16 grouped + bf16 teacher": (grouped, args.batch_size, True, teacher_bf16, None),
                "micro-batch 8": (grouped, 8, False, teacher, None),
                "micro-batch 2": (grouped, 2, False, teacher, None),
                "micro-batch 2 once a step": (grouped, 2, False, teacher, "step"),
                "grouped + frozen": (grouped, args.batch_size, False, teacher, "frozen"),
                "bf16 grouped + bf16 teacher + frozen": (grouped, args.batch_size, True, teacher_bf16, "frozen")}
    n = linear_parameters(student)
    frozen_n = sum(m.weight.numel() for m in student.modules() if isinstance(m, FakeQuantLinear))
    flops_per_token = 6 * n + 2 * n
    rates = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
    results = {"threads": torch.get_num_threads(), "steps": args.steps, "examples_per_step": step_examples,
               "gemm_gflops": rates, "flops_per_token": flops_per_token,
               "quantization_s_per_forward": quantization_seconds(student),
               "command": "uv run python " + " ".join(sys.argv), "variants": {}}
    print(f"GEMM [1024x576]x[576x1536]: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f}; "
          f"fake quantization of every layer {results['quantization_s_per_forward'] * 1e3:.0f} ms")
    print("| variant | tokens/s | completion tokens/s | vs as drawn | padding | step s | teacher s | student fwd+bwd s "
          "| optimizer s | % of matrix bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in [v.strip() for v in args.variants.split(",")]:
        examples, micro_batch, bf16, variant_teacher, reuse = variants[name]
        r = run_variant(variant_teacher, student, tokenizer, examples, micro_batch, step_examples, bf16, args.steps,
                        reuse)
        flops = flops_per_token - (2 * frozen_n if reuse == "frozen" else 0)  # no weight gradients there
        r["bound_fraction"] = r["tokens_per_s"] * flops / 1e9 / rates["bfloat16" if bf16 else "float32"]
        results["variants"][name] = r
        base = results["variants"].get("as drawn", r)["tokens_per_s"]
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['padding']:.0%} | {r['step_s']:.2f} | {r['teacher_s']:.2f} | {r['student_s']:.2f} | "
              f"{r['optimizer_s']:.2f} | {r['bound_fraction']:.0%} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
