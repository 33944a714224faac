"""vLLM serves export.py's compressed-tensors export as the student computes it.

    uv run python bench/vllm_check.py dump/run/checkpoint-100 --out /tmp/vllm_check
    uv run python bench/vllm_check.py --ptq mxfp4 --out /tmp/vllm_check   # the embedded model, rounded

Exports the student (compressed-tensors), has vLLM's offline ``LLM`` answer a few chat prompts
greedily with the logprob of every token it chose, then scores those tokens with the student
as ``students.load_student`` loads it (transformers, float32) and has the student answer the
same prompts greedily. Prints both answers, where they part, and how far the logprobs are
apart; fails when they are apart by more than ``--tolerance`` nats on average (a wrong
unpacking puts them nats apart).

vLLM is no dependency of qakd: ``VLLM_PYTHON`` names an interpreter that has it (default: this
one); vLLM runs in a process of its own. Where vLLM or a GPU is absent this prints one
``skip:`` line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about an old library.",
           "Give three tips for staying focused while studying.", "Explain what a prime number is."]
PROBE = ("import importlib.util, sys\n"
         "if importlib.util.find_spec('vllm') is None: sys.exit(3)\n"
         "import torch\n"
         "sys.exit(0 if torch.cuda.is_available() else 4)\n")


def engine(request_file: str, answer_file: str) -> None:
    """In the vLLM interpreter: greedy answers and the logprob of each chosen token."""
    import vllm
    from vllm import LLM, SamplingParams

    request = json.loads(Path(request_file).read_text())
    llm = LLM(model=request["model"], dtype=request["dtype"], gpu_memory_utilization=0.3, enforce_eager=True,
              max_model_len=2048, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], logprobs=1)
    answers = []
    for output in llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params):
        choice = output.outputs[0]
        answers.append({"tokens": list(choice.token_ids), "text": choice.text,
                        "logprobs": [lp[t].logprob for lp, t in zip(choice.logprobs, choice.token_ids)]})
    Path(answer_file).write_text(json.dumps({"vllm": vllm.__version__, "answers": answers}))


def ptq_student(quant_type: str, out: Path) -> Path:
    """The embedded model rounded to ``quant_type``, saved as a checkpoint export.py takes."""
    from eval import ptq_baseline
    from models import load_model

    teacher, tokenizer = load_model(None)
    student = ptq_baseline(teacher, {"quant_type": quant_type})
    checkpoint = out / f"ptq-{quant_type}"
    student.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


def compare(checkpoint: Path, answers: list[dict], prompts: list[list[int]], tolerance: float) -> None:
    import torch

    from students import load_student

    model, tokenizer, _ = load_student(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    gaps, same = [], 0
    for text, ids, answer in zip(PROMPTS, prompts, answers):
        tokens = answer["tokens"]
        with torch.no_grad():
            sequence = torch.tensor([ids + tokens], device=device)
            logits = model(sequence).logits[0, len(ids) - 1:-1].float()
            mine = torch.log_softmax(logits, -1).gather(-1, sequence[0, len(ids):, None])[:, 0].tolist()
            greedy = model.generate(torch.tensor([ids], device=device), max_new_tokens=len(tokens) or 1,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy = greedy[0, len(ids):].tolist()
        gap = [abs(a - b) for a, b in zip(answer["logprobs"], mine)]
        gaps += gap
        parted = next((i for i, (a, b) in enumerate(zip(tokens, greedy)) if a != b), None)
        same += parted is None and len(tokens) == len(greedy)
        print(f"-- {text}\n   vLLM:    {answer['text']!r}\n   student: {tokenizer.decode(greedy)!r}")
        print(f"   greedy answers {'agree' if parted is None else f'part at token {parted}'}; "
              f"|logprob difference| on vLLM's {len(tokens)} tokens: max {max(gap, default=0):.4f}, "
              f"mean {sum(gap) / max(len(gap), 1):.4f}")
    mean = sum(gaps) / max(len(gaps), 1)
    print(f"greedy answers identical on {same}/{len(prompts)} prompts; |logprob difference| over "
          f"{len(gaps)} tokens: mean {mean:.4f}, max {max(gaps, default=0):.4f} nats")
    if not gaps or mean > tolerance:
        sys.exit(f"FAILED: vLLM's logprobs are {mean:.4f} nats from the student's on average (tolerance {tolerance})")
    print(f"ok: vLLM serves the export as the student computes it (mean |logprob difference| {mean:.4f} "
          f"<= {tolerance})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a student checkpoint (checkpoint-N, or its run directory)")
    p.add_argument("--ptq", choices=["mxfp4", "int4_sym"], help="instead: the embedded model rounded to this")
    p.add_argument("--out", type=Path, help="where the export and vLLM's answers go (default: a new temporary "
                                            "directory)")
    p.add_argument("--dtype", default="bfloat16", help="vLLM's dtype (its MXFP4 Marlin kernel runs in bfloat16)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.5, help="largest mean |logprob difference|, nats")
    p.add_argument("--engine", nargs=2, metavar=("REQUEST", "ANSWER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine:
        engine(*args.engine)
        return 0
    if (args.checkpoint is None) == (args.ptq is None):
        p.error("give a checkpoint or --ptq (one of the two)")
    python = shlex.split(os.environ.get("VLLM_PYTHON", sys.executable))
    probe = subprocess.run([*python, "-c", PROBE], check=False).returncode
    if probe in (3, 4):
        print(f"skip: {'vLLM is not installed for' if probe == 3 else 'no GPU for vLLM in'} "
              f"{' '.join(python)} (set VLLM_PYTHON)")
        return 0
    if probe:
        sys.exit(f"FAILED: {' '.join(python)} could not be run (exit status {probe})")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import export
    from students import resolve_checkpoint

    out = args.out or Path(tempfile.mkdtemp(prefix="vllm_check-"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ptq_student(args.ptq, out) if args.ptq else resolve_checkpoint(args.checkpoint)
    exported = export.export(str(checkpoint), "compressed-tensors", out / "export", overwrite=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for text in PROMPTS]
    request, answer = out / "vllm_request.json", out / "vllm_answers.json"
    request.write_text(json.dumps({"model": str(exported), "dtype": args.dtype, "prompts": prompts,
                                   "max_new_tokens": args.max_new_tokens}))
    if subprocess.run([*python, __file__, "--engine", str(request), str(answer)], check=False).returncode:
        sys.exit(f"FAILED: vLLM did not serve {exported} (its log above)")
    result = json.loads(answer.read_text())
    print(f"vLLM {result['vllm']} ({args.dtype}) on {exported}, student {checkpoint} (float32):")
    compare(checkpoint, result["answers"], prompts, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
