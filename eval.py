"""Evaluate the teacher, the round-to-nearest baseline and trained students; print the table.

    uv run python eval.py dump/int4_lmbda1_beta0.5_lr5e-06 --limit 200 --data-dir ../shared/data/benchmarks
    uv run python eval.py RUN_A RUN_B --compare RUN_A RUN_B

Rows: ``teacher`` (full precision), ``ptq`` (the teacher's weights rounded to nearest with
the students' quantization settings: the baseline distillation must beat), then each
checkpoint, always evaluated with its quantized weights as rebuilt from the settings saved
in it. Tasks run through lm-evaluation-harness (zero-shot ``acc``, and ``acc_norm`` where
the task has it) on an in-memory model, the head run only where a request is scored
(``continuation_scoring_lm`` in harness.py: stock HFLM's scores, less arithmetic);
perplexity is lm-eval's ``wikitext`` task (word perplexity; each document is scored in
disjoint windows of ``--max-length`` tokens, every window after the first conditioned on
the one token before it, i.e. stride = max-length).

``--data-dir DIR`` reads every task from local copies in the Hugging Face schemas
(``DIR/<task>/<split>.jsonl``) through task configs that ``include`` lm-eval's own and
override only the data source. ``--embedded`` adds the no-benchmark signal on the
embedded held-out set: token-level KL(teacher || student) on teacher-forced reference
text, the teacher's NLL of the student's greedy completions, and the exposure-bias curve:
both measures on the student's own sampled continuations, by position (heldout.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from errors import BadInput
from harness import PERPLEXITY_TASK, TASKS, check_local_data, perplexity_batch_size, run_lm_eval
from heldout import EMBEDDED_VERSION, EXPOSURE_VERSION, embedded_eval, exposure_curve
from report import compare_rows, find_row, plot, render_curve, render_table
from students import load_student, resolve_checkpoint, student_settings

log = logging.getLogger("eval")


# ---------------------------------------------------------------- models to evaluate

def on_device(model, device: torch.device, dtype: torch.dtype):
    """``model`` on ``device``, computing in ``dtype``. Below float32 each fake-quantized layer
    first becomes a plain linear layer holding its quantized weight, computed from the
    float32 latent weight (MXFP4 values are exact in bfloat16; INT4 ones are rounded, as a
    W4A16 kernel with bfloat16 scales would round them): quantizing a rounded latent weight
    would give other 4-bit values than the student trained with. A W4A4 layer's plain
    replacement keeps fake-quantizing its input (``quantize_inputs``)."""
    from quant import FakeQuantLinear, quantize_inputs

    if dtype != torch.float32:
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
            plain = torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
            with torch.no_grad():
                quantized = layer.quantized_weight().detach()
            plain.weight = torch.nn.Parameter(quantized, requires_grad=False)
            plain.bias = layer.bias
            if layer.act_quant:
                quantize_inputs(plain, layer.quant_type)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model.to(device=device, dtype=dtype)


def free(device: torch.device) -> None:
    """Return a deleted model's memory: the caching allocator keeps it otherwise."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ptq_baseline(teacher, settings: dict):
    """Round-to-nearest: the teacher's weights under the same quantization, no training."""
    import copy

    from quant import quantize_model

    model = copy.deepcopy(teacher).float()
    quantize_model(model, settings["quant_type"], settings.get("group_size"), tuple(settings.get("skip", ("lm_head",))),
                   settings.get("scale_rule", "floor"), settings.get("act_quant", False))
    return model.eval()


# ---------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise BadInput(f"{message} (see eval.py --help)")


def _batch_size(text: str):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return int(text)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


