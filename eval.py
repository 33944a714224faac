"""Evaluate the teacher, the round-to-nearest baseline and trained students; print the table.

    uv run python eval.py dump/int4_lmbda1_beta0.5_lr5e-06 --limit 200 --data-dir ../shared/data/benchmarks
    uv run python eval.py RUN_A RUN_B --compare RUN_A RUN_B

Rows: ``teacher`` (full precision), ``ptq`` (the teacher's weights rounded to nearest with
the students' quantization settings: the baseline distillation must beat), then each
checkpoint, always evaluated with its quantized weights as rebuilt from the settings saved
in it. Tasks run through lm-evaluation-harness (zero-shot ``acc``, and ``acc_norm`` where
the task has it) on an in-memory model, the head run only where a request is scored
(``continuation_scoring_lm``: stock HFLM's scores, less arithmetic); perplexity is
lm-eval's ``wikitext`` task (word perplexity; each document is scored in disjoint windows
of ``--max-length`` tokens, every window after the first conditioned on the one token
before it, i.e. stride = max-length).

``--data-dir DIR`` reads every task from local copies in the Hugging Face schemas
(``DIR/<task>/<split>.jsonl``) through task configs that ``include`` lm-eval's own and
override only the data source. ``--embedded`` adds the no-benchmark signal on the
embedded held-out set: token-level KL(teacher || student) on teacher-forced reference
text, and the teacher's NLL of the student's greedy completions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from errors import BadInput
from heldout import EMBEDDED_VERSION, embedded_eval

log = logging.getLogger("eval")

TASKS = ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "mmlu")
PERPLEXITY_TASK = "wikitext"
# Local layout: DIR/<task dir>/<split>.jsonl for each split lm-eval may read.
LOCAL_DATA = {
    "hellaswag": ("hellaswag", ("validation",)),
    "arc_easy": ("arc_easy", ("train", "validation", "test")),
    "arc_challenge": ("arc_challenge", ("train", "validation", "test")),
    "winogrande": ("winogrande", ("validation",)),
    "mmlu": ("mmlu", ("dev", "validation", "test")),
    "wikitext": ("wikitext", ("test",)),
}
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
LOCAL_PREFIX = "local_"
# lm-eval holds a batch's float32 logits and their log-softmax at once, [batch, length, vocab]
# each. Perplexity windows are all --max-length long, so their batch is capped to keep both
# within this budget (16 windows of 2048 tokens at SmolLM2's vocabulary would take 13 GB).
PERPLEXITY_LOGITS_BYTES = 2 * 2**30


def cache_root() -> Path:
    from models import cache_dir

    return cache_dir() / "eval"


# ---------------------------------------------------------------- task configs over local data

def _lm_eval_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _require(path: Path, task: str) -> Path:
    if not path.exists():
        raise BadInput(f"--data-dir is missing {path} for task {task}; copy it there in the Hugging Face schema "
                       f"or drop the task with --tasks")
    return path


def _yaml(config: dict) -> str:
    return json.dumps(config, indent=1)  # JSON is valid YAML and needs no escaping rules of its own


def _local_split_config(data_files: dict[str, str], splits: tuple[str, ...]) -> dict:
    """The data-source override: lm-eval's `json` builder on local files; splits that the
    local copy lacks are switched off rather than fetched."""
    config = {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": data_files}}
    for split, key in SPLIT_KEYS.items():
        if split not in splits:
            config[key] = None
    return config


def write_local_tasks(data_dir: Path, tasks: list[str]) -> tuple[Path, dict[str, str]]:
    """YAMLs that include lm-eval's task configs and override only the data source.

    Returns (include path for lm-eval's TaskManager, {our task name: lm-eval task name}).
    MMLU's single local file is split per subject (what `cais/mmlu` serves per config).
    """
    data_dir = Path(data_dir).resolve()
    key = hashlib.sha256(f"{data_dir}|{sorted(tasks)}".encode()).hexdigest()[:16]
    out = cache_root() / "tasks" / key
    out.mkdir(parents=True, exist_ok=True)
    upstream = _lm_eval_task_dir()
    names = {}
    for task in tasks:
        folder, splits = LOCAL_DATA[task]
        files = {s: str(_require(data_dir / folder / f"{s}.jsonl", task)) for s in splits}
        if task == "mmlu":
            names[task] = _write_local_mmlu(out, upstream, files)
            continue
        source = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                  "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml",
                  "wikitext": "wikitext/wikitext.yaml"}[task]
        config = {"include": str(upstream / source), "task": LOCAL_PREFIX + task, "tag": [],
                  **_local_split_config({s: files[s] for s in splits}, splits)}
        if task == "arc_challenge":  # upstream includes arc_easy.yaml and changes only the config name
            config["dataset_name"] = None
        (out / f"{LOCAL_PREFIX}{task}.yaml").write_text(_yaml(config))
        names[task] = LOCAL_PREFIX + task
    return out, names


def _write_local_mmlu(out: Path, upstream: Path, files: dict[str, str]) -> str:
    by_subject: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, path in files.items():
        with open(path) as f:
            for line in f:
                if line.strip():
                    by_subject[json.loads(line)["subject"]][split].append(line if line.endswith("\n") else line + "\n")
    subtasks = []
    for subject in sorted(by_subject):
        upstream_yaml = upstream / "mmlu" / "default" / f"mmlu_{subject}.yaml"
        if not upstream_yaml.exists():
            raise BadInput(f"mmlu subject {subject!r} in the local data is not an lm-eval mmlu task")
        subject_files = {}
        for split, lines in by_subject[subject].items():
            path = out / "mmlu" / subject / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines))
            subject_files[split] = str(path)
        config = {"include": str(upstream_yaml), "task": f"{LOCAL_PREFIX}mmlu_{subject}", "tag": [],
                  **_local_split_config(subject_files, tuple(subject_files))}
        config["dataset_kwargs"]["data_files"] = subject_files
        (out / f"{LOCAL_PREFIX}mmlu_{subject}.yaml").write_text(_yaml(config))
        subtasks.append(f"{LOCAL_PREFIX}mmlu_{subject}")
    # Upstream's group nests stem/other/...; one level weighted by size gives the same mean.
    group = {"group": f"{LOCAL_PREFIX}mmlu", "task": subtasks,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    (out / f"{LOCAL_PREFIX}mmlu_group.yaml").write_text(_yaml(group))
    return f"{LOCAL_PREFIX}mmlu"


# ---------------------------------------------------------------- running lm-eval

_continuation_lm_class = None


def continuation_scoring_lm(**hflm_kwargs):
    """lm-eval's HFLM, except that the head and log-softmax run only at the positions a request
    scores. Stock HFLM computes them at every position of every request ([batch, length,
    vocabulary] floats) and then keeps the continuation's few; MMLU's continuation is one token.
    Batches, padding and the body's forward are stock HFLM's, so the scores are the same."""
    global _continuation_lm_class
    if _continuation_lm_class is None:
        import inspect

        import torch.nn.functional as F
        from lm_eval.models.huggingface import HFLM
        from lm_eval.models.utils import Collator

        class ContinuationScoringHFLM(HFLM):
            def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                takes_positions = "logits_to_keep" in inspect.signature(self.model.forward).parameters
                if self.backend != "causal" or self.batch_size == "auto" or not takes_positions:
                    return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
                # The order and grouping stock HFLM uses: longest first, one forward for the
                # requests that share context + continuation[:-1] (one-token answers of a question).
                ordered = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                                   group_by="contexts" if self.logits_cache else None,
                                   group_fn=lambda r: r[1] + r[2][:-1])
                scores = []
                for chunk in ordered.get_batched(n=self.batch_size):
                    windows = [(context + continuation)[-(self.max_length + 1):][:-1]
                               for _, context, continuation in chunk]
                    ids = torch.zeros(len(chunk), max(map(len, windows)), dtype=torch.long, device=self.device)
                    scored = []  # per request: the input positions whose next-token scores it uses
                    for row, (window, (_, _, continuation)) in enumerate(zip(windows, chunk)):
                        ids[row, :len(window)] = torch.tensor(window, dtype=torch.long)
                        scored.append(range(len(window) - len(continuation), len(window)))
                    positions = sorted({p for span in scored for p in span})
                    column = {p: i for i, p in enumerate(positions)}
                    keep = 0 if len(positions) == ids.shape[1] else torch.tensor(positions, device=self.device)
                    mixed = getattr(self, "mixed_precision_dtype", None)
                    with torch.no_grad(), torch.autocast(self.device.type, dtype=mixed, enabled=mixed is not None):
                        logits = self.model(ids, logits_to_keep=keep).logits
                    logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                    for row, ((request, context, continuation), span) in enumerate(zip(chunk, scored)):
                        picked = logprobs[row, [column[p] for p in span]].unsqueeze(0)
                        greedy = picked.argmax(dim=-1)
                        for request, continuation, picked in ordered.get_cache(
                                req_str=request, cxt_toks=context, cont_toks=continuation, logits=picked):
                            target = torch.tensor(continuation, dtype=torch.long, device=self.device).unsqueeze(0)
                            exact = bool((greedy[:, -target.shape[1]:] == target).all())
                            score = (float(torch.gather(picked, 2, target.unsqueeze(-1)).sum()), exact)
                            scores.append(score)
                            if request is not None:
                                self.cache_hook.add_partial("loglikelihood", request, score)
                return ordered.get_original(scores)

        _continuation_lm_class = ContinuationScoringHFLM
    return _continuation_lm_class(**hflm_kwargs)


def lm_eval_output(lm, tasks: list[str], data_dir, limit, num_fewshot) -> tuple[dict, dict[str, str]]:
    """lm-eval's output for `tasks` (with every sample) and the task names it ran them under."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if data_dir:
        include, names = write_local_tasks(Path(data_dir), tasks)
        manager = TaskManager(include_path=str(include))
    else:
        names, manager = {t: t for t in tasks}, TaskManager()
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=num_fewshot,
                                         limit=limit, log_samples=True, task_manager=manager, bootstrap_iters=1000)
    except (ConnectionError, OSError) as e:
        if data_dir:
            raise
        raise BadInput(f"could not fetch a benchmark from the Hugging Face hub ({type(e).__name__}); pass "
                       f"--data-dir with local copies (layout: DIR/<task>/<split>.jsonl)") from e
    return output, names


