"""The baseline users would run instead: llm-compressor's one-shot quantization of qakd's teacher.

    uv run --project baselines python baselines/llmcompressor_gptq.py --scheme int4_sym_g64 \\
        --out dump/baselines/gptq_int4_sym_g64

Writes a compressed-tensors directory (llm-compressor's own ``save_pretrained``) that
``eval.py`` takes as a row. Runs in the ``baselines/`` uv project: llm-compressor pins torch,
transformers and compressed-tensors below the versions qakd uses.

Schemes (weights only, every ``Linear`` but ``lm_head``):

* ``int4_sym_g64``: INT4, symmetric, group-wise with groups of 64 (qakd's ``int4_sym``,
  ``--group-size 64``: SmolLM2-135M's hidden size 576 is not a multiple of 128);
* ``mxfp4``: llm-compressor's ``MXFP4A16`` preset (E2M1 values, E8M0 scales over blocks of 32).

Algorithms: ``gptq`` (``GPTQModifier``, its defaults) or ``awq`` (``AWQModifier`` smoothing,
then ``QuantizationModifier`` rounding: llm-compressor's documented AWQ recipe).

Calibration: the training split's prompts with the teacher's responses, chat template applied
and tokenized by qakd's own ``data.prepare_examples`` (the text the students train on),
truncated to ``--max-length`` tokens; all of them unless ``--samples N``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMES = ("int4_sym_g64", "mxfp4")
ALGORITHMS = ("gptq", "awq")


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def embedded_teacher() -> Path:
    """models._embedded_dir()'s path, without importing models.py (its GGUF loader needs
    packages this environment lacks)."""
    return Path(os.environ.get("QAKD_CACHE", Path.home() / ".cache" / "qakd")) / "smollm2-135m-instruct"


def scheme_of(name: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if name == "mxfp4":
        return preset_name_to_scheme("MXFP4A16", ["Linear"])
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))


def recipe_of(algorithm: str, scheme):
    config_groups = {"group_0": scheme}
    if algorithm == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=config_groups, ignore=["lm_head"])]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])]


def calibration_set(tokenizer, samples: int | None, max_length: int):
    """(tokenized dataset, token lengths): prompt + teacher response + EOS per record."""
    from datasets import Dataset

    sys.path.insert(0, str(REPO))
    from data import load_records, prepare_examples

    examples = prepare_examples(load_records(None, "train"), tokenizer, max_length=max_length)
    examples = examples[:samples] if samples else examples
    ids = [e.prompt_ids + e.completion_ids for e in examples]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}), [len(x) for x in ids]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", choices=SCHEMES, default="int4_sym_g64")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="gptq")
    p.add_argument("--out", required=True, help="the compressed-tensors directory to write (must not exist)")
    p.add_argument("--model", help="teacher directory (default: qakd's embedded SmolLM2-135M-Instruct)")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (default: all 344)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        import llmcompressor
        from llmcompressor import oneshot
    except ImportError:
        return fail("llm-compressor is not installed in this environment; run this script as `uv run --project "
                    "baselines python baselines/llmcompressor_gptq.py ...` (its own environment: baselines/README.md)")
    import compressed_tensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model) if args.model else embedded_teacher()
    if not (model_dir / "config.json").exists():
        return fail(f"no teacher at {model_dir}; make the embedded one first with `uv run python -c "
                    f"\"import models; models.load_model(None)\"` in the project, or pass --model DIR")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        return fail(f"--out {out} already exists; pass --overwrite")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, lengths = calibration_set(tokenizer, args.samples, args.max_length)
    print(f"calibration: {len(lengths)} sequences of the training split (prompt + teacher response), "
          f"max length {args.max_length}: {sum(lengths)} tokens, {min(lengths)}-{max(lengths)} per sequence "
          f"(mean {sum(lengths) / len(lengths):.0f})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe_of(args.algorithm, scheme_of(args.scheme)),
            dataset=dataset, num_calibration_samples=len(lengths), max_seq_length=args.max_length,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    print(f"{args.algorithm} {args.scheme}: {seconds:.0f} s on {len(lengths)} sequences", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(staging, save_compressed=True)
        tokenizer.save_pretrained(staging)
        (staging / "baseline.json").write_text(json.dumps({
            "tool": "llm-compressor", "algorithm": args.algorithm, "scheme": args.scheme, "teacher": str(model_dir),
            "calibration": {"dataset": "assets/instructions/train.jsonl", "sequences": len(lengths),
                            "max_length": args.max_length, "tokens": sum(lengths)},
            "seconds": round(seconds, 1), "device": str(next(model.parameters()).device),
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed-tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__}}, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
