"""Peak memory and time of the distillation loss at a large vocabulary (Qwen3: 151,936).

Each variant runs in its own process; its extra peak memory is the peak RSS during loss +
backward minus the RSS with its inputs allocated. Ratios are against baselines measured
in the same run.

1. Logits in hand, [tokens, vocab] for student and teacher: TRL's
   GKDTrainer.generalized_jsd_loss against our chunked generalized_jsd_loss.
2. Hidden states and heads in hand (Qwen3-4B's hidden size 2560): materialise the logits
   (student with grad) then our chunked loss, against fused_linear_jsd_loss.

    uv run python bench/bench_losses.py [--tokens 2048] [--fused-tokens 4096]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from losses import fused_linear_jsd_loss, generalized_jsd_loss  # noqa: E402

VOCAB = 151_936
HIDDEN = 2560
BETA = 0.5


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def labels_for(tokens: int) -> torch.Tensor:
    labels = torch.arange(tokens) % VOCAB
    labels[: tokens // 8] = -100  # some prompt positions
    return labels


def run_variant(variant: str, tokens: int) -> dict:
    torch.manual_seed(0)
    labels = labels_for(tokens)
    if variant in ("trl", "chunked"):
        student = (torch.randn(tokens, VOCAB) * 3).requires_grad_()
        teacher = torch.randn(tokens, VOCAB) * 3
    else:
        hidden_s = torch.randn(tokens, HIDDEN).requires_grad_()
        hidden_t = torch.randn(tokens, HIDDEN)
        head_s = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).requires_grad_()
        head_t = torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5
    baseline = current_rss_bytes()
    start = time.perf_counter()
    if variant == "trl":
        from trl.experimental.gkd import GKDTrainer

        loss = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=BETA)
    elif variant == "chunked":
        loss = generalized_jsd_loss(student, teacher, labels, beta=BETA)
    elif variant == "materialised":
        with torch.no_grad():
            teacher_logits = hidden_t @ head_t.T
        loss = generalized_jsd_loss(hidden_s @ head_s.T, teacher_logits, labels, beta=BETA)
    elif variant == "fused":
        loss = fused_linear_jsd_loss(hidden_s, head_s, hidden_t, head_t, labels, beta=BETA)
    else:
        raise ValueError(variant)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "tokens": tokens, "loss": loss.item(), "seconds": seconds,
            "extra_peak_gib": (peak_rss_bytes() - baseline) / 2**30}


def measure(variant: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(tokens)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} at {tokens} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(a: dict, b: dict) -> None:
    for r in (a, b):
        print(f"  {r['variant']:13s} {r['tokens']:6d} tokens  extra peak {r['extra_peak_gib']:7.2f} GiB  "
              f"{r['seconds']:7.2f} s  loss {r['loss']:.6f}")
    rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
    print(f"  memory {b['extra_peak_gib'] / a['extra_peak_gib']:.3f}x of {a['variant']}, "
          f"time {b['seconds'] / a['seconds']:.2f}x, relative difference in loss {rel:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens for TRL vs chunked (TRL needs the most)")
    parser.add_argument("--fused-tokens", "--fused_tokens", type=int, default=4096)
    parser.add_argument("--chunked-tokens", "--chunked_tokens", type=int, default=8192,
                        help="also run the chunked loss alone at this size (8 x 1024)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.tokens)))
        return
    print(f"vocab {VOCAB}, beta {BETA}, float32, {torch.get_num_threads()} threads")
    print("logits in hand:")
    report(measure("trl", args.tokens), measure("chunked", args.tokens))
    if args.chunked_tokens:
        r = measure("chunked", args.chunked_tokens)
        print(f"  chunked alone at {r['tokens']} tokens: extra peak {r['extra_peak_gib']:.2f} GiB, "
              f"{r['seconds']:.2f} s (each input is {r['tokens'] * VOCAB * 4 / 2**30:.2f} GiB)")
    print(f"hidden states in hand (hidden {HIDDEN}):")
    report(measure("materialised", args.fused_tokens), measure("fused", args.fused_tokens))


if __name__ == "__main__":
    main()
