"""Where a trained student's gain sits (RESULTS.md): the 4-bit codes that changed, and the
held-out KL with only some of its trained parameters put into round-to-nearest.

With --by-layer, where the remaining gap sits: for round-to-nearest and for the trained
student, the held-out KL with one kind of linear layer (q_proj, ..., down_proj), or one
third of the decoder's depth, computing with its latent weights unquantized. The share of
the gap that disappears is what that part's 4-bit rounding still costs.

With --train-split, how far the gain generalizes: the same KL teacher-forced on the
training set's reference completions, which the student was fitted to, beside the
held-out one, for round-to-nearest and the trained student.

With --start CHECKPOINT (a student saved before training, e.g. a GPTQ start's
checkpoint-0), the codes are counted and the parts put back against that start instead.

    uv run python bench/gain_ablation.py dump/study/mxfp4_lr/lr0.0001_seed42/checkpoint-40 [--by-layer] [--train-split]
"""

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import ptq_baseline  # noqa: E402
from heldout import heldout_examples, heldout_kl_sums  # noqa: E402
from models import load_model  # noqa: E402
from quant import FakeQuantLinear, frozen_quant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--by-layer", action="store_true", help="the gap each kind and depth of layer still holds")
    parser.add_argument("--train-split", action="store_true", help="the KL on the training set beside the held-out one")
    parser.add_argument("--start", help="the checkpoint training started from (default: round-to-nearest)")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    settings = json.loads((checkpoint / "config.json").read_text())["fake_quant"]
    trained = load_file(checkpoint / "model.safetensors")
    teacher, tokenizer = load_model(json.loads((checkpoint / "run_config.json").read_text()).get("model"))
    teacher.eval()
    examples = heldout_examples(tokenizer)

    start = load_file(Path(args.start) / "model.safetensors") if args.start else {}
    start_name = "the start" if args.start else "round-to-nearest"

    def student(linear: bool, other: bool):
        model = ptq_baseline(teacher, settings)
        model.load_state_dict(start, strict=False)
        quantized = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        chosen = {k: v for k, v in trained.items() if (k in quantized and linear) or (k not in quantized and other)}
        model.load_state_dict(chosen, strict=False)
        return model, quantized

    full, quantized = student(True, True)
    changed = total = 0
    moved = []
    with torch.no_grad():
        reference = ptq_baseline(teacher, settings)
        reference.load_state_dict(start, strict=False)
        for (name, a), (_, b) in zip(reference.named_modules(), full.named_modules()):
            if isinstance(a, FakeQuantLinear):
                changed += int((a.quantized_weight() != b.quantized_weight()).sum())
                total += a.weight.numel()
                moved.append(float((b.weight - a.weight).norm() / a.weight.norm()))
    print(f"4-bit codes changed from {start_name}: {changed / total:.2%} of {total:,}; "
          f"the median latent weight matrix moved {sorted(moved)[len(moved) // 2]:.2%} of its norm")
    held_out = {}
    for label, linear, other in ((start_name, False, False), ("trained norms and embedding only", False, True),
                                 ("trained linear layers only", True, False), ("trained student", True, True)):
        model, _ = student(linear, other)
        with frozen_quant(model):
            held_out[label] = heldout_kl(teacher, model, examples, tokenizer.pad_token_id)
        print(f"{label}: held-out KL {held_out[label]:.4f}")
    if args.train_split:
        train_examples = heldout_examples(tokenizer, split="train")
        print(f"\nKL teacher-forced on the training set ({len(train_examples)} responses) and the held-out set:")
        for label, model in ((start_name, reference), ("trained student", full)):
            with frozen_quant(model):
                on_train = heldout_kl(teacher, model, train_examples, tokenizer.pad_token_id)
            print(f"{label}: training set {on_train:.4f}, held-out {held_out[label]:.4f}", flush=True)
    if args.by_layer:
        for label, model in ((start_name, reference), ("trained student", full)):
            gap_by_layer(label, model, lambda m: heldout_kl(teacher, m, examples, tokenizer.pad_token_id))


def heldout_kl(teacher, student, examples, pad_token_id) -> float:
    kl_sum, tokens = heldout_kl_sums(teacher, student, examples, pad_token_id)
    return kl_sum / tokens


@contextlib.contextmanager
def unquantized(layers):
    """These FakeQuantLinear layers compute with their latent weights as they are."""
    for m in layers:
        m.quantized_weight = lambda m=m: m.weight  # the instance attribute shadows the method
    try:
        yield
    finally:
        for m in layers:
            del m.quantized_weight


def gap_by_layer(label: str, model, kl) -> None:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    depth = {name: int(re.search(r"\.(\d+)\.", name).group(1)) for name in layers}
    n = max(depth.values()) + 1
    parts = {f"{kind} (all layers)": [m for name, m in layers.items() if name.endswith("." + kind)]
             for kind in dict.fromkeys(name.rsplit(".", 1)[1] for name in layers)}
    for third in range(3):
        low, high = third * n // 3, (third + 1) * n // 3
        parts[f"decoder layers {low}-{high - 1} (all kinds)"] = [m for name, m in layers.items()
                                                                 if low <= depth[name] < high]
    total = kl(model)
    print(f"\n{label}: held-out KL {total:.4f}; with one part unquantized:")
    print("| part unquantized | share of the weights | held-out KL | share of the gap removed |")
    print("|---|---|---|---|")
    weights = sum(m.weight.numel() for m in layers.values())
    for part, chosen in parts.items():
        with unquantized(chosen):
            value = kl(model)
        share = sum(m.weight.numel() for m in chosen) / weights
        print(f"| {part} | {share:.1%} | {value:.4f} | {1 - value / total:.1%} |", flush=True)


if __name__ == "__main__":
    main()
