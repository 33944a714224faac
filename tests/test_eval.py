"""eval.py: local task configs, rows and table, the paired test, bad input."""

import json
import random
from pathlib import Path

import pytest
import torch

import eval as evaluation
import harness
import report
from errors import BadInput

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def tiny_benchmarks(tmp_path) -> Path:
    """Every task's files in the Hugging Face schemas lm-eval reads, a few rows each."""
    root = tmp_path / "benchmarks"
    arc = [{"id": f"q{i}", "question": f"Which number is {i}?",
            "choices": {"text": [str(i), str(i + 1), str(i + 2)], "label": ["A", "B", "C"]}, "answerKey": "A"}
           for i in range(6)]
    for task in ("arc_easy", "arc_challenge"):
        for split in ("train", "validation", "test"):
            write_jsonl(root / task / f"{split}.jsonl", arc)
    write_jsonl(root / "winogrande" / "validation.jsonl",
                [{"sentence": f"The cup beat the plate {i} because _ was strong.", "option1": "cup",
                  "option2": "plate", "answer": "1"} for i in range(6)])
    write_jsonl(root / "hellaswag" / "validation.jsonl",
                [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he",
                  "ctx": "A man cracks an egg. he", "endings": ["fries it.", "sings.", "flies.", "sleeps."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"} for i in range(6)])
    mmlu = [{"question": f"What is {i} + 1?", "subject": subject, "choices": [str(i + 1), "0", "7", "9"],
             "answer": 0} for subject in ("astronomy", "virology") for i in range(4)]
    for split in ("dev", "validation", "test"):
        write_jsonl(root / "mmlu" / f"{split}.jsonl", mmlu)
    write_jsonl(root / "wikitext" / "test.jsonl", [{"page": " = Title = \n \n Some text here . \n"}] * 2)
    return root


def test_paired_comparison_matches_an_exact_mcnemar_test():
    from scipy.stats import binomtest

    a = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0] * 6
    b = [1, 1, 1, 1, 1, 0, 1, 1, 1, 0] * 6
    stats = report.paired_comparison(a, b)
    assert stats["diff"] == pytest.approx(100 * (sum(b) - sum(a)) / len(a))
    assert (stats["a_only"], stats["b_only"]) == (0, 18)
    assert stats["p_value"] == pytest.approx(binomtest(0, 18, 0.5).pvalue, rel=1e-9)
    assert stats["ci_low"] < stats["diff"] < stats["ci_high"]
    assert report.verdict("A", "B", stats).startswith("B better than A by 30.00")
    same = report.paired_comparison(a, a)
    assert same["p_value"] == 1.0 and report.verdict("A", "B", same).startswith("no significant difference")


@pytest.mark.parametrize("scale_b", [1e-4, 1.0, 30.0])
def test_welch_comparison_matches_scipys_unequal_variance_t_test(scale_b):
    from scipy.stats import ttest_ind

    rng = random.Random(7)
    a = [rng.gauss(0.30, 0.01) for _ in range(3)]
    b = [rng.gauss(0.28, 0.01 * scale_b) for _ in range(4)]
    oracle = ttest_ind(b, a, equal_var=False)
    interval = oracle.confidence_interval(0.95)
    stats = report.welch_comparison(a, b, scale=100.0)
    assert stats["diff"] == pytest.approx(100 * (sum(b) / 4 - sum(a) / 3), rel=1e-12)
    assert stats["p_value"] == pytest.approx(oracle.pvalue, rel=1e-9)
    assert (stats["ci_low"], stats["ci_high"]) == (pytest.approx(100 * interval.low, rel=1e-9),
                                                   pytest.approx(100 * interval.high, rel=1e-9))
    assert stats["n"] == "3+4"


def test_welch_comparison_of_identical_runs_is_exact_and_one_run_is_refused():
    exact = report.welch_comparison([0.2, 0.2], [0.1, 0.1])
    assert (exact["diff"], exact["ci_low"], exact["ci_high"], exact["p_value"]) == (pytest.approx(-0.1),) * 3 + (0.0,)
    with pytest.raises(BadInput, match="at least 2 runs of each setting, not 1 and 3"):
        report.welch_comparison([0.2], [0.1, 0.2, 0.3])


def test_perplexity_batch_keeps_its_logits_within_the_budget():
    assert harness.perplexity_batch_size(16, 2048, 151_936) == 1  # Qwen3: one window at a time
    assert harness.perplexity_batch_size(16, 2048, 49_152) == 2  # SmolLM2
    assert harness.perplexity_batch_size(16, 128, 1000) == 16  # small: the requested batch
    assert harness.perplexity_batch_size("auto", 2048, 151_936) == "auto"
    for vocab in (1000, 49_152, 151_936):
        batch = harness.perplexity_batch_size(64, 2048, vocab)
        assert batch == 1 or 2 * 4 * batch * 2048 * vocab <= harness.PERPLEXITY_LOGITS_BYTES


def test_local_task_configs_override_only_the_data_source(tiny_benchmarks):
    from lm_eval.tasks._yaml_loader import load_yaml

    include, names = harness.write_local_tasks(tiny_benchmarks, ["arc_challenge", "hellaswag", "mmlu"])
    upstream = harness._lm_eval_task_dir()
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                 "validation_split", "test_split"}
    for ours, theirs in ((include / "local_arc_challenge.yaml", upstream / "arc" / "arc_challenge.yaml"),
                         (include / "local_hellaswag.yaml", upstream / "hellaswag" / "hellaswag.yaml"),
                         (include / "local_mmlu_virology.yaml", upstream / "mmlu" / "default" / "mmlu_virology.yaml")):
        a, b = load_yaml(ours), load_yaml(theirs)
        assert {k: v for k, v in a.items() if k not in data_keys} == {k: v for k, v in b.items() if k not in data_keys}
        assert a["dataset_path"] == "json"
    assert names["mmlu"] == "local_mmlu"
    subject_rows = (include / "mmlu" / "virology" / "test.jsonl").read_text().splitlines()
    assert len(subject_rows) == 4 and all(json.loads(r)["subject"] == "virology" for r in subject_rows)


def test_teacher_ptq_and_student_rows_table_chart_and_comparison(tmp_path, tiny_benchmarks, tiny_student, capsys):
    out = tmp_path / "eval"
    argv = [str(tiny_student.parent), "--data-dir", str(tiny_benchmarks), "--limit", "4", "--output-dir", str(out),
            "--batch-size", "4", "--compare", "ptq", "checkpoint-2"]
    assert evaluation.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["teacher", "ptq", "run/checkpoint-2"]
    for row in results["rows"].values():
        assert set(evaluation.TASKS) <= set(row) and row["wikitext"]["word_perplexity"] > 0
        assert len(row["arc_easy"]["items"]) == 4 and len(row["mmlu"]["items"]) == 8
        assert 0 <= row["hellaswag"]["acc"] <= 1 and "acc_norm" in row["hellaswag"]
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == ("| model | hellaswag | arc_easy | arc_challenge | winogrande | mmlu | avg "
                                     "| gap closed | ppl | ppl gap closed |")
    assert "paired comparison, run/checkpoint-2 vs ptq" in table and "- mmlu:" in table
    assert (out / "results.png").stat().st_size > 0
    # The teacher and ptq rows are cached for the next run of the same settings.
    assert len(list((tmp_path / "cache" / "eval" / "rows").glob("*.json"))) == 2


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared benchmark copies not present")
def test_real_lm_eval_tasks_read_the_shared_local_copies(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    results = harness.run_lm_eval(model, tokenizer, ["arc_challenge", "winogrande", "hellaswag"], SHARED_DATA,
                                     limit=3, num_fewshot=0, batch_size=4, max_length=256)
    for task in ("arc_challenge", "winogrande", "hellaswag"):
        assert len(results[task]["items"]) == 3 and 0 <= results[task]["acc"] <= 1


def test_checkpoint_without_quantization_settings_is_refused(tmp_path, tiny_checkpoint, capsys):
    assert evaluation.main([str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "has no quantization settings" in err and len(err.strip().splitlines()) == 1


def test_unknown_task_and_missing_local_file_are_refused(tmp_path, tiny_benchmarks, tiny_student, capsys):
    assert evaluation.main([str(tiny_student), "--tasks", "arc_easy,boolq"]) == 2
    assert "unknown task boolq; valid: hellaswag, arc_easy" in capsys.readouterr().err
    (tiny_benchmarks / "winogrande" / "validation.jsonl").unlink()
    assert evaluation.main([str(tiny_student), "--data-dir", str(tiny_benchmarks)]) == 2
    err = capsys.readouterr().err
    assert f"--data-dir is missing {tiny_benchmarks}/winogrande/validation.jsonl for task winogrande" in err


def test_embedded_eval_is_zero_for_the_teacher_and_positive_for_its_4bit_self(tiny_checkpoint):
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heldout import embedded_eval

    teacher = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    same = embedded_eval(teacher, copy.deepcopy(teacher), tokenizer, max_new_tokens=4, limit=4)
    assert same["heldout_kl"] == pytest.approx(0.0, abs=1e-6) and same["teacher_nll_of_student"] > 0
    student = evaluation.ptq_baseline(teacher, {"quant_type": "int4_sym", "group_size": 32})
    quantized = embedded_eval(teacher, student, tokenizer, max_new_tokens=4, limit=4)
    assert quantized["heldout_kl"] > 1e-6
    # decoding the prompts one by one (no padding) or all together gives the same metrics
    alone = embedded_eval(teacher, student, tokenizer, max_new_tokens=4, limit=4, batch_size=1)
    assert alone == pytest.approx(quantized, rel=1e-5)


@pytest.mark.parametrize("requested, cuda_available, chosen", [
    (None, True, "cuda"), (None, False, "cpu"), ("cpu", True, "cpu"), ("cuda:1", True, "cuda:1")])
def test_the_gpu_is_used_when_there_is_one(requested, cuda_available, chosen):
    assert evaluation.choose_device(requested, cuda_available) == torch.device(chosen)


def test_models_are_moved_to_the_chosen_device_and_a_missing_gpu_is_one_line(tmp_path, tiny_student, monkeypatch,
                                                                             capsys):
    moved = []
    real_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if isinstance(module, torch.nn.Module) and hasattr(module, "generation_config"):
            moved.append((type(module).__name__, str(args[0]) if args else str(kwargs.get("device"))))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr(evaluation, "choose_device", lambda requested, available: torch.device("cpu"))
    argv = [str(tiny_student), "--tasks", "", "--no-perplexity", "--output-dir", str(tmp_path / "eval")]
    assert evaluation.main(argv) == 0
    assert moved.count(("LlamaForCausalLM", "cpu")) == 3  # the teacher, the ptq row and the student
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation.main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--device cuda: no CUDA device is visible here; use --device cpu")


def scored_samples(output) -> dict:
    return {key: [(s["doc_id"], s["resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
            for key, samples in output["samples"].items()}


def test_continuation_scoring_gives_stock_hflm_scores_and_skips_the_context_positions(tiny_benchmarks,
                                                                                       tiny_checkpoint):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The real tasks' lengths (multi-token answers, shared one-token MMLU contexts) where present.
    data_dir = SHARED_DATA if SHARED_DATA.exists() else tiny_benchmarks
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    kept, forward = [], model.forward

    def recording_forward(*args, logits_to_keep=0, **kwargs):
        output = forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        kept.append((args[0].shape[1], output.logits.shape[1]))
        return output

    model.forward = recording_forward
    tasks = list(harness.TASKS) + [harness.PERPLEXITY_TASK]
    outputs = {}
    for name, make in (("stock", HFLM), ("ours", harness.continuation_scoring_lm)):
        kept.clear()
        lm = make(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=256)
        outputs[name] = harness.lm_eval_output(lm, tasks, data_dir, limit=2, num_fewshot=0)[0]
    assert scored_samples(outputs["ours"]) == scored_samples(outputs["stock"])  # every log-likelihood, bit for bit
    assert outputs["ours"]["results"] == outputs["stock"]["results"]
    # Multiple-choice requests ran the head on fewer positions than their inputs have; wikitext's
    # rolling windows score every position.
    assert any(positions < length for length, positions in kept)


def loads_no_model(monkeypatch):
    import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(evaluation, "load_student", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "abc"], "argument --batch-size/--batch_size: must be a positive integer or 'auto', got 'abc'"),
    (["--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["--max-new-tokens", "10000"], "--max-new-tokens 10000 is more than the held-out metrics generate (4096 at most)"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--compare", "ptq", "chekpoint-9"], "--compare: no single row named 'chekpoint-9'; rows are teacher, ptq, "
                                          "run/checkpoint-2"),
    (["--model", "./no/such/teacher"], "model path './no/such/teacher' does not exist"),
])
def test_bad_input_is_one_line_before_any_model_loads_and_writes_nothing(tmp_path, tiny_student, monkeypatch, capsys,
                                                                         extra, message):
    loads_no_model(monkeypatch)
    out = tmp_path / "eval"
    assert evaluation.main([str(tiny_student), "--output-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_bad_second_checkpoint_is_refused_before_any_model_loads(tmp_path, tiny_student, monkeypatch, capsys):
    loads_no_model(monkeypatch)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert evaluation.main([str(tiny_student), str(tmp_path / "other")]) == 2
    assert "has no quantization settings" in capsys.readouterr().err


def test_students_are_loaded_one_at_a_time_and_freed_before_the_next(tmp_path, tiny_student, monkeypatch):
    import shutil
    import weakref

    second = tmp_path / "run2" / "checkpoint-2"
    shutil.copytree(tiny_student.parent, second.parent)
    real, loaded = evaluation.load_student, []

    def recording(checkpoint):
        assert all(ref() is None for ref in loaded), "a student is still alive when the next one loads"
        model, tokenizer, settings = real(checkpoint)
        loaded.append(weakref.ref(model))
        return model, tokenizer, settings

    monkeypatch.setattr(evaluation, "load_student", recording)
    assert evaluation.main([str(tiny_student), str(second), "--tasks", "", "--no-perplexity",
                            "--output-dir", str(tmp_path / "eval")]) == 0
    assert len(loaded) == 2
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher", "ptq", "run/checkpoint-2", "run2/checkpoint-2"]


@pytest.mark.parametrize("quant_type", ["mxfp4", "int4"])
def test_in_bfloat16_each_layer_holds_the_4bit_weight_quantized_from_the_float32_latent(tiny, quant_type):
    import copy

    from quant import FakeQuantLinear, fake_quantize, quantize_model

    quantize_model(tiny, quant_type, 32 if quant_type == "int4" else None)
    expected = {name: fake_quantize(m.weight.detach(), m.quant_type, m.group_size, m.scale_rule)
                for name, m in tiny.named_modules() if isinstance(m, FakeQuantLinear)}
    model = evaluation.on_device(copy.deepcopy(tiny), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    for name, weight in expected.items():
        held = model.get_submodule(name).weight
        if quant_type == "mxfp4":  # every MXFP4 value is a bfloat16
            assert torch.equal(held.float(), weight)
        else:
            assert torch.equal(held, weight.to(torch.bfloat16))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), tiny(ids).logits, rtol=0.05, atol=0.05)


def test_dtype_bfloat16_evaluates_every_row_in_bfloat16(tmp_path, tiny_student, monkeypatch):
    real, dtypes = evaluation.evaluate_row, []

    def recording(model, *args, **kwargs):
        dtypes.append({p.dtype for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_row", recording)
    assert evaluation.main([str(tiny_student), "--tasks", "", "--no-perplexity", "--dtype", "bfloat16",
                            "--output-dir", str(tmp_path / "eval")]) == 0
    assert dtypes == [{torch.bfloat16}] * 3  # teacher, ptq, student


def test_a_crash_while_writing_the_row_cache_leaves_no_entry(tmp_path, monkeypatch):
    real = Path.write_text

    def torn(path, text, *args, **kwargs):
        real(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="disk full"):
        evaluation.cached_result("row", lambda: {"acc": 0.5, "items": [1, 0, 1]})
    monkeypatch.undo()
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))
    assert evaluation.cached_result("row", lambda: {"acc": 0.25}) == {"acc": 0.25}  # computed, not a torn read
    assert list((tmp_path / "cache" / "eval" / "rows").iterdir()) == [tmp_path / "cache" / "eval" / "rows" / "row.json"]
