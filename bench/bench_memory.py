"""Peak memory of one training step of a Qwen3-4B-shaped student, measured, then extrapolated.

Method: a Qwen3 config with Qwen3-4B's widths (hidden 2560, intermediate 9728, 32 query /
8 key-value heads of 128, vocabulary 151,936, tied embeddings) and random weights, built
from the config (no download), at two depths. Each variant runs in its own process: the
bfloat16 teacher and the float32 MXFP4 student built as train.py builds them, AdamW over
what trains with its state already allocated (as in every step after the first), one step
of the fused loss (beta 0.5) on a batch of 4 x 1024 tokens (the last 512 of each scored),
and the process's peak resident memory (``ru_maxrss``) twice: after the backward (the
forward and backward: activations, the quantized weights saved for the backward) and after
the optimizer step (all gradients at once). Each phase's peak is a + b * layers, fitted
through the two depths; the larger of the two, read at 36 layers (Qwen3-4B's depth), is the
estimate. The constants hold the embedding, head, loss buffers, the Python and torch
runtime; on a GPU the runtime part is the CUDA context instead, and the caching
allocator's reserved memory plays the part of the resident memory that freed tensors leave.

    uv run python bench/bench_memory.py [--variants "full,LoRA r32 + grad ckpt"] [--depths 1 2] [--batch 4] [--length 1024]

Each measurement is written to ``results/bench/memory.json`` as it lands and reused by the
next run (minutes a process on a CPU, two per variant, much longer for bf16 on a CPU
without bf16 instructions): interrupt it and run it again.

Variants: full-parameter or LoRA r32 (all linear layers), each without and with gradient
checkpointing and bf16 compute (``--mixed-precision bf16``).
"""

import argparse
import itertools
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=4096)
QWEN3_4B_LAYERS = 36
GIB = 2**30


def one_step(args) -> dict:
    """Build, step once, report the peak RSS (this process only)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, Qwen3Config

    import train
    from losses import DistillationLoss

    widths = {**QWEN3_4B, **json.loads(args.widths)}
    config = Qwen3Config(**widths, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    c = train.TrainConfig(quant_type="mxfp4", lora_r=args.lora_r, gradient_checkpointing=args.gc,
                          mixed_precision="bf16" if args.bf16 else "no")
    train.prepare_student(student, c)
    accelerator = Accelerator(mixed_precision=c.mixed_precision)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    student, optimizer = accelerator.prepare(student, optimizer)
    # A run's steps after the first hold AdamW's two state tensors through the forward and
    # backward: create them first, one parameter at a time (a step on its zero gradient), so
    # that the step measured is such a step and the set-up never holds all gradients at once.
    for p in trained:
        p.grad = torch.zeros_like(p)
        optimizer.step()
        p.grad = None
    loss_fn = DistillationLoss(student, teacher, beta=0.5)
    ids = torch.randint(0, widths["vocab_size"], (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, args.length // 2:] = ids[:, args.length // 2:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss = loss_fn(batch, int((labels != -100).sum()))
    accelerator.backward(loss)
    through_backward = peak_rss_gib()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"peak_gib": peak_rss_gib(), "peak_through_backward_gib": through_backward,
            "trained_params": sum(p.numel() for p in trained)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# Without any lever and with both first: an interrupted run has the table's extremes.
VARIANTS = sorted((dict(lora_r=r, gc=gc, bf16=bf16) for r, gc, bf16 in itertools.product((0, 32), (False, True), (False, True))),
                  key=lambda v: v["gc"] != v["bf16"])


def line(low: int, high: int, at_low: float, at_high: float) -> tuple[float, float]:
    """(GiB a layer, GiB at no layers) through two measured depths."""
    slope = (at_high - at_low) / (high - low)
    return slope, at_low - slope * low


def variant_name(v: dict) -> str:
    return " + ".join([f"LoRA r{v['lora_r']}" if v["lora_r"] else "full"] + ["grad ckpt"] * v["gc"] + ["bf16"] * v["bf16"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs=2, default=[1, 2], help="the two depths measured (layers)")
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)  # one depth, with --one
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--widths", default="{}", help="JSON overrides of the config's widths (a smoke run)")
    p.add_argument("--results", default=str(ROOT / "results" / "bench" / "memory.json"),
                   help="measurements already in this file are reused (delete it to measure again)")
    p.add_argument("--variants", help="comma-separated names to measure (default: all; bf16 autocast is slow "
                                      "on CPUs without bf16 instructions), e.g. 'full,LoRA r32 + grad ckpt'")
    p.add_argument("--no-measure", action="store_true",
                   help="print the table of the variants already measured at both depths; run nothing")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-r", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_step(args)))
        return
    (low, high), rows = args.depths, []
    results = Path(args.results)
    measured = json.loads(results.read_text()) if results.exists() else {}
    shape = f"batch {args.batch} x {args.length}, widths {json.dumps({**QWEN3_4B, **json.loads(args.widths)}, sort_keys=True)}"
    chosen = [n.strip() for n in args.variants.split(",")] if args.variants else [variant_name(v) for v in VARIANTS]
    unknown = set(chosen) - {variant_name(v) for v in VARIANTS}
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; valid: {', '.join(variant_name(v) for v in VARIANTS)}")
    for v in VARIANTS:
        if variant_name(v) not in chosen:
            continue
        peaks = []
        for layers in (low, high):
            key = f"{variant_name(v)} | {layers} layers | {shape}"
            if key not in measured and not args.no_measure:
                cmd = [sys.executable, __file__, "--one", "--layers", str(layers), "--batch", str(args.batch),
                       "--length", str(args.length), "--widths", args.widths, "--lora-r", str(v["lora_r"])]
                cmd += ["--gc"] * v["gc"] + ["--bf16"] * v["bf16"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
                measured[key] = json.loads(out.strip().splitlines()[-1])
                # Each measurement is kept as it lands: the whole table can take hours.
                results.parent.mkdir(parents=True, exist_ok=True)
                tmp = results.with_suffix(".tmp")
                tmp.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n")
                tmp.replace(results)
            if key in measured:
                peaks.append(measured[key])
        if len(peaks) < 2:
            continue
        # The forward + backward (activations, saved quantized weights) and the optimizer step
        # (all gradients at once) peak at different times and grow at different rates with
        # depth: extrapolate each and take the larger.
        lines = [line(low, high, peaks[0][phase], peaks[1][phase]) for phase in ("peak_through_backward_gib", "peak_gib")]
        per_layer, at_depth = max(((slope, slope * QWEN3_4B_LAYERS + constant) for slope, constant in lines),
                                  key=lambda pair: pair[1])
        peaks = [p["peak_gib"] for p in peaks]
        rows.append((variant_name(v), peaks, per_layer, at_depth))
        print(f"{rows[-1][0]:32s} measured {peaks[0]:6.2f} / {peaks[1]:6.2f} GiB at {low} / {high} layers, "
              f"{per_layer:5.2f} GiB a layer -> {rows[-1][3]:6.1f} GiB at {QWEN3_4B_LAYERS} layers", flush=True)
    print(f"\n{shape}")
    print(f"| variant | peak at {low} / {high} layers (GiB) | per layer | at 36 layers | fits 24 / 48 / 80 GB |")
    print("|---|---|---|---|---|")
    for name, peaks, per_layer, full in rows:
        fits = " / ".join("yes" if full * GIB <= gb * 1e9 else "no" for gb in (24, 48, 80))
        print(f"| {name} | {peaks[0]:.2f} / {peaks[1]:.2f} | {per_layer:.2f} | {full:.1f} | {fits} |")

if __name__ == "__main__":
    main()
