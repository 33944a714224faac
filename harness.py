"""lm-evaluation-harness on a model already in memory: the benchmark tasks, their local copies, the run.

``run_lm_eval`` scores tasks through lm-eval's HFLM with the head run only where a request
is scored (``continuation_scoring_lm``); ``write_local_tasks`` writes task configs that
``include`` lm-eval's own and override only the data source, for local copies in the
Hugging Face schemas (``DIR/<task>/<split>.jsonl``); ``perplexity_batch_size`` keeps a
batch of wikitext windows within a memory budget.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch

from errors import BadInput

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


def tasks_cache() -> Path:
    """Where the local task configs are written (one folder per data directory and task list)."""
    from models import cache_dir

    return cache_dir() / "eval" / "tasks"


# ---------------------------------------------------------------- task configs over local data

def _lm_eval_task_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _require(path: Path, task: str) -> Path:
    if not path.exists():
        raise BadInput(f"--data-dir is missing {path} for task {task}; copy it there in the Hugging Face schema "
                       f"or drop the task with --tasks")
    return path


def check_local_data(data_dir: Path, tasks: list[str]) -> None:
    """Every file ``write_local_tasks`` will read for ``tasks`` is there (checked before any
    model loads)."""
    for task in tasks:
        folder, splits = LOCAL_DATA[task]
        for split in splits:
            _require(data_dir / folder / f"{split}.jsonl", task)


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
    out = tasks_cache() / key
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


def perplexity_batch_size(batch_size, max_length: int, vocab: int):
    """``batch_size`` capped so one batch of perplexity windows fits PERPLEXITY_LOGITS_BYTES."""
    if batch_size == "auto":
        return batch_size
    return max(1, min(batch_size, PERPLEXITY_LOGITS_BYTES // (2 * 4 * max_length * vocab)))
