"""vLLM serves export.py's compressed-tensors export as the student computes it.

    uv run python bench/vllm_check.py dump/run/checkpoint-100 --out /tmp/vllm_check
    uv run python bench/vllm_check.py --ptq mxfp4 --out /tmp/vllm_check   # the embedded model, rounded
    uv run python bench/vllm_check.py --ptq nvfp4 --act-quant --out /tmp/vllm_check   # NVFP4 W4A4

Exports the student (compressed-tensors), has vLLM's offline ``LLM`` answer a few chat prompts
greedily with the logprob of every token it chose, then scores those tokens with the student
as ``students.load_student`` loads it (transformers, float32) and has the student answer the
same prompts greedily. Prints both answers, where they part, and how far the logprobs are
apart; fails when they are apart by more than ``--tolerance`` nats on average (0.5 unless
given; a wrong unpacking, or a fused layer's shard dequantized under another's NVFP4 global
scale, puts them nats apart: on the embedded model 34 of the 60 fused groups have layers whose
own tensor scales differ). Also prints the compressed-tensors scheme (and NVFP4 kernel) vLLM gave the layers,
and fails where vLLM's log says an NVFP4 fused layer's shards (q/k/v, gate/up) came with
different global scales: it keeps the largest, which is right only for the shards that have
it (its W4A4 scheme warns; its W4A16 one says nothing, which tests/test_export.py checks on
the CPU: every fused layer's global scales equal, and the fused weight vLLM builds from them
the student's bit for bit).

What vLLM runs (its compressed-tensors source): MXFP4 ``CompressedTensorsW4A16Mxfp4`` and
NVFP4 W4A16 ``CompressedTensorsW4A16Fp4``, both Marlin weight-only kernels (bfloat16
activations); NVFP4 W4A4 ``CompressedTensorsW4A4Fp4``, whose FP4 GEMMs (CUTLASS or FlashInfer)
need FP4 tensor cores (compute capability 10.0 and up). Elsewhere vLLM serves a W4A4 export
weight-only (Marlin: the activations unquantized) unless ``VLLM_USE_NVFP4_CT_EMULATIONS=1``,
which quantizes them in emulation; this sets it there, so the W4A4 numbers are W4A4's. The
activations are quantized under the export's static ``input_global_scale``, so a W4A4 export
is compared with itself as ``students.load_student`` runs it (its inputs quantized under those
scales, as eval.py does), not with the student's dynamic ones.

vLLM is no dependency of qakd: ``VLLM_PYTHON`` names an interpreter that has it (default: this
one); vLLM runs in a process of its own. Where vLLM or a GPU is absent this prints one
``skip:`` line and exits 0. Not run here (no GPU): the checks that can run on a CPU are
tests/test_export.py's.
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
# vLLM's warning where the shards of a fused NVFP4 layer hold different global scales
# (compressed-tensors' NVFP4 W4A4 scheme, process_weights_after_loading)
FUSED_SCALES_DIFFER = "global scale for input or weight are different"
FP4_TENSOR_CORES = (10, 0)  # cutlass_fp4_supported: Blackwell


def schemes(model) -> list[str]:
    """In vLLM's worker: the compressed-tensors scheme of each quantized layer, with its NVFP4
    GEMM backend where it has one."""
    found = set()
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            backend = getattr(getattr(scheme, "backend", None), "value", None)
            found.add(type(scheme).__name__ + (f" ({backend})" if backend else ""))
    return sorted(found)


def engine(request_file: str, answer_file: str) -> None:
    """In the vLLM interpreter: greedy answers and the logprob of each chosen token."""
    import torch

    request = json.loads(Path(request_file).read_text())
    activations = None
    if request["nvfp4_w4a4"]:  # without FP4 tensor cores vLLM would drop the activations' quantization
        native = torch.cuda.get_device_capability() >= FP4_TENSOR_CORES
        if not native:
            os.environ.setdefault("VLLM_USE_NVFP4_CT_EMULATIONS", "1")
        activations = ("FP4 tensor cores" if native else
                       f"VLLM_USE_NVFP4_CT_EMULATIONS={os.environ['VLLM_USE_NVFP4_CT_EMULATIONS']} (no FP4 tensor cores)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: schemes() reads it
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=request["model"], dtype=request["dtype"], gpu_memory_utilization=0.3, enforce_eager=True,
              max_model_len=2048, seed=0)
    try:
        found = sorted({s for worker in llm.apply_model(schemes) for s in worker})
    except Exception as e:  # an older or newer vLLM: the check goes on without it
        found = [f"unknown ({type(e).__name__}: {e})"]
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], logprobs=1)
    answers = []
    for output in llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params):
        choice = output.outputs[0]
        answers.append({"tokens": list(choice.token_ids), "text": choice.text,
                        "logprobs": [lp[t].logprob for lp, t in zip(choice.logprobs, choice.token_ids)]})
    Path(answer_file).write_text(json.dumps({"vllm": vllm.__version__, "answers": answers, "schemes": found,
                                             "activations": activations}))


def serve(python: list[str], request: Path, answer: Path) -> list[str]:
    """Run the engine in its own process, its log shown as it comes; returns the log's lines."""
    process = subprocess.Popen([*python, __file__, "--engine", str(request), str(answer)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait():
        sys.exit(f"FAILED: vLLM did not serve {json.loads(request.read_text())['model']} (its log above)")
    return lines


def ptq_student(quant_type: str, act_quant: bool, out: Path) -> Path:
    """The embedded model rounded to ``quant_type`` (``act_quant``: W4A4), saved as a
    checkpoint export.py takes."""
    from eval import ptq_baseline
    from models import load_model

    teacher, tokenizer = load_model(None)
    student = ptq_baseline(teacher, {"quant_type": quant_type, "act_quant": act_quant})
    checkpoint = out / f"ptq-{quant_type}{'-w4a4' if act_quant else ''}"
    student.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    return checkpoint


def compare(reference: Path, answers: list[dict], prompts: list[list[int]], tolerance: float) -> None:
    """vLLM's answers against those of ``reference`` (a checkpoint or an export) as
    ``students.load_student`` runs it."""
    import torch

    from students import load_student

    model, tokenizer, _ = load_student(reference)
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
    p.add_argument("--ptq", choices=["mxfp4", "nvfp4", "int4_sym"], help="instead: the embedded model rounded to this")
    p.add_argument("--act-quant", action="store_true", help="with --ptq mxfp4 or nvfp4: its inputs too (W4A4)")
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
    if args.act_quant and args.ptq not in ("mxfp4", "nvfp4"):
        p.error("--act-quant goes with --ptq mxfp4 or nvfp4 (a checkpoint says whether it is W4A4)")
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
    import students

    out = args.out or Path(tempfile.mkdtemp(prefix="vllm_check-"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = ptq_student(args.ptq, args.act_quant, out) if args.ptq else students.resolve_checkpoint(args.checkpoint)
    exported = export.export(str(checkpoint), "compressed-tensors", out / "export", overwrite=True)
    settings = json.loads((exported / "config.json").read_text())[students.EXPORT_KEY]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for text in PROMPTS]
    request, answer = out / "vllm_request.json", out / "vllm_answers.json"
    w4a4 = bool(settings.get("act_quant"))
    request.write_text(json.dumps({"model": str(exported), "dtype": args.dtype, "prompts": prompts,
                                   "max_new_tokens": args.max_new_tokens,
                                   "nvfp4_w4a4": w4a4 and settings["quant_type"] == "nvfp4"}))
    log = serve(python, request, answer)
    result = json.loads(answer.read_text())
    print(f"vLLM {result['vllm']}'s schemes: {', '.join(result['schemes']) or 'none'}"
          + (f"; W4A4 activations by {result['activations']}" if result["activations"] else ""))
    if any(FUSED_SCALES_DIFFER in line for line in log):
        sys.exit("FAILED: vLLM found different NVFP4 global scales among a fused layer's shards (its log above)")
    if result["activations"] and any("W4A16" in s or "marlin" in s for s in result["schemes"]):
        sys.exit("FAILED: vLLM served the NVFP4 W4A4 export weight-only (its activations unquantized)")
    # W4A4: the export as shipped, its inputs under the static scales vLLM reads
    reference = exported if w4a4 else checkpoint
    print(f"vLLM ({args.dtype}) on {exported}, against {reference} as students.load_student runs it (float32):")
    compare(reference, result["answers"], prompts, args.tolerance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
