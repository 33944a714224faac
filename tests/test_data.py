"""data.py: schemas, filtering, and the completion masks that TRL users were bitten by."""

import json

import pytest
import torch

from data import build_batch, detect_schema, load_records, prepare_examples
from rollout import completions_from_generation, left_padded_prompts

EOS = 2
PAD = EOS  # the embedded model pads with its EOS token


def counted(labels):
    """(row, position, token) of every scored position."""
    return [(b, p, int(labels[b, p])) for b, p in (labels != -100).nonzero().tolist()]


def test_first_generated_token_counts_and_prompt_tokens_never_do():
    batch = build_batch([[10, 11, 12]], [[20, 21, EOS]], PAD, max_length=16)
    # logits at the last prompt position (2) are scored on the first generated token.
    assert counted(batch["labels"]) == [(0, 2, 20), (0, 3, 21), (0, 4, EOS)]


def test_eos_counts_even_when_pad_equals_eos_and_later_tokens_do_not():
    prompt_width = 3
    generated = torch.tensor([[PAD, 10, 11, 20, EOS, PAD, PAD],  # left-padded prompt, EOS then padding
                              [12, 13, 14, 30, 31, EOS, 32]])  # a token after EOS
    completions = completions_from_generation(generated, prompt_width, EOS)
    assert completions == [[20, EOS], [30, 31, EOS]]
    batch = build_batch([[10, 11], [12, 13, 14]], completions, PAD, max_length=16)
    assert counted(batch["labels"]) == [(0, 1, 20), (0, 2, EOS), (1, 2, 30), (1, 3, 31), (1, 4, EOS)]


def test_prompts_of_different_lengths_each_keep_every_completion_token():
    prompts = [[5], [5, 6, 7, 8, 9], [5, 6]]
    completions = [[40, 41, 42, EOS], [50, EOS], [60, 61]]  # the last hit max_new_tokens: no EOS
    batch = build_batch(prompts, completions, PAD, max_length=32)
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = batch["labels"][b]
        assert row[row != -100].tolist() == completion
        assert batch["input_ids"][b, : len(prompt) + len(completion)].tolist() == prompt + completion
        assert batch["attention_mask"][b].sum() == len(prompt) + len(completion)


def test_left_padding_for_generation_keeps_prompts_at_the_end():
    batch = left_padded_prompts([[1, 2, 3], [4]], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_max_length_truncates_the_completion_not_the_prompt():
    batch = build_batch([[1, 2, 3]], [[7, 8, 9, EOS]], PAD, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8]]
    assert counted(batch["labels"]) == [(0, 2, 7), (0, 3, 8)]


def test_schemas_are_detected_and_unknown_columns_named():
    assert detect_schema({"messages": []}) == "messages"
    assert detect_schema({"prompt": "a", "completion": "b"}) == "prompt/completion"
    assert detect_schema({"text": "a"}) == "text"
    with pytest.raises(ValueError, match=r"none of the known columns.*\['answer', 'question'\]"):
        detect_schema({"question": "q", "answer": "a"})


def test_chat_prompt_is_the_conversation_up_to_the_last_assistant_turn(embedded_tokenizer):
    tok = embedded_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    [example] = prepare_examples([{"messages": messages}], tok, max_length=256)
    expected_prompt = tok.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode(example.prompt_ids) == expected_prompt
    assert example.completion_ids == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_empty_and_overlong_prompts_are_filtered_and_counted(embedded_tokenizer, caplog):
    records = [{"prompt": "", "completion": "x"}, {"prompt": "word " * 300, "completion": "x"},
               {"prompt": "Question?", "completion": " Answer."}]
    examples = prepare_examples(records, embedded_tokenizer, max_length=64)
    assert len(examples) == 1
    assert "kept 1 of 3 samples (1 empty prompt, 1 prompt too long)" in caplog.text
    with pytest.raises(ValueError, match="no usable sample left"):
        prepare_examples(records[:2], embedded_tokenizer, max_length=64)


def test_text_schema_splits_into_prompt_and_completion(embedded_tokenizer):
    [example] = prepare_examples([{"text": "one two three four five six seven eight"}], embedded_tokenizer, 64)
    assert example.prompt_ids and example.completion_ids
    assert embedded_tokenizer.decode(example.prompt_ids + example.completion_ids).startswith("one two")


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "bad.jsonl line 2 is not valid JSON"),
    ("empty.jsonl", "\n\n", "empty.jsonl is empty"),
    ("list.jsonl", '{"text": "a"}\n[1, 2]\n', "list.jsonl line 2 is not a JSON object"),
    ("types.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": "hello"}\n',
     "types.jsonl line 3: 'messages' must be a non-empty list of {role, content} messages, got 'hello'"),
    ("content.jsonl", '{"messages": [{"role": "user", "content": 3}]}\n',
     "content.jsonl line 1: 'messages' must be a list of messages, each with a string 'role' and a string"),
    ("pc.json", '[{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 7}]',
     "pc.json record 1: 'completion' must be a string or a non-empty list"),
    ("text.jsonl", '{"text": "a"}\n{"text": null}\n', "text.jsonl line 2: 'text' must be a string, got None"),
])
def test_malformed_dataset_files_are_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_records(str(path))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_json_and_jsonl_files_read_the_same_records(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": [{"role": "user", "content": "p2"}], "completion": "c2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_records(str(tmp_path / "a.json")) == load_records(str(tmp_path / "a.jsonl")) == rows


def test_a_completion_ends_at_the_first_of_any_stop_token():
    generated = torch.tensor([[9, 9, 5, 7, 3, 8, 7], [9, 9, 5, 6, 6, 6, 6], [9, 9, 8, 7, 4, 4, 4]])
    assert completions_from_generation(generated, 2, [7, 8]) == [[5, 7], [5, 6, 6, 6, 6], [8]]
    assert completions_from_generation(generated, 2, 7) == [[5, 7], [5, 6, 6, 6, 6], [8, 7]]


def test_a_run_tokenizes_only_the_records_it_draws_in_its_order(embedded_tokenizer, monkeypatch):
    import data

    records = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(1000)]
    tokenized = []
    real = data.to_example

    def counting(record, *args):
        tokenized.append(record["prompt"])
        return real(record, *args)

    monkeypatch.setattr(data, "to_example", counting)
    examples = data.examples_in_use_order(records, embedded_tokenizer, max_length=64, count=12, seed=3)
    order = data.epoch_order(1000, 3, 0)[:12]
    assert tokenized == [f"question {i}" for i in order]
    assert examples == [real(records[i], "prompt/completion", embedded_tokenizer, 64) for i in order]


