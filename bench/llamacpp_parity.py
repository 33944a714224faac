"""The GGUF export of a trained MXFP4 student in llama.cpp itself, against the student
(docs/export.md): how far llama.cpp's kernels sit from the function the student computes,
calibrated on the teacher's own GGUF, and whether the export keeps its gain over
round-to-nearest in llama.cpp's perplexity.

Rows, on windows of wikitext-2 test pages (``--data-dir``, the shared benchmark copies):
* calibration: the embedded teacher's own GGUF (Q4_1) in llama.cpp against our float32
  dequantization of it: what llama.cpp's own arithmetic (activations rounded to 8 bits
  for its quantized dot products) costs on a file we did not write;
* the student's export and the round-to-nearest export (same scale rule) in llama.cpp,
  each against the float32 student it came from;
* KL(teacher || x) and the NLL a token of each, computed by llama.cpp and by us.

    uv sync --project llamacpp       # once: builds llama.cpp
    uv run python bench/llamacpp_parity.py dump/study/gptq_start_hour_large/initgptq_scale_rulemse_lmbda0_beta0_seed42/checkpoint-200 \
        --data-dir ../shared/data/benchmarks --out results/engines/llamacpp_parity.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines import kl_per_token, llama_cpp_score  # noqa: E402
from eval import ptq_baseline  # noqa: E402
from export import export, write_gguf  # noqa: E402
from models import embedded_gguf_path, load_model  # noqa: E402
from students import load_student, resolve_checkpoint  # noqa: E402


def wikitext_windows(data_dir: Path, tokenizer, windows: int, length: int) -> list[list[int]]:
    """The first ``windows`` windows of ``length`` tokens, one per page, from the test split."""
    pages = [json.loads(line)["page"] for line in (data_dir / "wikitext" / "test.jsonl").read_text().splitlines()]
    out = []
    for page in pages:
        ids = tokenizer(page, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == windows:
            return out
    raise SystemExit(f"only {len(out)} wikitext pages have {length} tokens")


def log_probs(model, sequences) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1).numpy() for s in sequences]


def nll(logprobs: list[np.ndarray], sequences) -> float:
    """Mean negative log-likelihood a token of each next token (the first token is not scored)."""
    total = [-lp[np.arange(len(s) - 1), s[1:]] for lp, s in zip(logprobs, sequences)]
    return float(np.concatenate(total).mean())


def mean_kl(reference, other) -> float:
    return float(np.concatenate([kl_per_token(r, o) for r, o in zip(reference, other)]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained MXFP4 student (train.py checkpoint) of the embedded teacher")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/benchmarks"))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(args.checkpoint)
    student, tokenizer, settings = load_student(checkpoint)
    teacher, _ = load_model(None)
    rtn = ptq_baseline(teacher, settings)
    sequences = wikitext_windows(args.data_dir, tokenizer, args.windows, args.length)
    ours = {"teacher": log_probs(teacher, sequences), "round-to-nearest": log_probs(rtn, sequences),
            "student": log_probs(student, sequences)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(str(checkpoint), "gguf", tmp / "student")
        (tmp / "rtn").mkdir()
        write_gguf(rtn, tokenizer, settings, {"model": None}, tmp / "rtn")
        files = {"teacher": embedded_gguf_path(), "round-to-nearest": tmp / "rtn" / "model.gguf",
                 "student": tmp / "student" / "model.gguf"}
        start = time.time()
        llama = {name: llama_cpp_score(path, sequences)["logprobs"] for name, path in files.items()}
        scored_s = time.time() - start
    rows = {}
    for name in ours:
        rows[name] = {
            "kl_ours_to_llama_cpp": mean_kl(ours[name], llama[name]),
            "kl_from_teacher_ours": mean_kl(ours["teacher"], ours[name]),
            "kl_from_teacher_llama_cpp": mean_kl(llama["teacher"], llama[name]),
            "nll_ours": nll(ours[name], sequences),
            "nll_llama_cpp": nll(llama[name], sequences),
        }
    result = {"checkpoint": str(checkpoint), "settings": settings, "windows": args.windows, "length": args.length,
              "tokens_scored": args.windows * (args.length - 1), "llama_cpp_seconds": round(scored_s, 1),
              "command": "uv run python " + " ".join(sys.argv), "rows": rows}
    print("| model | KL(ours ‖ llama.cpp) a token | KL(teacher ‖ it), ours | KL(teacher ‖ it), llama.cpp "
          "| NLL a token, ours | NLL a token, llama.cpp |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['kl_ours_to_llama_cpp']:.4f} | {r['kl_from_teacher_ours']:.4f} | "
              f"{r['kl_from_teacher_llama_cpp']:.4f} | {r['nll_ours']:.4f} | {r['nll_llama_cpp']:.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