def run_lm_eval(model, tokenizer, tasks: list[str], data_dir, limit, num_fewshot, batch_size, max_length) -> dict:
    """{task: {"acc": ..., "acc_stderr": ..., ["acc_norm", "acc_norm_stderr"], "items": [0/1 per doc]}} and,
    for wikitext, {"word_perplexity": ...}."""
    lm = continuation_scoring_lm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    output, names = lm_eval_output(lm, tasks, data_dir, limit, num_fewshot)
    results = {}
    for task, name in names.items():
        metrics = output["results"][name]
        row = {}
        for metric in ("acc", "acc_norm", "word_perplexity"):
            if f"{metric},none" in metrics:
                row[metric] = metrics[f"{metric},none"]
                stderr = metrics.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        sample_keys = sorted(k for k in output["samples"] if k == name or k.startswith(name + "_"))
        items = []
        for key in sample_keys:
            items += [s["acc"] for s in sorted(output["samples"][key], key=lambda s: s["doc_id"]) if "acc" in s]
        if items:
            row["items"] = items
        results[task] = row
    return results


# ---------------------------------------------------------------- models to evaluate

EXPORT_KEY = "qakd_quantization"  # export.py's record of the student's settings


def student_settings(checkpoint: Path) -> dict:
    """The quantization settings a student row is evaluated with, read without loading its
    weights (so that a bad checkpoint is refused before any model loads)."""
    from quant import CONFIG_KEY

    from export import GGUF_FILE

    if (checkpoint / GGUF_FILE).exists() and not (checkpoint / "config.json").exists():
        import gguf

        field = gguf.GGUFReader(checkpoint / GGUF_FILE).fields.get("qakd.quantization")
        if field is None:
            raise BadInput(f"{checkpoint / GGUF_FILE} was not written by export.py (no qakd.quantization field)")
        return json.loads(field.contents())
    if not (checkpoint / "config.json").exists():
        raise BadInput(f"{checkpoint} is not a checkpoint (no config.json); pass a checkpoint-N directory "
                       f"or a run directory that holds one")
    config = json.loads((checkpoint / "config.json").read_text())
    if EXPORT_KEY in config:
        return config[EXPORT_KEY]
    if is_foreign_compressed_tensors(config):  # another tool's (llm-compressor): read off its scheme
        return compressed_tensors_settings(config["quantization_config"], checkpoint)
    if not config.get(CONFIG_KEY):
        raise BadInput(f"{checkpoint} has no quantization settings ('{CONFIG_KEY}' in config.json); it is not a "
                       f"student saved by train.py with --quant-type mxfp4/int4/int4_sym")
    return config[CONFIG_KEY]