DTYPES = ("float32", "bfloat16")
GREEDY_TOKENS = 64  # the greedy answers' length before --max-new-tokens: rows at it keep their cache keys
MAX_NEW_TOKENS = 4096  # --embedded's longest generation: the position buckets go to 4096


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="checkpoint-N directories or run directories (latest checkpoint)")
    p.add_argument("--model", help="teacher weights (default: the checkpoint's run_config model, else embedded)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--num-fewshot", "--num_fewshot", type=_at_least(0), default=0)
    p.add_argument("--limit", type=_at_least(1), default=None, help="items per task (documents for perplexity)")
    p.add_argument("--batch-size", "--batch_size", type=_batch_size, default=16,
                   help="an integer, or 'auto' (lm-eval's probe)")
    p.add_argument("--max-length", "--max_length", type=_at_least(1), default=2048, help="context window for lm-eval")
    p.add_argument("--data-dir", "--data_dir", help="local benchmark copies (DIR/<task>/<split>.jsonl)")
    p.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                   help="wikitext-2 word perplexity (default: on)")
    p.add_argument("--embedded", action=argparse.BooleanOptionalAction, default=False,
                   help="KL and teacher NLL on the embedded held-out set")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=_at_least(1), default=GREEDY_TOKENS,
                   help="--embedded: length of the greedy answers and of the sampled continuations")
    p.add_argument("--samples-per-prompt", "--samples_per_prompt", type=_at_least(0), default=2,
                   help="--embedded: sampled continuations per held-out prompt for the exposure-bias curve (0: none)")
    p.add_argument("--output-dir", "--output_dir", help="where results.md/json and the chart go "
                                                         "(default: <first checkpoint's run>/eval, or eval_results)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired test of row B against row A")
    p.add_argument("--no-cache", "--no_cache", action="store_true", help="re-evaluate teacher and ptq rows")
    p.add_argument("--device", help="where the models run: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="what the models compute in; bfloat16 halves their memory (big models)")
    return p


def parse_args(argv) -> argparse.Namespace:
    """eval.py's flags, each checked (tasks, files, device, output directory) without loading
    a model: train.py --do-eval and sweep.py --eval call this at their start."""
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BadInput(f"unknown task {', '.join(unknown)}; valid: {', '.join(TASKS)}")
    args.task_list = tasks
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens} is more than the held-out metrics generate "
                       f"({MAX_NEW_TOKENS} at most)")
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise BadInput(f"--data-dir {args.data_dir} is not a directory")
        check_local_data(Path(args.data_dir), tasks + ([PERPLEXITY_TASK] if args.perplexity else []))
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise BadInput(f"--output-dir {args.output_dir} is a file; name a directory")
    if args.model:
        from models import EMBEDDED_MODEL, resolve_model_source

        if args.model != EMBEDDED_MODEL:
            resolve_model_source(args.model)  # FileNotFoundError for a local path that is not there
    choose_device(args.device, torch.cuda.is_available())
    return args


