"""Prompts and completions for distillation: loading, schema detection, tokenization, batches.

Accepted schemas (a hub dataset name, or a local .json/.jsonl/.parquet file):

* ``messages``: a chat. The prompt is the conversation up to the last assistant turn,
  rendered with the tokenizer's chat template and its generation prompt; the completion
  is that last assistant turn (plus EOS).
* ``prompt`` / ``completion``: strings used as they are, or lists of chat messages
  rendered like ``messages``.
* ``text``: plain text, split in two: the first half of its tokens (at most half of
  ``max_length``) is the prompt, the rest the completion.

The default is the embedded instruction set in ``assets/instructions`` (382 prompts over
writing, QA, reasoning, math and code, with responses by the embedded teacher; made by
``assets/make_instructions.py``) with a held-out split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from losses import IGNORE_INDEX

log = logging.getLogger(__name__)

EMBEDDED_DATASET = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "instructions"
SCHEMAS = ("messages", "prompt/completion", "text")


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]


def load_records(dataset: str | None, split: str = "train") -> list[dict]:
    """Rows of a dataset as dicts: the embedded set, a local file, or a hub dataset.
    Every row is checked against its schema: a bad one is an error naming the file and line."""
    name = dataset or EMBEDDED_DATASET
    if name == EMBEDDED_DATASET:
        path = EMBEDDED_DIR / f"{'heldout' if split in ('heldout', 'test', 'validation') else 'train'}.jsonl"
        return read_json_records(path)
    path = Path(name).expanduser()
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.exists():
            raise FileNotFoundError(f"dataset file {name!r} does not exist")
        if path.suffix == ".parquet":
            import datasets

            return checked_records(list(datasets.load_dataset("parquet", data_files=str(path), split="train")),
                                   lambda i: f"dataset file {path} row {i}")
        return read_json_records(path)
    if path.exists():
        raise ValueError(f"dataset {name!r}: expected a .json, .jsonl or .parquet file or a hub dataset name")
    import datasets

    try:
        records = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        raise ConnectionError(f"could not load dataset {name!r} split {split!r} from the hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); pass a local .jsonl file instead") from e
    # Kept as the memory-mapped dataset (tulu-3 is ~939k conversations): rows are read, checked
    # and tokenized only when a run draws them (``examples_in_use_order``).
    return HubRows(records, f"dataset {name} split {split}")


class HubRows:
    """A hub dataset's rows as a sequence of dicts, each checked against the schema of the
    first when read."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name
        self.schema = detect_schema(dataset[0]) if len(dataset) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        record = self.dataset[i]
        problem = record_problem(record, self.schema)
        if problem:
            raise ValueError(f"{self.name} row {i}: {problem}")
        return record


def read_json_records(path: Path) -> list[dict]:
    """A .jsonl file (one JSON object per line; blank lines skipped) or a .json file holding
    a list of objects (or JSON lines), checked by ``checked_records`` with the real line
    numbers."""
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"dataset file {path} is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {path} line {e.lineno} is not valid JSON ({e.msg})") from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"dataset file {path} record {bad} is not a JSON object")
        return checked_records(records, lambda i: f"dataset file {path} record {i}")
    records, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {path} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"dataset file {path} line {number} is not a JSON object")
        records.append(record)
        numbers.append(number)
    return checked_records(records, lambda i: f"dataset file {path} line {numbers[i]}")


def _chat_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "a non-empty list of {role, content} messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "a list of messages, each with a string 'role' and a string 'content'"
    return None


def record_problem(record: dict, schema: str) -> str | None:
    """What is wrong with a record of ``schema``, or None."""
    if schema == "messages":
        field, problem = "messages", _chat_problem(record.get("messages"))
    elif schema == "prompt/completion":
        field, problem = next(((f, f"a string or {_chat_problem(record.get(f))}") for f in ("prompt", "completion")
                               if not isinstance(record.get(f), str) and _chat_problem(record.get(f))),
                              (None, None))
    else:
        field, problem = "text", None if isinstance(record.get("text"), str) else "a string"
    return problem and f"'{field}' must be {problem}, got {record.get(field)!r:.60}"


def checked_records(records: list[dict], where) -> list[dict]:
    """The records, each checked against the schema of the first (``where(i)`` names row i)."""
    if not records:
        return records
    schema = detect_schema(records[0])
    for i, record in enumerate(records):
        problem = record_problem(record, schema)
        if problem:
            raise ValueError(f"{where(i)}: {problem}")
    return records


