"""Cost of fake quantization on the embedded model.

1. Generation, 4 prompts x 64 new tokens (greedy): the fake-quant student inside the
   rollout cache (`frozen_quant`) against the same model unquantized, against the
   student re-quantizing its weights on every forward, and with the cache in bfloat16
   (`--rollout-dtype bfloat16`). What bounds a decode step: its median time against the
   matrix products it cannot avoid (every linear weight and the head, applied to a batch of
   4 rows, float32; and with bfloat16 weights, half the bytes) and against reading those
   weights' bytes once (a sum).
2. One training step (forward + backward, batch 4 x 256 tokens): the fake-quant student
   against the unquantized model, and with LoRA r32 adapters in every quantized layer
   (``--lora-r 32``: forms W + s B A and quantizes it every forward).

Measurements are interleaved and repeated; medians and their ratios are printed.

    uv run python bench/bench_quant.py [--quant-type mxfp4] [--repeats 5]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import load_model  # noqa: E402
from lora import LoraSettings, add_lora  # noqa: E402
from quant import frozen_quant, quantize_model  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?",
           "Explain why the sky is blue.", "Give me three tips for learning Python."]


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant-type", "--quant_type", default="mxfp4")
    parser.add_argument("--group-size", "--group_size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", "--new_tokens", type=int, default=64)
    parser.add_argument("--seq-len", "--seq_len", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model()
    student = copy.deepcopy(model)
    quantize_model(student, args.quant_type, args.group_size)
    tokenizer.padding_side = "left"
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)

    def generate(m):
        with torch.no_grad():
            out = m.generate(**batch, **gen_kwargs)
        assert out.shape[1] - batch["input_ids"].shape[1] == args.new_tokens

    def generate_cached(dtype=None):
        with frozen_quant(student, dtype=dtype):
            generate(student)

    tokens = len(PROMPTS) * args.new_tokens
    gen = {"unquantized": lambda: generate(model), "fake-quant, rollout cache": generate_cached,
           "fake-quant, bfloat16 rollout cache": lambda: generate_cached(torch.bfloat16),
           "fake-quant, re-quantize every forward": lambda: generate(student)}
    for fn in gen.values():
        fn()  # warm-up
    times = {name: [] for name in gen}
    for _ in range(args.repeats):
        for name, fn in gen.items():
            times[name].append(timed(fn))
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"generation: {len(PROMPTS)} prompts x {args.new_tokens} new tokens, {args.quant_type}, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads")
    for name, value in tps.items():
        print(f"  {name:40s} {value:8.1f} tokens/s")
    cached = tps["fake-quant, rollout cache"]
    print(f"  cache vs unquantized:   {cached / tps['unquantized']:.2f}x  (target >= 0.9x)")
    print(f"  cache vs re-quantizing: {cached / tps['fake-quant, re-quantize every forward']:.2f}x  (target >= 3x)")
    print(f"  bfloat16 cache vs cache: {tps['fake-quant, bfloat16 rollout cache'] / cached:.2f}x")
    decode_bound(model, len(PROMPTS), len(PROMPTS) / tps["unquantized"], args.repeats)  # s a decode step

    ids = torch.randint(0, model.config.vocab_size, (4, args.seq_len))

    def train_step(m):
        m(input_ids=ids, labels=ids).loss.backward()
        m.zero_grad(set_to_none=True)

    adapted = copy.deepcopy(student)
    add_lora(adapted, LoraSettings(r=32, alpha=32.0))
    steps = {"unquantized": lambda: train_step(model), "fake-quant": lambda: train_step(student),
             "fake-quant + LoRA r32": lambda: train_step(adapted)}
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"training step: forward + backward, batch 4 x {args.seq_len}, median of {args.repeats}")
    for name, value in med.items():
        print(f"  {name:40s} {value:8.2f} s")
    print(f"  fake-quant vs unquantized: {med['fake-quant'] / med['unquantized']:.2f}x time  (target <= 1.15x)")
    print(f"  LoRA r32 vs full-parameter fake-quant: {med['fake-quant + LoRA r32'] / med['fake-quant']:.2f}x time")


def decode_bound(model, batch: int, step_s: float, repeats: int) -> None:
    """A decode step against its floors: one product of a [batch, in] activation with every
    weight matrix the step reads (linear layers and the head), and one read of those bytes."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = [torch.randn(batch, w.shape[1]) for w in weights]

    halves = [w.bfloat16() for w in weights]
    half_inputs = [x.bfloat16() for x in inputs]

    def products(xs=inputs, ws=weights):
        for x, w in zip(xs, ws):
            torch.nn.functional.linear(x, w)

    def read():
        for w in weights:
            w.sum()

    print(f"  a decode step (unquantized, batch {batch}): {step_s * 1e3:.1f} ms; its weights: "
          f"{nbytes / 2**20:.0f} MiB float32")
    for name, fn, size in (("matrix products", products, nbytes), ("read once", read, nbytes),
                           ("bf16 products", lambda: products(half_inputs, halves), nbytes // 2)):
        fn()
        seconds = statistics.median(timed(fn) for _ in range(max(repeats, 5)))
        print(f"    {name:16s} {seconds * 1e3:6.1f} ms ({size / seconds / 1e9:5.1f} GB/s): "
              f"the step takes {step_s / seconds:.2f}x this")


if __name__ == "__main__":
    main()