def test_records_a_run_cannot_use_are_skipped_and_later_epochs_reuse_the_tokens(embedded_tokenizer, monkeypatch):
    import data

    records = [{"prompt": ("long " * 80 if i % 3 == 0 else f"question {i}"), "completion": f"answer {i}"}
               for i in range(9)]
    calls = []
    real = data.to_example
    monkeypatch.setattr(data, "to_example", lambda record, *args: calls.append(1) or real(record, *args))
    examples = data.examples_in_use_order(records, embedded_tokenizer, max_length=32, count=12, seed=0)
    usable = [i for i in data.epoch_order(9, 0, 0) if i % 3] + [i for i in data.epoch_order(9, 0, 1) if i % 3]
    assert examples == [real(records[i], "prompt/completion", embedded_tokenizer, 32) for i in usable]
    assert len(calls) == 9  # each record once, over two epochs
    with pytest.raises(ValueError, match="no usable sample left after filtering 3"):
        data.examples_in_use_order(records[::3], embedded_tokenizer, max_length=32, count=4, seed=0)


def test_a_hub_dataset_is_read_lazily_and_a_bad_row_is_named_when_drawn(embedded_tokenizer):
    import datasets

    from data import HubRows, examples_in_use_order

    rows = HubRows(datasets.Dataset.from_list([{"text": "one two three four"}, {"text": None}] * 3), "dataset d split s")
    assert len(rows) == 6 and rows[0] == {"text": "one two three four"}
    with pytest.raises(ValueError, match="^dataset d split s row 1: 'text' must be a string, got None$"):
        rows[1]
    with pytest.raises(ValueError, match="row [135]: 'text' must be a string"):
        examples_in_use_order(rows, embedded_tokenizer, max_length=32, count=6, seed=0)


def _instruction_maker():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "assets"))
    import make_instructions

    return make_instructions


def test_the_instruction_templates_reproduce_the_embedded_prompts_in_order():
    maker = _instruction_maker()
    embedded = [r["messages"][0]["content"] for r in load_records(None, "train")]
    heldout = [r["messages"][0]["content"] for r in load_records(None, "heldout")]
    prompts = [p for _, p in maker.make_prompts(0)]
    assert [p for i, p in enumerate(prompts) if i % 10 != 9] == embedded
    assert [p for i, p in enumerate(prompts) if i % 10 == 9] == heldout


def test_extra_prompts_are_new_distinct_reproducible_and_in_the_embedded_mix():
    maker = _instruction_maker()
    base = maker.make_prompts(0)
    extra = maker.make_extra_prompts(1, 600, {p for _, p in base})
    texts = [p for _, p in extra]
    assert len(texts) == len(set(texts)) == 600
    assert not set(texts) & {p for _, p in base}  # held-out prompts never become training prompts
    assert extra == maker.make_extra_prompts(1, 600, {p for _, p in base})
    share = {c: sum(1 for cat, _ in extra if cat == c) / 600 for c in {c for c, _ in base}}
    base_share = {c: sum(1 for cat, _ in base if cat == c) / len(base) for c in share}
    assert all(abs(share[c] - base_share[c]) < 0.05 for c in share), (share, base_share)
    with pytest.raises(ValueError, match="ask for fewer"):
        maker.make_extra_prompts(1, 5000, {p for _, p in base})


def test_group_by_length_keeps_the_examples_and_puts_similar_lengths_in_a_step():
    from data import Example, group_by_length

    g = __import__("random").Random(0)
    examples = [Example([1] * g.randint(1, 50), [2] * g.randint(1, 200)) for _ in range(96)]

    def length(e):
        return len(e.prompt_ids) + len(e.completion_ids)

    grouped = group_by_length(examples, group=4, window=32, seed=3)
    assert sorted(map(id, grouped)) == sorted(map(id, examples))
    for start in range(0, 96, 32):  # nothing crosses a window: the run's order stays mixed
        assert {id(e) for e in grouped[start:start + 32]} == {id(e) for e in examples[start:start + 32]}

    def padding(order):
        steps = [order[i:i + 4] for i in range(0, len(order), 4)]
        return sum(4 * max(map(length, s)) - sum(map(length, s)) for s in steps)

    assert padding(grouped) < padding(examples) / 3
    assert grouped == group_by_length(examples, group=4, window=32, seed=3)
    assert grouped != group_by_length(examples, group=4, window=32, seed=4)  # the groups' order is seeded