def detect_schema(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt/completion"
    if "text" in record:
        return "text"
    raise ValueError(f"dataset has none of the known columns (messages | prompt + completion | text); "
                     f"its columns are {sorted(record)}")


def _render_chat(tokenizer, messages) -> str:
    if tokenizer.chat_template is None:
        raise ValueError("the dataset is a chat but the tokenizer has no chat template; use prompt/completion text")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def to_example(record: dict, schema: str, tokenizer, max_length: int) -> Example:
    eos = [tokenizer.eos_token_id]
    if schema == "messages":
        messages = record["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:  # a prompt-only chat: fine for on-policy rollouts
            return Example(_encode(tokenizer, _render_chat(tokenizer, messages)), [])
        prompt = _render_chat(tokenizer, messages[:last])
        return Example(_encode(tokenizer, prompt), _encode(tokenizer, messages[last]["content"]) + eos)
    if schema == "prompt/completion":
        prompt, completion = record["prompt"], record["completion"]
        prompt_text = _render_chat(tokenizer, prompt) if isinstance(prompt, list) else prompt
        completion_text = completion[-1]["content"] if isinstance(completion, list) else completion
        return Example(_encode(tokenizer, prompt_text), _encode(tokenizer, completion_text) + eos)
    ids = _encode(tokenizer, record["text"])
    cut = min(len(ids) // 2, max_length // 2)
    return Example(ids[:cut], ids[cut:])


class _Usable:
    """Tokenize one record, truncated to ``max_length``, or None if a run cannot use it;
    counts why records were dropped."""

    def __init__(self, schema, tokenizer, max_length, min_completion_tokens, need_completions):
        self.settings = (schema, tokenizer, max_length, min_completion_tokens, need_completions)
        self.dropped = {"empty prompt": 0, "no completion": 0, "prompt too long": 0}

    def __call__(self, record: dict) -> Example | None:
        schema, tokenizer, max_length, min_completion_tokens, need_completions = self.settings
        example = to_example(record, schema, tokenizer, max_length)
        why = ("empty prompt" if not example.prompt_ids else
               "no completion" if need_completions and not example.completion_ids else
               "prompt too long" if len(example.prompt_ids) + min_completion_tokens > max_length else None)
        if why:
            self.dropped[why] += 1
            return None
        return Example(example.prompt_ids, example.completion_ids[: max_length - len(example.prompt_ids)])

    def report(self, kept: int, read: int) -> None:
        """Filtered samples are counted and logged, never fatal; none left is an error."""
        if any(self.dropped.values()):
            log.warning("kept %d of %d samples (%s)", kept, read,
                        ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n))
        if not kept:
            raise ValueError(f"no usable sample left after filtering {read} ({self.dropped}); "
                             f"raise --max-length or check the dataset")


def prepare_examples(records: list[dict], tokenizer, max_length: int, min_completion_tokens: int = 1,
                     need_completions: bool = True) -> list[Example]:
    """Every record tokenized, filtered and truncated, in order."""
    if not len(records):
        raise ValueError("the dataset is empty")
    schema = detect_schema(records[0])
    usable = _Usable(schema, tokenizer, max_length, min_completion_tokens, need_completions)
    examples = [e for e in map(usable, records) if e is not None]
    usable.report(len(examples), len(records))
    log.info("dataset: %d examples (schema %s)", len(examples), schema)
    return examples


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` of a run with ``seed`` visits ``size`` records."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def examples_in_use_order(records, tokenizer, max_length: int, count: int, seed: int,
                          min_completion_tokens: int = 1, need_completions: bool = True) -> list[Example]:
    """The first ``count`` examples a run draws: epoch after epoch a seeded permutation of
    the records, skipping those it cannot use (tokenized, filtered and truncated as
    ``prepare_examples`` does). Only records drawn are tokenized, each once, so a run that
    needs a fraction of a large dataset reads only that fraction. A pure function of its
    arguments: every process and a resumed run get the same list."""
    if not len(records):
        raise ValueError("the dataset is empty")
    schema = detect_schema(records[0])
    usable = _Usable(schema, tokenizer, max_length, min_completion_tokens, need_completions)
    tokenized: dict[int, Example | None] = {}
    examples, epoch = [], 0
    while len(examples) < count:
        for index in epoch_order(len(records), seed, epoch):
            if index not in tokenized:
                tokenized[index] = usable(records[index])
            if tokenized[index] is not None:
                examples.append(tokenized[index])
                if len(examples) == count:
                    break
        if epoch == 0:
            usable.report(sum(e is not None for e in tokenized.values()), len(tokenized))
        epoch += 1
    log.info("dataset: %d of %d records tokenized for %d examples (schema %s)", len(tokenized), len(records),
             count, schema)
    return examples


# --group-by-length sorts windows of this many steps' examples: enough to find similar
# lengths, few enough that the data's order stays mixed over a run.
LENGTH_GROUP_WINDOW_STEPS = 16


def group_by_length(examples: list, group: int, window: int, seed: int) -> list:
    """``examples`` reordered so that each run of ``group`` (one step's examples) holds
    sequences of similar length: within each ``window`` of examples, sorted by prompt +
    completion length and cut into groups, the groups then shuffled (seeded). Padding
    shrinks; which examples a run sees does not change, only which share a step. A pure
    function of its arguments, like the order it rearranges."""
    import random

    out = []
    for start in range(0, len(examples), window):
        chunk = sorted(examples[start:start + window], key=lambda e: len(e.prompt_ids) + len(e.completion_ids))
        groups = [chunk[i:i + group] for i in range(0, len(chunk), group)]
        random.Random(seed * 1_000_003 + start).shuffle(groups)
        out.extend(e for g in groups for e in g)
    return out


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, max_length: int):
    """Right-padded prompt + completion sequences and the loss labels.

    ``labels[b, p]`` is the token at p + 1 when that token is part of the completion (so
    the logits at p are scored on it), else -100: every completion token counts (the
    first one included, EOS included), prompt and padding never do. Each row keeps its own
    prompt length: no slicing at the batch's longest prompt.
    """
    rows = [(p + c)[:max_length] for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row, prompt) in enumerate(zip(rows, prompts)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        if len(row) > len(prompt):
            labels[b, len(prompt) - 1: len(row) - 1] = torch.tensor(row[len(prompt):])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
