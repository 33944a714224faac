"""The exposure-bias curve (heldout.exposure_curve), its row-seeded sampling, its report and
--compare lines, and the greedy NLL it sits beside (heldout.embedded_eval)."""

import copy
import json
import math

import pytest
import torch

import eval as evaluation
import report
from heldout import (EMBEDDED_MAX_LENGTH, embedded_eval, exposure_curve, heldout_examples, position_buckets,
                     sample_seed)
from losses import jsd_per_token
from rollout import RowSeededSampling, generate_completions

STOPS = 2000  # stop tokens given to the random student, so that its samples end at various lengths


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """A random tiny teacher, an INT4 student of it (round-to-nearest, its logits sharpened)
    that stops on many tokens, and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    student = evaluation.ptq_baseline(teacher, {"quant_type": "int4_sym", "group_size": 32})
    with torch.no_grad():
        student.model.norm.weight *= 8  # sharper than the teacher: a KL well above rounding noise
    student.generation_config.eos_token_id = list(range(100, 100 + STOPS))
    return teacher, student, tokenizer


def direct_samples(student, tokenizer, prompts, max_new_tokens, samples):
    """Each prompt's samples decoded alone, with the seeds exposure_curve gives them."""
    return {(p, s): generate_completions(student, tokenizer, [prompt], "cpu", do_sample=True,
                                         max_new_tokens=max_new_tokens, row_seeds=[sample_seed(p, s)])[0]
            for p, prompt in enumerate(prompts) for s in range(samples)}


def test_position_buckets_double_after_32():
    assert position_buckets(64) == [(1, 32), (33, 64)]
    assert position_buckets(65) == [(1, 32), (33, 64), (65, 128)]
    assert position_buckets(512) == [(1, 32), (33, 64), (65, 128), (129, 256), (257, 512)]


def test_row_seeded_sampling_draws_from_the_softmax_at_the_temperature():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]]).expand(6000, 3)
    for temperature in (1.0, 2.0):
        drawn = RowSeededSampling(list(range(6000)), temperature, "cpu")(None, logits).argmax(-1)
        frequencies = torch.bincount(drawn, minlength=3) / 6000
        expected = torch.softmax(logits[0] / temperature, -1)
        assert torch.allclose(frequencies, expected, atol=0.02), (temperature, frequencies, expected)


def test_a_samples_tokens_depend_on_its_seed_not_on_the_batch(models):
    _, student, tokenizer = models
    prompts = [e.prompt_ids for e in heldout_examples(tokenizer, limit=3)]
    alone = direct_samples(student, tokenizer, prompts, 24, 2)
    draws = list(alone)
    together = generate_completions(student, tokenizer, [prompts[p] for p, _ in draws], "cpu", do_sample=True,
                                    max_new_tokens=24, row_seeds=[sample_seed(p, s) for p, s in draws])
    assert together == [alone[d] for d in draws]
    assert alone[(0, 0)] != alone[(0, 1)]  # two samples of one prompt differ
    assert len({len(c) for c in alone.values()}) > 1  # some stop early: the stop-token handling is exercised


