"""Steps/s of train.py against TRL's GKDTrainer with a torchao QAT student, same settings.

On the embedded model and data, lambda = 1 (every step on-policy), batch 4, prompts of at
most 128 tokens, 64 new tokens (sampling at temperature 0.9), generalized JSD beta = 0.5:

* train.py --quant-type int4 --group-size 64
* train.py --quant-type none (the cost of quantization during training)
* TRL GKDTrainer, student prepared by torchao QATConfig(IntxFakeQuantizeConfig(torch.int4,
  group_size=64, is_symmetric=False)) on every Linear but lm_head (64: the embedded
  model's hidden size 576 is not a multiple of 128)

The first step of each is a warm-up and not counted; medians of the remaining step
times. Also prints train.py's share of step time in generation, teacher forward and
student forward/backward.

    uv run python bench/bench_train.py [--steps 4]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

COMMON = ["--lmbda", "1", "--beta", "0.5", "--temperature", "0.9", "--batch-size", "4", "--max-new-tokens", "64",
          "--max-length", "192", "--learning-rate", "5e-6", "--seed", "0"]
MAX_PROMPT_TOKENS = 128


def short_prompt_dataset(path: Path) -> Path:
    """The embedded training set restricted to prompts of at most 128 tokens."""
    from data import load_records
    from models import load_tokenizer

    tokenizer = load_tokenizer()
    out = path / "short_prompts.jsonl"
    with open(out, "w") as f:
        for record in load_records(None):
            prompt = tokenizer.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
            if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= MAX_PROMPT_TOKENS:
                f.write(json.dumps({"messages": record["messages"]}) + "\n")
    return out


def ours(dataset: Path, workdir: Path, steps: int, *flags) -> list[dict]:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    out = workdir / "_".join(f.strip("-") for f in flags)
    code = train.main([*COMMON, "--dataset", str(dataset), "--max-steps", str(steps), "--output_dir", str(out),
                       *flags])
    assert code == 0, f"train.py failed with {code}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trl_step_times(dataset: Path, workdir: Path, steps: int) -> list[float]:
    import copy

    from datasets import load_dataset
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from models import load_model

    teacher, tokenizer = load_model()
    student = copy.deepcopy(teacher)
    weight_config = IntxFakeQuantizeConfig(torch.int4, group_size=64, is_symmetric=False)
    quantize_(student, QATConfig(weight_config=weight_config, step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and "lm_head" not in fqn)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    args = GKDConfig(output_dir=str(workdir / "trl"), lmbda=1.0, beta=0.5, temperature=0.9, max_new_tokens=64,
                     per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-6, max_length=192,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                     dataloader_num_workers=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(dataset), split="train"),
                         callbacks=[timer])
    trainer.train()
    return timer.times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dataset = short_prompt_dataset(workdir)
        int4 = ours(dataset, workdir, args.steps, "--quant-type", "int4", "--group-size", "64")
        none = ours(dataset, workdir, args.steps, "--quant-type", "none")
        trl = trl_step_times(dataset, workdir, args.steps)
    median = {"train.py int4 g64": statistics.median(r["step_s"] for r in int4[1:]),
              "train.py none": statistics.median(r["step_s"] for r in none[1:]),
              "TRL GKDTrainer + torchao QAT int4 g64": statistics.median(trl[1:])}
    print(f"lambda 1, batch 4, prompts <= {MAX_PROMPT_TOKENS} tokens, 64 new tokens; median of {args.steps - 1} "
          f"steps after a warm-up; {torch.get_num_threads()} threads")
    for name, seconds in median.items():
        print(f"  {name:40s} {seconds:7.2f} s/step  {1 / seconds:.3f} steps/s")
    ours_s = median["train.py int4 g64"]
    print(f"  train.py int4 vs TRL:          {median['TRL GKDTrainer + torchao QAT int4 g64'] / ours_s:.2f}x "
          f"steps/s (target >= 2x)")
    print(f"  train.py int4 vs its own none: {median['train.py none'] / ours_s:.2f}x steps/s (target >= 0.85x)")
    shares = {k: statistics.median(r[k] / r["step_s"] for r in int4[1:])
              for k in ("generation_s", "teacher_forward_s", "student_forward_backward_s")}
    print("  train.py int4 step time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