def is_foreign_compressed_tensors(config: dict) -> bool:
    """A compressed-tensors checkpoint that another tool (llm-compressor) wrote."""
    from quant import CONFIG_KEY

    return EXPORT_KEY not in config and not config.get(CONFIG_KEY) and "quantization_config" in config


def load_student(checkpoint: Path):
    """A saved student rebuilt with its recorded quantization (what deploys), or a
    compressed-tensors export of one, loaded as it ships; also a compressed-tensors
    checkpoint another tool wrote (llm-compressor's baselines), its settings read off its scheme."""
    from models import load_model
    from quant import quantize_model_from_settings

    from export import GGUF_FILE

    settings = student_settings(checkpoint)
    if (checkpoint / GGUF_FILE).exists() and not (checkpoint / "config.json").exists():
        # export.py's GGUF directory: transformers dequantizes it (gguf-py) to float32
        model, tokenizer = load_model(checkpoint / GGUF_FILE)
        return model.eval(), tokenizer, settings
    config = json.loads((checkpoint / "config.json").read_text())
    if EXPORT_KEY in config or is_foreign_compressed_tensors(config):
        # a compressed-tensors directory (export.py's or another tool's): the 4-bit weights as they ship
        from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(  # unpacked by compressed-tensors, in float32
            checkpoint, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
        return model.eval(), AutoTokenizer.from_pretrained(checkpoint), settings
    model, tokenizer = load_model(checkpoint)
    quantize_model_from_settings(model, settings)
    return model.eval(), tokenizer, settings


def on_device(model, device: torch.device, dtype: torch.dtype):
    """``model`` on ``device``, computing in ``dtype``. Below float32 each fake-quantized layer
    first becomes a plain linear layer holding its quantized weight, computed from the
    float32 latent weight (MXFP4 values are exact in bfloat16; INT4 ones are rounded, as a
    W4A16 kernel with bfloat16 scales would round them): quantizing a rounded latent weight
    would give other 4-bit values than the student trained with."""
    from quant import FakeQuantLinear, fake_quantize

    if dtype != torch.float32:
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
            plain = torch.nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
            with torch.no_grad():
                quantized = fake_quantize(layer.latent_weight(), layer.quant_type, layer.group_size, layer.scale_rule)
            plain.weight = torch.nn.Parameter(quantized, requires_grad=False)
            plain.bias = layer.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model.to(device=device, dtype=dtype)


def free(device: torch.device) -> None:
    """Return a deleted model's memory: the caching allocator keeps it otherwise."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compressed_tensors_settings(quantization: dict, checkpoint: Path) -> dict:
    """Our settings for a compressed-tensors checkpoint another tool wrote (llm-compressor):
    they name its row's format and build its ``ptq`` row. Only what our students can be is
    taken: 4-bit weight-only, symmetric, group-wise INT (``int4_sym``) or MXFP4, one scheme for
    every quantized layer, skipped layers by name; anything else is refused in one line."""
    def refuse(why: str):
        raise BadInput(f"{checkpoint}: its compressed-tensors quantization {why}; it has no qakd equivalent "
                       f"(4-bit weight-only, symmetric, group-wise int4_sym or mxfp4)")

    if quantization.get("quant_method") != "compressed-tensors":
        refuse(f"method is {quantization.get('quant_method')!r}, not compressed-tensors")
    if quantization.get("kv_cache_scheme") or quantization.get("sparsity_config") or \
            quantization.get("transform_config"):
        refuse("has a KV-cache scheme, sparsity or transforms")
    found = set()
    for group in (quantization.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            refuse("quantizes activations")
        if any(str(t).startswith("re:") for t in group.get("targets", [])):
            refuse(f"targets layers by pattern ({group['targets']})")
        if (weights.get("num_bits"), weights.get("strategy")) != (4, "group") or not weights.get("symmetric"):
            refuse(f"is {weights.get('num_bits')}-bit {weights.get('strategy')}-wise"
                   f"{'' if weights.get('symmetric') else ' asymmetric'}")
        if weights.get("type") == "int":
            found.add(("int4_sym", weights.get("group_size")))
        elif weights.get("type") == "float" and weights.get("group_size") == 32 and \
                "uint8" in str(weights.get("scale_dtype")):
            found.add(("mxfp4", None))
        else:
            refuse(f"is a 4-bit {weights.get('type')} format with groups of {weights.get('group_size')} and "
                   f"{weights.get('scale_dtype')} scales")
    if len(found) != 1:
        refuse("uses no scheme or several" if not found else f"mixes schemes {sorted(map(str, found))}")
    ignore = quantization.get("ignore") or []
    if any(str(name).startswith("re:") for name in ignore):
        refuse(f"skips layers by pattern ({ignore})")
    (quant_type, group_size), = found
    # MXFP4 scales were chosen by the tool; the ptq row rounds with the spec's floor rule
    return {"quant_type": quant_type, "group_size": group_size, "scale_rule": "floor", "skip": list(ignore)}


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or the latest checkpoint-N of a run directory."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"checkpoint {path} does not exist")
    from export import GGUF_FILE

    if (p / "config.json").exists() or (p / GGUF_FILE).exists():
        return p
    from checkpoints import latest_checkpoint

    latest = latest_checkpoint(p)
    if latest is None:
        raise BadInput(f"{path} holds no checkpoint (config.json or checkpoint-N/)")
    return latest


def ptq_baseline(teacher, settings: dict):
    """Round-to-nearest: the teacher's weights under the same quantization, no training."""
    import copy

    from quant import quantize_model

    model = copy.deepcopy(teacher).float()
    quantize_model(model, settings["quant_type"], settings.get("group_size"), tuple(settings.get("skip", ("lm_head",))),
                   settings.get("scale_rule", "floor"))
    return model.eval()


# ---------------------------------------------------------------- statistics and the table

def paired_comparison(a: list[float], b: list[float], seed: int = 0, resamples: int = 10_000) -> dict:
    """B - A on the same items: mean difference in points, a paired bootstrap 95% CI, and
    McNemar's exact two-sided p-value on the discordant pairs."""
    if len(a) != len(b) or not a:
        raise BadInput(f"cannot pair {len(a)} items with {len(b)}: evaluate both with the same tasks and --limit")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    b_only, a_only = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1)) / 2**discordant if discordant else 1.0
    return {"diff": 100 * sum(diffs) / n, "ci_low": 100 * means[int(0.025 * resamples)],
            "ci_high": 100 * means[int(0.975 * resamples) - 1], "p_value": min(1.0, 2 * tail), "n": n,
            "a_only": a_only, "b_only": b_only}