def test_the_bucketed_curve_equals_a_direct_per_position_computation(models):
    teacher, student, tokenizer = models
    max_new_tokens, samples = 40, 2
    prompts = [e.prompt_ids for e in heldout_examples(tokenizer, limit=3)]
    curve = exposure_curve(teacher, student, tokenizer, max_new_tokens=max_new_tokens, samples_per_prompt=samples,
                           limit=3)
    completions = direct_samples(student, tokenizer, prompts, max_new_tokens, samples)
    buckets = position_buckets(max_new_tokens)
    # Each token scored on its own, by its position (1-based) in the continuation.
    scored = {b: {"kl": {}, "teacher_nll": {}} for b in range(len(buckets))}
    with torch.no_grad():
        for (p, _), completion in completions.items():
            ids = torch.tensor([prompts[p] + completion])
            t_logits = teacher(ids).logits[0, len(prompts[p]) - 1:-1]
            s_logits = student(ids).logits[0, len(prompts[p]) - 1:-1]
            kl = jsd_per_token(s_logits, t_logits, beta=0.0)
            nll = -torch.log_softmax(t_logits, -1)[torch.arange(len(completion)), completion]
            for position in range(1, len(completion) + 1):
                b = next(i for i, (first, last) in enumerate(buckets) if first <= position <= last)
                scored[b]["kl"].setdefault(p, []).append(kl[position - 1].item())
                scored[b]["teacher_nll"].setdefault(p, []).append(nll[position - 1].item())
    assert curve["tokens"] == sum(len(c) for c in completions.values())
    assert sum(curve["kl"][f"{first}-{last}"]["tokens"] for first, last in buckets) == curve["tokens"]
    for b, (first, last) in enumerate(buckets):
        for metric in ("kl", "teacher_nll"):
            got = curve[metric][f"{first}-{last}"]
            direct = [sum(v) / len(v) if v else None for v in (scored[b][metric].get(p, []) for p in range(3))]
            assert [x is None for x in got["per_prompt"]] == [x is None for x in direct]
            assert [x for x in got["per_prompt"] if x is not None] == pytest.approx(
                [x for x in direct if x is not None], rel=1e-4, abs=1e-6)
            present = [x for x in direct if x is not None]
            assert got["mean"] == pytest.approx(sum(present) / len(present), rel=1e-4)
            assert got["ci_low"] <= got["mean"] <= got["ci_high"]
            assert got["tokens"] == sum(len(v) for v in scored[b][metric].values())
    # Decoding one draw at a time gives the same curve.
    alone = exposure_curve(teacher, student, tokenizer, max_new_tokens=max_new_tokens, samples_per_prompt=samples,
                           limit=3, batch_size=1)
    assert numbers(alone) == pytest.approx(numbers(curve), rel=1e-4, nan_ok=True)