def choose_device(requested: str | None, cuda_available: bool) -> torch.device:
    """The requested device, else the GPU when there is one. Models run there in float32,
    the precision the student trained in."""
    if requested is None:
        return torch.device("cuda" if cuda_available else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise BadInput(f"--device {requested!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not cuda_available:
        raise BadInput(f"--device {requested}: no CUDA device is visible here; use --device cpu")
    return device


def cached_result(key: str | None, compute, no_cache: bool = False) -> dict:
    """compute(), stored under ``key`` in the eval cache and read back next time (teacher and
    ptq rows: the same for every student of a sweep)."""
    from models import cache_dir

    path = cache_dir() / "eval" / "rows" / f"{key}.json" if key else None
    if path is not None and not no_cache and path.exists():
        log.info("using cached result %s", path)
        return json.loads(path.read_text())
    value = compute()
    if path is not None:  # written whole or not at all: a torn file would be read back next time
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(value))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return value


def evaluate_row(model, tokenizer, args, tasks, use_cache_key=None) -> dict:
    from quant import frozen_quant

    def compute() -> dict:
        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        runs = [(tasks, batch_size)] if tasks else []
        if args.perplexity:
            vocab = model.get_output_embeddings().weight.shape[0]
            runs.append(([PERPLEXITY_TASK], perplexity_batch_size(batch_size, args.max_length, vocab)))
        row = {}
        with torch.no_grad(), frozen_quant(model):  # quantize once for both passes
            for lm_tasks, lm_batch_size in runs:
                start = time.perf_counter()
                row.update(run_lm_eval(model, tokenizer, lm_tasks, args.data_dir, args.limit, args.num_fewshot,
                                       lm_batch_size, args.max_length))
                log.info("evaluated %s (batch size %s) in %.0f s", ", ".join(lm_tasks), lm_batch_size,
                         time.perf_counter() - start)
        return row

    return cached_result(use_cache_key, compute, args.no_cache)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(parse_args(argv))
    except (BadInput, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def ptq_rows(all_settings: list[dict]) -> dict[str, dict]:
    """{row name: the quantization settings it rounds the teacher with}, one per distinct
    setting among the students."""
    keys = []
    for settings in all_settings:
        key = {k: settings.get(k) for k in ("quant_type", "group_size", "scale_rule", "skip")}
        if settings.get("act_quant"):  # only then: a W4A16 row keeps the cache key it had
            key["act_quant"] = True
        if key not in keys:
            keys.append(key)
    return {("ptq" if len(keys) == 1 else f"ptq {key['quant_type']} g{key['group_size']}"
             f"{' w4a4' if key.get('act_quant') else ''}"): key for key in keys}


def student_row_name(checkpoint: Path) -> str:
    return checkpoint.parent.name + "/" + checkpoint.name if checkpoint.name.startswith("checkpoint-") \
        else checkpoint.name


def run(args) -> int:
    from models import load_model

    tasks = args.task_list
    device, dtype = choose_device(args.device, torch.cuda.is_available()), getattr(torch, args.dtype)
    # Everything that can be refused is refused before a model loads.
    checkpoints = [resolve_checkpoint(c) for c in args.checkpoints]
    ptq = ptq_rows([student_settings(c) for c in checkpoints])
    names = ["teacher", *ptq, *(student_row_name(c) for c in checkpoints)]
    compare = [find_row(names, name) for name in args.compare] if args.compare else None
    teacher_source = args.model
    if teacher_source is None and checkpoints:
        run_config = checkpoints[0] / "run_config.json"
        teacher_source = json.loads(run_config.read_text()).get("model") if run_config.exists() else None
    output_dir = Path(args.output_dir) if args.output_dir else (
        checkpoints[0].parent / "eval" if checkpoints else Path("eval_results"))
    if output_dir.exists() and not output_dir.is_dir():
        raise BadInput(f"output directory {output_dir} is a file; pass --output-dir")

    teacher, tokenizer = load_model(teacher_source)
    teacher = on_device(teacher.eval(), device, dtype)
    log.info("evaluating on %s in %s", device, args.dtype)
    source = str(Path(args.data_dir).resolve()) if args.data_dir else "hub"
    common = [teacher_source or "embedded", tasks, args.limit, args.num_fewshot, source, args.perplexity,
              args.max_length] + ([args.dtype] if args.dtype != "float32" else [])  # float32: the keys as before
    common_key = json.dumps(common, sort_keys=True)
    rows: dict[str, dict] = {}

    def key_of(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def embedded(name_key, model) -> dict:
        """The row's embedded metrics and exposure-bias curve, each cached under its own key
        (None: a student, not cached)."""
        dtype_part = [args.dtype] if args.dtype != "float32" else []
        length_part = [args.max_new_tokens] if args.max_new_tokens != GREEDY_TOKENS else []
        metrics = cached_result(
            name_key and key_of("embedded", EMBEDDED_VERSION, name_key, teacher_source or "embedded", args.limit,
                                *dtype_part, *length_part),
            lambda: embedded_eval(teacher, model, tokenizer, max_new_tokens=args.max_new_tokens, limit=args.limit),
            args.no_cache)
        if not args.samples_per_prompt:
            return {"embedded": metrics}
        curve = cached_result(
            # the device too: its random streams differ, and rows share seeds to be compared
            name_key and key_of("exposure", EXPOSURE_VERSION, name_key, teacher_source or "embedded", args.limit,
                                args.max_new_tokens, args.samples_per_prompt, *dtype_part,
                                next(model.parameters()).device.type),
            lambda: exposure_curve(teacher, model, tokenizer, max_new_tokens=args.max_new_tokens,
                                   samples_per_prompt=args.samples_per_prompt, limit=args.limit), args.no_cache)
        return {"embedded": metrics, "exposure": curve}

    rows["teacher"] = evaluate_row(teacher, tokenizer, args, tasks,
                                   hashlib.sha256(("teacher" + common_key).encode()).hexdigest()[:20])
    if args.embedded:
        rows["teacher"].update(embedded("teacher", teacher))
    for name, key in ptq.items():
        cache_key = hashlib.sha256((json.dumps(key, sort_keys=True) + common_key).encode()).hexdigest()[:20]
        model = on_device(ptq_baseline(teacher, key), device, dtype)
        rows[name] = evaluate_row(model, tokenizer, args, tasks, cache_key)
        if args.embedded:
            rows[name].update(embedded(key, model))
        del model
        free(device)
    for checkpoint in checkpoints:  # one student on the device at a time
        model = on_device(load_student(checkpoint)[0], device, dtype)
        name = student_row_name(checkpoint)
        rows[name] = evaluate_row(model, tokenizer, args, tasks)
        if args.embedded:
            rows[name].update(embedded(None, model))
        del model
        free(device)

    table = render_table(rows, tasks)
    curve = render_curve(rows)
    table += f"\n\n{curve}" if curve else ""
    comparison_lines = compare_rows(rows, tasks, *compare) if compare else []
    output_dir.mkdir(parents=True, exist_ok=True)
    report = table + ("\n\n" + "\n".join(comparison_lines) if comparison_lines else "") + "\n"
    (output_dir / "results.md").write_text(report)
    embedded_settings = {"embedded_max_new_tokens": args.max_new_tokens} if args.embedded else {}
    (output_dir / "results.json").write_text(json.dumps({"tasks": tasks, "limit": args.limit, "data": source,
                                                         **embedded_settings, "rows": rows}, indent=1))
    if tasks:
        plot(rows, tasks, output_dir / "results.png")
    print(report)
    print(f"written to {output_dir}/results.md, results.json, results.png")
    return 0




if __name__ == "__main__":
    sys.exit(main())