def verdict(name_a: str, name_b: str, stats: dict, alpha: float = 0.05) -> str:
    half = (stats["ci_high"] - stats["ci_low"]) / 2
    if stats["p_value"] >= alpha:
        return (f"no significant difference ({name_b} - {name_a} = {stats['diff']:+.2f} +- {half:.2f} points, "
                f"p = {stats['p_value']:.2g}, n = {stats['n']})")
    better, worse = (name_b, name_a) if stats["diff"] > 0 else (name_a, name_b)
    return f"{better} better than {worse} by {abs(stats['diff']):.2f} +- {half:.2f} points, p = {stats['p_value']:.2g}"


def average(row: dict, tasks: list[str]) -> float | None:
    values = [row[t]["acc"] for t in tasks if t in row and "acc" in row[t]]
    return sum(values) / len(values) if len(values) == len(tasks) and values else None


def gap_closed(value, teacher, ptq) -> float | None:
    """(value - ptq) / (teacher - ptq): 0 at round-to-nearest, 1 at the teacher, whichever
    direction the metric improves in; None where a value is missing or there is no gap."""
    if value is None or teacher is None or ptq is None or teacher == ptq:
        return None
    return (value - ptq) / (teacher - ptq)


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction:.0%}"


def render_table(rows: dict[str, dict], tasks: list[str]) -> str:
    """One line per row: accuracies with standard errors, their average, perplexity and the
    embedded metrics, each followed by the fraction of the ptq -> teacher gap it closed."""
    def cell(result, metric="acc"):
        if not result or metric not in result:
            return "–"
        stderr = result.get(f"{metric}_stderr")
        return f"{result[metric]:.3f} ± {stderr:.3f}" if stderr is not None else f"{result[metric]:.3f}"

    def ppl(row):
        return row.get(PERPLEXITY_TASK, {}).get("word_perplexity")

    teacher, ptq = rows.get("teacher", {}), rows.get("ptq", {})
    extra = sorted({k for row in rows.values() for k in row.get("embedded", {})})
    header = ["model", *tasks, "avg", "gap closed", "ppl", "ppl gap closed"]
    header += [h for k in extra for h in (k, f"{k} gap closed")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        avg = average(row, tasks)
        cells = [name, *(cell(row.get(t)) for t in tasks), "–" if avg is None else f"{avg:.3f}",
                 _percent(gap_closed(avg, average(teacher, tasks), average(ptq, tasks))),
                 "–" if ppl(row) is None else f"{ppl(row):.2f}", _percent(gap_closed(ppl(row), ppl(teacher), ppl(ptq)))]
        for k in extra:
            value = row.get("embedded", {}).get(k)
            cells += ["–" if value is None else f"{value:.4f}",
                      _percent(gap_closed(value, teacher.get("embedded", {}).get(k), ptq.get("embedded", {}).get(k)))]
        lines.append("| " + " | ".join(cells) + " |")
    norm = [t for t in tasks if any("acc_norm" in row.get(t, {}) for row in rows.values())]
    if norm:
        lines += ["", "acc_norm: " + "; ".join(
            f"{name}: " + ", ".join(f"{t} {cell(row.get(t), 'acc_norm')}" for t in norm) for name, row in rows.items())]
    return "\n".join(lines)


def plot(rows: dict[str, dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    width = 0.8 / max(len(rows), 1)
    for i, (name, row) in enumerate(rows.items()):
        values = [row.get(t, {}).get("acc", 0.0) for t in tasks]
        errors = [row.get(t, {}).get("acc_stderr") or 0.0 for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("acc")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise BadInput(f"--data-dir {args.data_dir} is not a directory")
        for task in tasks + ([PERPLEXITY_TASK] if args.perplexity else []):
            folder, splits = LOCAL_DATA[task]
            for split in splits:
                _require(Path(args.data_dir) / folder / f"{split}.jsonl", task)
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


def perplexity_batch_size(batch_size, max_length: int, vocab: int):
    """``batch_size`` capped so one batch of perplexity windows fits PERPLEXITY_LOGITS_BYTES."""
    if batch_size == "auto":
        return batch_size
    return max(1, min(batch_size, PERPLEXITY_LOGITS_BYTES // (2 * 4 * max_length * vocab)))


def cached_result(key: str | None, compute, no_cache: bool = False) -> dict:
    """compute(), stored under ``key`` in the eval cache and read back next time (teacher and
    ptq rows: the same for every student of a sweep)."""
    path = cache_root() / "rows" / f"{key}.json" if key else None
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
        if key not in keys:
            keys.append(key)
    return {("ptq" if len(keys) == 1 else f"ptq {key['quant_type']} g{key['group_size']}"): key for key in keys}


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
    compare = [_row_name(names, name) for name in args.compare] if args.compare else None
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
        dtype_part = [args.dtype] if args.dtype != "float32" else []
        return cached_result(key_of("embedded", EMBEDDED_VERSION, name_key, teacher_source or "embedded", args.limit,
                                    *dtype_part),
                             lambda: embedded_eval(teacher, model, tokenizer, limit=args.limit), args.no_cache)

    rows["teacher"] = evaluate_row(teacher, tokenizer, args, tasks,
                                   hashlib.sha256(("teacher" + common_key).encode()).hexdigest()[:20])
    if args.embedded:
        rows["teacher"]["embedded"] = embedded("teacher", teacher)
    for name, key in ptq.items():
        cache_key = hashlib.sha256((json.dumps(key, sort_keys=True) + common_key).encode()).hexdigest()[:20]
        model = on_device(ptq_baseline(teacher, key), device, dtype)
        rows[name] = evaluate_row(model, tokenizer, args, tasks, cache_key)
        if args.embedded:
            rows[name]["embedded"] = embedded(key, model)
        del model
        free(device)
    for checkpoint in checkpoints:  # one student on the device at a time
        model = on_device(load_student(checkpoint)[0], device, dtype)
        name = student_row_name(checkpoint)
        rows[name] = evaluate_row(model, tokenizer, args, tasks)
        if args.embedded:
            rows[name]["embedded"] = embedded_eval(teacher, model, tokenizer, limit=args.limit)
        del model
        free(device)

    table = render_table(rows, tasks)
    comparison_lines = compare_rows(rows, tasks, *compare) if compare else []
    output_dir.mkdir(parents=True, exist_ok=True)
    report = table + ("\n\n" + "\n".join(comparison_lines) if comparison_lines else "") + "\n"
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(json.dumps({"tasks": tasks, "limit": args.limit, "data": source,
                                                         "rows": rows}, indent=1))
    if tasks:
        plot(rows, tasks, output_dir / "results.png")
    print(report)
    print(f"written to {output_dir}/results.md, results.json, results.png")
    return 0


def _row_name(rows, name: str) -> str:
    """The row (of the names in ``rows``) that a --compare name means."""
    if name in rows:
        return name
    matches = [r for r in rows if r.startswith(Path(name).name) or Path(name).name in r]
    if len(matches) != 1:
        raise BadInput(f"--compare: no single row named {name!r}; rows are {', '.join(rows)}")
    return matches[0]


def compare_rows(rows: dict, tasks: list[str], a: str, b: str) -> list[str]:
    a, b = _row_name(rows, a), _row_name(rows, b)
    lines = [f"paired comparison, {b} vs {a} (bootstrap 95% CI, McNemar exact p):"]
    for task in tasks:
        items_a, items_b = rows[a].get(task, {}).get("items"), rows[b].get(task, {}).get("items")
        if not items_a or not items_b:
            lines.append(f"- {task}: no per-item results to pair")
            continue
        lines.append(f"- {task}: {verdict(a, b, paired_comparison(items_a, items_b))}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