def numbers(tree, prefix="") -> dict:
    """A nested result flattened to {path: number} (None as NaN), for pytest.approx."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in numbers(value, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in numbers(value, f"{prefix}/{i}").items()}
    return {prefix: math.nan if tree is None else tree}


def test_the_teachers_curve_is_its_floor_kl_exactly_zero(models):
    teacher, _, tokenizer = models
    curve = exposure_curve(teacher, teacher, tokenizer, max_new_tokens=40, samples_per_prompt=2, limit=3)
    for bucket in curve["kl"].values():
        if bucket["tokens"]:
            assert bucket["mean"] == bucket["ci_low"] == bucket["ci_high"] == 0.0
            assert all(v == 0.0 for v in bucket["per_prompt"] if v is not None)
    assert all(b["mean"] > 0 for b in curve["teacher_nll"].values() if b["tokens"])
    # A copy of the teacher, computed separately, is at 0 too.
    twin = exposure_curve(teacher, copy.deepcopy(teacher), tokenizer, max_new_tokens=40, samples_per_prompt=2, limit=3)
    assert all(abs(b["mean"]) < 1e-6 for b in twin["kl"].values() if b["tokens"])


def test_the_greedy_nll_is_the_teachers_nll_of_the_students_greedy_64_tokens(models):
    teacher, student, tokenizer = models
    student = copy.deepcopy(student)
    student.generation_config.eos_token_id = tokenizer.eos_token_id  # full-length answers
    examples = heldout_examples(tokenizer, limit=3)
    metrics = embedded_eval(teacher, student, tokenizer, limit=3)  # 64 tokens, as before --max-new-tokens
    ordered = sorted(examples, key=lambda e: len(e.prompt_ids))
    completions = generate_completions(student, tokenizer, [e.prompt_ids for e in ordered], "cpu", do_sample=False,
                                       max_new_tokens=64)
    nll_sum = tokens = kl_sum = kl_tokens = 0
    with torch.no_grad():
        for example, completion in zip(ordered, completions):
            ids = torch.tensor([example.prompt_ids + completion])
            logits = teacher(ids).logits[0, len(example.prompt_ids) - 1:-1].double()
            nll_sum += -torch.log_softmax(logits, -1)[torch.arange(len(completion)), completion].sum().item()
            tokens += len(completion)
            ids = torch.tensor([example.prompt_ids + example.completion_ids])[:, :EMBEDDED_MAX_LENGTH]
            start = len(example.prompt_ids) - 1
            kl = jsd_per_token(student(ids).logits[0, start:-1], teacher(ids).logits[0, start:-1], beta=0.0)
            kl_sum, kl_tokens = kl_sum + kl.double().sum().item(), kl_tokens + kl.shape[0]
    assert tokens == 3 * 64
    assert metrics["teacher_nll_of_student"] == pytest.approx(nll_sum / tokens, rel=1e-5)
    assert metrics["heldout_kl"] == pytest.approx(kl_sum / kl_tokens, rel=1e-4)


def curve_row(values_kl: list, values_nll: list) -> dict:
    def bucket(values):
        present = [v for v in values if v is not None]
        low, high = report.bootstrap_ci(present)
        return {"mean": sum(present) / len(present), "ci_low": low, "ci_high": high, "tokens": 32 * len(present),
                "prompts": len(present), "sample_sd": None, "per_prompt": values}

    return {"exposure": {"max_new_tokens": 64, "samples_per_prompt": 2, "temperature": 1.0, "prompts": len(values_kl),
                         "tokens": 0, "kl": {"1-32": bucket(values_kl)}, "teacher_nll": {"1-32": bucket(values_nll)}}}


def test_compare_pairs_the_curves_by_prompt_and_lower_is_better():
    rows = {"ptq": curve_row([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1], [2.0] * 7),
            "run/checkpoint-2": curve_row([0.1, 0.2, 0.3, 0.4, None, 0.6, 0.7], [2.0] * 7)}
    lines = report.compare_rows(rows, [], "ptq", "checkpoint-2")
    assert lines[1].startswith("exposure-bias curve, run/checkpoint-2 vs ptq, paired by prompt")
    # six prompts in both rows, each 0.4 lower for the student: better, by the sign test (p = 2 / 2^6)
    assert lines[2] == "- KL(T‖S) 1-32: run/checkpoint-2 better than ptq by 0.4000 +- 0.0000 nats, p = 0.031"
    assert lines[3] == ("- teacher NLL 1-32: no significant difference (run/checkpoint-2 - ptq = +0.0000 +- 0.0000 "
                        "nats, p = 1, n = 7)")
    table = report.render_curve(rows)
    assert "| ptq | KL(T‖S) | 0.8000 [" in table and "| run/checkpoint-2 | tokens (prompts) | 192 (6) |" in table


def test_embedded_rows_carry_the_curve_and_cache_it_apart(tmp_path, tiny_student, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluation, "choose_device", lambda requested, available: torch.device("cpu"))
    out = tmp_path / "eval"
    argv = [str(tiny_student.parent), "--tasks", "", "--no-perplexity", "--embedded", "--limit", "2", "--max-new-tokens",
            "40", "--samples-per-prompt", "1", "--model", str(tiny_checkpoint), "--output-dir", str(out),
            "--compare", "ptq", "checkpoint-2"]
    assert evaluation.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["embedded_max_new_tokens"] == 40
    for row in results["rows"].values():
        assert set(row["embedded"]) == {"heldout_kl", "teacher_nll_of_student"}
        assert list(row["exposure"]["kl"]) == ["1-32", "33-64"] and row["exposure"]["samples_per_prompt"] == 1
    assert all(b["mean"] in (0.0, None) for b in results["rows"]["teacher"]["exposure"]["kl"].values())
    text = (out / "results.md").read_text()
    assert "exposure-bias curve: the row's own samples" in text and "- teacher NLL 33-64:" in text
    # teacher and ptq: their embedded metrics and their curves, each under its own key
    assert len(list((tmp_path / "cache" / "eval" / "rows").glob("*.json"))) == 2 + 4
