"""Where a trained student's gain sits (RESULTS.md): the 4-bit codes that changed, and the
held-out KL with only some of its trained parameters put into round-to-nearest.

    uv run python bench/gain_ablation.py dump/study/mxfp4_lr/lr0.0001_seed42/checkpoint-40
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import heldout_examples, heldout_kl_sums, ptq_baseline  # noqa: E402
from models import load_model  # noqa: E402
from quant import FakeQuantLinear, frozen_quant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    settings = json.loads((checkpoint / "config.json").read_text())["fake_quant"]
    trained = load_file(checkpoint / "model.safetensors")
    teacher, tokenizer = load_model(json.loads((checkpoint / "run_config.json").read_text()).get("model"))
    teacher.eval()
    examples = heldout_examples(tokenizer)

    def student(linear: bool, other: bool):
        model = ptq_baseline(teacher, settings)
        quantized = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
        chosen = {k: v for k, v in trained.items() if (k in quantized and linear) or (k not in quantized and other)}
        model.load_state_dict(chosen, strict=False)
        return model, quantized

    full, quantized = student(True, True)
    changed = total = 0
    with torch.no_grad():
        reference = ptq_baseline(teacher, settings)
        for (name, a), (_, b) in zip(reference.named_modules(), full.named_modules()):
            if isinstance(a, FakeQuantLinear):
                changed += int((a.quantized_weight() != b.quantized_weight()).sum())
                total += a.weight.numel()
    print(f"4-bit codes changed from round-to-nearest: {changed / total:.2%} of {total:,}")
    for label, linear, other in (("round-to-nearest", False, False), ("trained norms and embedding only", False, True),
                                 ("trained linear layers only", True, False), ("trained student", True, True)):
        model, _ = student(linear, other)
        with frozen_quant(model):
            kl_sum, tokens = heldout_kl_sums(teacher, model, examples, tokenizer.pad_token_id)
        print(f"{label}: held-out KL {kl_sum / tokens:.4f}")


if __name__ == "__main__":
    main()
