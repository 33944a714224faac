"""train.py: command line, bad input, the loop, checkpoints, resume, signals, two processes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import train
from errors import BadInput

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield


def tiny_args(tiny_checkpoint, chat_dataset, output_dir, *extra):
    return ["--model", str(tiny_checkpoint), "--dataset", str(chat_dataset), "--output_dir", str(output_dir),
            "--max-new-tokens", "6", "--batch-size", "2", "--max-length", "96", "--learning-rate", "1e-3",
            "--quant-type", "int4", "--group-size", "32", *extra]


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_flags_take_dash_and_underscore_spellings_and_override_the_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('lmbda = 0.25\nquant-type = "int4"\nmax_steps = 7\n')
    c = train.parse_config(["--config", str(config), "--max_steps", "9", "--per-device-train-batch-size", "3",
                            "--lr", "2e-5", "--seq-kd"])
    assert (c.lmbda, c.quant_type, c.max_steps, c.per_device_train_batch_size) == (0.25, "int4", 9, 3)
    assert c.learning_rate == 2e-5 and c.seq_kd is True
    assert train.parse_config(["--output-dir", "x", "--batch_size", "5"]).per_device_train_batch_size == 5
    assert train.default_output_dir(c) == "dump/int4_lmbda0.25_beta0_lr2e-05"


@pytest.mark.parametrize("argv, message", [
    (["--lmbda", "1.5"], "--lmbda must be in [0, 1]"),
    (["--beta", "-0.1"], "--beta must be in [0, 1]"),
    (["--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["--rollout-dtype", "float16"], "--rollout-dtype must be float32 or bfloat16"),
    (["--mixed-precision", "fp16"], "--mixed-precision must be no or bf16"),
    (["--quant-type", "int4_sym", "--scale-rule", "mse"], "--scale-rule mse chooses MXFP4 block exponents"),
    (["--quant-type", "nvfp4", "--scale-rule", "rceil"], "--scale-rule rceil chooses MXFP4 block exponents; nvfp4 "
                                                         "has no such choice"),
    (["--quant-type", "nvfp4", "--init", "gptq", "--no-gptq-actorder"], "--init gptq with nvfp4 fixes its grids"),
    (["--quant-type", "nvfp4", "--init", "gptq", "--gptq-latent", "unrounded"], "--init gptq with nvfp4 fixes its grids"),
    (["--quant-type", "nvfp4", "--learn-scales"], "--learn-scales trains INT4 group scales; nvfp4 has none to learn"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    (["--lora-alpha=-inf"], "--lora-alpha must be a finite number, got -inf"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--save-total-limit", "-1"], "--save-total-limit must be >= 0"),
    (["--learn-scales"], "--learn-scales trains INT4 group scales; mxfp4 has none to learn"),
    (["--learn-scales", "--quant-type", "int4_sym", "--lora-r", "4"], "--learn-scales with --lora-r"),
    (["--act-quant", "--quant-type", "int4"], "--act-quant quantizes activations in the weights' format, mxfp4 or "
                                              "nvfp4; --quant-type int4 has no 4-bit activation format"),
    (["--act-quant", "--quant-type", "int4_sym"], "--quant-type int4_sym has no 4-bit activation format"),
    (["--act-quant", "--quant-type", "none"], "--quant-type none has no 4-bit activation format"),
    (["--act-quant", "--quant-type", "int4_sym", "--learn-scales"], "--act-quant with --learn-scales"),
    (["--act-quant", "--learn-scales"], "--act-quant with --learn-scales"),
    (["--quantized-lr", "0"], "--quantized-lr must be > 0, got 0.0"),
    (["--quant-type", "none", "--quantized-lr", "1e-3"], "--quantized-lr sets the quantized layers' rate"),
    (["--quant-type", "none", "--freeze-quantized"], "--freeze-quantized keeps the quantized layers as they start; "
                                                     "--quant-type none has none"),
    (["--freeze-quantized", "--lora-r", "4"], "--lora-r trains them: use one of the two"),
    (["--quantized-lr", "1e-3", "--lora-r", "4"], "--quantized-lr with --lora-r: only the adapters train"),
    (["--freeze-quantized", "--quant-type", "int4", "--learn-scales"], "--learn-scales trains them"),
    (["--freeze-quantized", "--quantized-lr", "1e-3"], "--quantized-lr trains them"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    output_dir = tmp_path / "run"
    assert train.main([*argv, "--output_dir", str(output_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not output_dir.exists()


@pytest.mark.parametrize("line, message", [
    ('max_steps = "100"', "max_steps must be an integer, got '100'"),
    ("lmbda = true", "lmbda must be a number, got True"),
    ("seq-kd = 1", "seq_kd must be true or false, got 1"),
    ("quant_type = 4", "quant_type must be a quoted string, got 4"),
    ("group_size = 32.0", "group_size must be an integer, got 32.0"),
])
def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, line, message):
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    with pytest.raises(BadInput, match=f"^{config}: {message}$"):
        train.parse_config(["--config", str(config)])


def test_a_config_file_of_the_wrong_type_exits_with_one_line_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('max_steps = "100"\n')
    assert train.main(["--config", str(config), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_steps must be an integer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_an_integer_in_the_config_file_is_a_float_where_one_is_expected(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("learning_rate = 1\nlmbda = 0\n")
    c = train.parse_config(["--config", str(config)])
    assert (c.learning_rate, c.lmbda) == (1.0, 0.0) and isinstance(c.lmbda, float)


def test_a_launcher_precision_other_than_the_flag_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # an accelerate config that asks for bf16
    assert train.main(["--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert ("the launcher's mixed_precision is bf16 (accelerate config or --mixed_precision) but train.py's "
            "--mixed-precision is no" in err and len(err.splitlines()) == 1)
    assert not (tmp_path / "run").exists()


def test_the_scale_rule_defaults_to_least_error_for_mxfp4_and_is_recorded_as_floor_for_int4_and_nvfp4():
    assert train.parse_config([]).scale_rule == "mse"
    assert train.parse_config(["--scale-rule", "floor"]).scale_rule == "floor"
    assert train.parse_config(["--quant-type", "int4_sym"]).scale_rule == "floor"
    assert train.parse_config(["--quant-type", "nvfp4"]).scale_rule == "floor"
    assert train.parse_config(["--quant-type", "int4", "--scale-rule", "floor"]).scale_rule == "floor"


def test_unknown_flag_or_choice_is_one_line(capsys):
    assert train.main(["--quant-type", "fp3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mxfp4, nvfp4, int4, int4_sym, none" in err.replace("'", "") and len(err.splitlines()) == 1
    assert train.main(["--no-such-flag", "1"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_dataset_without_known_columns_or_empty_after_filtering_is_refused(tmp_path, tiny_checkpoint, capsys):
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert train.main(tiny_args(tiny_checkpoint, bad, tmp_path / "a")) == 2
    assert "none of the known columns" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "completion": "x"}) + "\n")
    assert train.main(tiny_args(tiny_checkpoint, long, tmp_path / "b")) == 2
    assert "no usable sample left" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("quant_type, hidden, block", [("mxfp4", 48, 32), ("nvfp4", 40, 16)])
def test_act_quant_with_a_layer_the_block_does_not_divide_is_one_line_and_writes_nothing(
        tmp_path, embedded_tokenizer, chat_dataset, capsys, quant_type, hidden, block):
    from conftest import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(embedded_tokenizer), hidden_size=hidden, head_dim=hidden // 4,
               intermediate_size=128, max_position_embeddings=512).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    argv = tiny_args(model_dir, chat_dataset, tmp_path / "run", "--quant-type", quant_type, "--act-quant")
    argv.remove("--group-size"), argv.remove("32")
    capsys.readouterr()
    assert train.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the load's progress
    assert len(errors) == 1 and errors[0].startswith("error: ")
    assert f"in_features {hidden} is not a multiple of the {quant_type.upper()} block size {block}" in errors[0]
    assert not (tmp_path / "run").exists()


def test_student_with_another_tokenizer_is_refused(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    from conftest import tiny_model
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    other = tmp_path / "other"
    tiny_model("llama", vocab_size=8).save_pretrained(other)
    vocab = {f"t{i}": i for i in range(8)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t1").save_pretrained(other)
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / "run", "--student-model", str(other))) == 2
    assert "different tokenizers" in capsys.readouterr().err


def test_off_policy_run_writes_metrics_and_a_rebuildable_checkpoint(tmp_path, tiny_checkpoint, chat_dataset):
    from transformers import AutoModelForCausalLM

    from quant import FakeQuantLinear, quantize_model_from_settings

    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "3", "--lmbda", "0")) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["on_policy"] for r in rows)
    assert all(r["completion_tokens"] > 0 and r["loss"] >= 0 for r in rows)
    checkpoint = out / "checkpoint-3"
    assert json.loads((checkpoint / "run_config.json").read_text())["lmbda"] == 0
    # one copy of the weights: the Hugging Face layout; accelerate's state holds the rest
    assert not list((checkpoint / "accelerate_state").glob("model*"))
    assert sum(f.stat().st_size for f in (checkpoint / "accelerate_state").iterdir()) < 3 * (
        checkpoint / "model.safetensors").stat().st_size
    student = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert student.config.fake_quant["quant_type"] == "int4"
    assert quantize_model_from_settings(student, student.config.fake_quant) == 14
    assert isinstance(student.model.layers[0].mlp.up_proj, FakeQuantLinear)
    teacher = weights(tiny_checkpoint)
    trained = weights(checkpoint)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("rest, quantized", [("1e-3", "1e-30"), ("1e-30", "1e-3")])
def test_quantized_lr_moves_the_quantized_layers_at_their_own_rate_and_the_rest_at_learning_rate(
        tmp_path, tiny_checkpoint, chat_dataset, rest, quantized):
    # a rate far below float32's resolution of the weights leaves those weights bit for bit
    out = tmp_path / "run"
    argv = tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "0", "--quantized-lr", quantized)
    argv[argv.index("--learning-rate") + 1] = rest
    assert train.main(argv) == 0
    teacher, trained = weights(tiny_checkpoint), weights(out / "checkpoint-2")
    layers = [n for n in trained if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    rest_names = ["model.norm.weight", "model.layers.0.input_layernorm.weight"]  # (a tied zero row moves 1e-30)
    frozen, moved = (layers, rest_names) if quantized == "1e-30" else (rest_names, layers)
    assert all(torch.equal(trained[n], teacher[n]) for n in frozen)
    assert layers and all(not torch.equal(trained[n], teacher[n]) for n in moved)
    logged = metrics(out)[0]  # the rates of the next step, past the one-step warm-up: the peaks, each logged
    assert (logged["learning_rate"], logged["quantized_learning_rate"]) == pytest.approx((float(rest), float(quantized)))


def test_freeze_quantized_trains_the_rest_around_layers_quantized_once(tmp_path, tiny_checkpoint, chat_dataset,
                                                                      monkeypatch):
    from quant import FakeQuantLinear

    real, quantized = FakeQuantLinear._quantize, []

    def counted(layer, latent):
        quantized.append(layer)
        return real(layer, latent)

    monkeypatch.setattr(FakeQuantLinear, "_quantize", counted)
    frozen, plain = tmp_path / "frozen", tmp_path / "plain"
    # seed 5: step 1 of 3 is on-policy; its rollout and the held-out evaluations nest caches of their own
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, frozen, "--max-steps", "3", "--lmbda", "0.5",
                                "--seed", "5", "--eval-steps", "2", "--gradient-accumulation-steps", "2",
                                "--freeze-quantized")) == 0
    assert [r.get("on_policy") for r in metrics(frozen)[1:]] == [False, True, False]
    layers = [n for n in weights(tiny_checkpoint) if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert len(quantized) == len(set(quantized)) == len(layers)  # once each, for 3 steps of 2 micro-batches
    start, trained = weights(tiny_checkpoint), weights(frozen / "checkpoint-3")
    assert all(torch.equal(trained[n], start[n]) for n in layers)
    assert not torch.equal(trained["model.norm.weight"], start["model.norm.weight"])
    assert not torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    # the held quantization computes what quantizing at every forward does: the first step's loss
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, plain, "--max-steps", "1", "--lmbda", "0.5",
                                "--seed", "5", "--gradient-accumulation-steps", "2")) == 0
    assert metrics(frozen)[1]["loss"] == metrics(plain)[0]["loss"]


def test_on_policy_run_trains_on_student_generations(tmp_path, tiny_checkpoint, chat_dataset):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "1")) == 0
    rows = metrics(out)
    assert all(r["on_policy"] for r in rows) and rows[-1]["on_policy_fraction"] == 1.0
    assert all(r["generation_s"] > 0 and r["completion_tokens"] <= 2 * 6 for r in rows)


def test_an_nvfp4_run_trains_on_policy_and_saves_a_student_rebuilt_with_its_shared_tensor_scales(
        tmp_path, tiny_checkpoint, chat_dataset):
    import students
    from quant import fake_quantize

    out = tmp_path / "run"
    argv = tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "1")
    at = argv.index("--quant-type")
    argv[at:at + 4] = ["--quant-type", "nvfp4"]  # and no --group-size
    assert train.main(argv) == 0
    assert all(r["on_policy"] for r in metrics(out))
    student, _, settings = students.load_student(out / "checkpoint-2")
    assert settings["quant_type"] == "nvfp4" and len(settings["tensor_scale_groups"]) == 2 * 2
    attention = student.model.layers[0].self_attn
    amax = max(m.weight.abs().amax() for m in (attention.q_proj, attention.k_proj, attention.v_proj))
    assert torch.equal(attention.v_proj.quantized_weight(),
                       fake_quantize(attention.v_proj.weight.detach(), "nvfp4", tensor_amax=amax))
    assert not torch.equal(weights(out / "checkpoint-2")["model.layers.0.mlp.up_proj.weight"],
                           weights(tiny_checkpoint)["model.layers.0.mlp.up_proj.weight"])


def test_fused_and_materialised_losses_agree(tmp_path, tiny_checkpoint, chat_dataset):
    for name, flag in (("fused", "--fused-loss"), ("plain", "--no-fused-loss")):
        assert train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / name, "--max-steps", "2", flag)) == 0
    fused, plain = metrics(tmp_path / "fused"), metrics(tmp_path / "plain")
    for a, b in zip(fused, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_existing_output_dir_is_refused_unless_resume_or_overwrite(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1")) == 0
    before = weights(out / "checkpoint-1")
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--beta", "0.9",
                                "--resume")) == 2
    assert "different configuration (beta)" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in weights(out / "checkpoint-1").items())
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", "--overwrite")) == 0


def test_resume_with_overwrite_is_refused_and_the_run_is_kept(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1")) == 0
    before = weights(out / "checkpoint-1")
    capsys.readouterr()
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--resume",
                                "--overwrite")) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume continues the run in --output_dir and --overwrite deletes it" in err
    assert len(err.splitlines()) == 1
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-1"
    assert all(torch.equal(before[k], v) for k, v in weights(out / "checkpoint-1").items())


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))


def test_save_total_limit_keeps_the_last_checkpoints_and_the_one_resumed_from(tmp_path, tiny_checkpoint,
                                                                              chat_dataset):
    out = tmp_path / "run"
    common = ("--save-steps", "1", "--save-total-limit", "1", "--lmbda", "0")
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, *common, "--max-steps", "4",
                                "--stop-after", "2")) == 0
    assert checkpoint_steps(out) == [2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-removed
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, *common, "--max-steps", "4", "--resume")) == 0
    assert checkpoint_steps(out) == [2, 4]  # 3 rotated away; 2 is where this invocation started
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--save-steps", "1", "--save-total-limit", "2",
                                "--lmbda", "0", "--max-steps", "4", "--resume")) == 0  # already done: nothing saved
    assert checkpoint_steps(out) == [2, 4]


def test_bad_eval_args_are_refused_at_start_up_and_nothing_is_written(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", "--do-eval",
                                "--eval-args", "--batch-size abc")) == 2
    err = capsys.readouterr().err.strip()
    assert "--eval-args '--batch-size abc': argument --batch-size/--batch_size: must be a positive integer" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--do-eval", "--eval-args", "--tasks 'arc")) == 2
    assert "--eval-args \"--tasks 'arc\": No closing quotation" in capsys.readouterr().err


def test_do_eval_evaluates_the_final_checkpoint_in_a_process_of_its_own(tmp_path, tiny_checkpoint, chat_dataset,
                                                                       monkeypatch):
    import eval as evaluation

    def in_this_process(*args, **kwargs):
        raise AssertionError("eval.py ran inside the training process")

    monkeypatch.setattr(evaluation, "main", in_this_process)
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", "--do-eval",
                                "--eval-args", "--tasks '' --no-perplexity")) == 0
    rows = json.loads((out / "eval" / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher", "ptq", "run/checkpoint-1"]


def test_eval_steps_write_a_learning_curve_that_ends_at_eval_py_value(tmp_path, tiny_checkpoint, chat_dataset,
                                                                      monkeypatch):
    import eval as evaluation

    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # eval.py scores the embedded held-out set at 512 tokens: the same here, so the values agree.
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "3", "--lmbda", "1",
                                "--eval-steps", "2", "--max-length", "512")) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert ["heldout_kl" in r for r in rows] == [True, False, True, True]  # step 0, every 2, the last
    assert rows[0]["train_s"] == 0 and rows[0]["tokens_generated"] == 0 and rows[0]["heldout_kl"] > 0
    assert all(b["train_s"] > a["train_s"] for a, b in zip(rows, rows[1:]))
    # every on-policy completion token was generated: the running total is their sum
    assert [r["tokens_generated"] for r in rows[1:]] == [sum(r["completion_tokens"] for r in rows[1:i + 1])
                                                          for i in range(1, 4)]
    for r in (rows[2], rows[3]):
        assert r["heldout_kl_gap_closed"] == pytest.approx(1 - r["heldout_kl"] / rows[0]["heldout_kl"])
    assert evaluation.main([str(out), "--tasks", "", "--no-perplexity", "--embedded", "--samples-per-prompt", "0",
                            "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert evaluated["run/checkpoint-3"]["embedded"]["heldout_kl"] == pytest.approx(rows[3]["heldout_kl"], rel=1e-6)
    assert evaluated["ptq"]["embedded"]["heldout_kl"] == pytest.approx(rows[0]["heldout_kl"], rel=1e-6)
    assert evaluated["teacher"]["embedded"]["heldout_kl"] == pytest.approx(0.0, abs=1e-6)
    assert "exposure" not in evaluated["ptq"]  # --samples-per-prompt 0: no curve


def test_bf16_under_fsdp_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint, chat_dataset, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--mixed-precision", "bf16")) == 2
    err = capsys.readouterr().err.strip()
    assert "--mixed-precision bf16 under FSDP" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_resume_after_a_stop_gives_the_same_final_weights(tmp_path, tiny_checkpoint, chat_dataset):
    common = ("--max-steps", "4", "--lmbda", "0.5", "--seed", "3", "--eval-steps", "2", "--eval-dataset",
              str(chat_dataset))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, straight, *common)) == 0
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--stop-after", "2")) == 0
    assert (split / "checkpoint-2").exists() and not (split / "checkpoint-4").exists()
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--resume")) == 0
    assert {r["on_policy"] for r in metrics(straight)[1:]} == {True, False}  # both kinds of step were exercised
    a, b = weights(straight / "checkpoint-4"), weights(split / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("loss") for r in metrics(straight)] == [r.get("loss") for r in metrics(split)]
    # the learning curve carries over: the same held-out values, gap closed against the same step 0
    assert [(r["step"], r.get("heldout_kl_gap_closed")) for r in metrics(straight)] == [
        (r["step"], r.get("heldout_kl_gap_closed")) for r in metrics(split)]
    assert metrics(split)[-1]["train_s"] > metrics(split)[2]["train_s"]
    # the on-policy fraction counts the whole run's steps, those before the stop included
    assert [r.get("on_policy_fraction") for r in metrics(straight)] == [
        r.get("on_policy_fraction") for r in metrics(split)]


def test_learned_scales_train_save_and_resume_to_the_same_student(tmp_path, tiny_checkpoint, chat_dataset):
    from quant import is_learned_statistic
    from students import load_student

    common = ("--max-steps", "4", "--seed", "3", "--quant-type", "int4_sym", "--learn-scales")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, straight, *common)) == 0
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--stop-after", "2")) == 0
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--resume")) == 0
    a, b = weights(straight / "checkpoint-4"), weights(split / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    learned = [k for k in a if is_learned_statistic(k)]
    assert learned and all(k.endswith(".weight_amax") for k in learned)
    student, _, settings = load_student(straight / "checkpoint-4")
    assert settings["learn_scales"]
    # the scales trained: the 4-bit weights are not what the rule measures on the latent weights
    layer = student.get_submodule(learned[0].rpartition(".")[0])
    assert torch.equal(layer.weight_amax, a[learned[0]])
    assert not torch.equal(layer.weight_amax, layer.weight.abs().reshape(*layer.weight_amax.shape, -1).amax(-1))
    # a run started without learned scales is another run
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, split, "--max-steps", "4", "--seed", "3",
                                "--quant-type", "int4_sym", "--resume")) == 2


def test_a_w4a4_run_trains_on_policy_saves_and_resumes_to_the_same_student(tmp_path, tiny_checkpoint, chat_dataset):
    from quant import FakeQuantLinear
    from students import load_student

    def args(output_dir, *extra):  # no INT4 group size
        argv = tiny_args(tiny_checkpoint, chat_dataset, output_dir, *extra)
        return argv[:argv.index("--group-size")] + argv[argv.index("--group-size") + 2:]

    common = ("--max-steps", "4", "--seed", "3", "--quant-type", "nvfp4", "--act-quant", "--lmbda", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(args(straight, *common)) == 0
    assert train.main(args(split, *common, "--stop-after", "2")) == 0
    assert train.main(args(split, *common, "--resume")) == 0
    assert {r["on_policy"] for r in metrics(straight)[1:]} == {True}  # rollouts through the cache too
    a, b = weights(straight / "checkpoint-4"), weights(split / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    student, _, settings = load_student(straight / "checkpoint-4")
    assert settings["act_quant"] and settings["quant_type"] == "nvfp4"
    layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == 14 and all(m.act_quant for m in layers)
    # a run started without activation quantization is another run
    assert train.main(args(split, *common[:-3], "--lmbda", "1", "--resume")) == 2


def test_a_saved_w4a16_student_goes_on_as_w4a4_with_act_quant(tmp_path):
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    from quant import FakeQuantLinear, quantize_model

    model = tiny_model("llama")
    quantize_model(model, "mxfp4", scale_rule="mse")
    model.save_pretrained(tmp_path)
    for flags, act_quant in (([], False), (["--act-quant"], True)):
        student = AutoModelForCausalLM.from_pretrained(tmp_path)
        train.prepare_student(student, train.parse_config(flags))
        layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
        assert len(layers) == 14 and all(m.act_quant == act_quant and m.scale_rule == "mse" for m in layers)
        assert student.config.fake_quant["act_quant"] is act_quant


def test_a_saved_w4a4_student_without_act_quant_is_refused_in_one_line(tmp_path):
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    from quant import quantize_model

    model = tiny_model("llama")
    quantize_model(model, "mxfp4", act_quant=True)
    model.save_pretrained(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(train.BadInput, match="W4A4 student.*pass --act-quant"):
        train.prepare_student(student, train.parse_config(["--student-model", str(tmp_path)]))


def test_sigint_finishes_the_step_saves_and_exits_non_zero(tmp_path, tiny_checkpoint, chat_dataset, monkeypatch,
                                                            capsys):
    import losses

    real = losses.fused_linear_jsd_loss

    def interrupting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "fused_linear_jsd_loss", interrupting)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "5")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1" in err and "--resume" in err
    assert (out / "checkpoint-1" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_non_finite_losses_skip_steps_then_abort(tmp_path, tiny_checkpoint, chat_dataset, monkeypatch, capsys):
    import losses

    monkeypatch.setattr(losses, "fused_linear_jsd_loss", lambda student_hidden, *a, **k:
                        student_hidden.sum() * float("nan"))
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "5")) == 2
    assert "3 non-finite losses or gradient norms in a row" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*"))


class NanGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradients_on_steps(monkeypatch, steps: set[int]):
    """The fused loss of the given (0-based) steps gets a NaN gradient; its value is unchanged."""
    import losses

    real, calls = losses.fused_linear_jsd_loss, []

    def patched(student_hidden, *args, **kwargs):
        calls.append(1)
        if len(calls) - 1 in steps:
            student_hidden = NanGradient.apply(student_hidden)
        return real(student_hidden, *args, **kwargs)

    monkeypatch.setattr(losses, "fused_linear_jsd_loss", patched)


def test_a_non_finite_gradient_norm_skips_the_step_like_a_non_finite_loss(tmp_path, tiny_checkpoint, chat_dataset,
                                                                         monkeypatch):
    nan_gradients_on_steps(monkeypatch, {0})
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "0",
                                "--warmup-ratio", "0")) == 0
    rows = metrics(out)
    assert [r.get("skipped", False) for r in rows] == [True, False]
    assert rows[0]["loss"] > 0 and rows[0]["grad_norm"] != rows[0]["grad_norm"]  # finite loss, NaN norm
    saved = weights(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in saved.values())
    teacher = weights(tiny_checkpoint)
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


def test_non_finite_gradient_norms_in_a_row_abort_with_nothing_saved(tmp_path, tiny_checkpoint, chat_dataset,
                                                                     monkeypatch, capsys):
    nan_gradients_on_steps(monkeypatch, {0, 1, 2})
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "5", "--lmbda", "0")) == 2
    assert "3 non-finite losses or gradient norms in a row at step 2" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, tiny_checkpoint, chat_dataset,
                                                                     monkeypatch):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--save-steps", "1",
                                "--stop-after", "1")) == 0
    before = weights(out / "checkpoint-1")
    from transformers import PreTrainedTokenizerBase

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--save-steps", "1",
                             "--resume"))
    assert not (out / "checkpoint-2").exists()
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-1"
    assert all(torch.equal(before[k], v) for k, v in weights(out / "checkpoint-1").items())


def test_heldout_kl_runs_as_many_student_forwards_on_every_process_and_the_sums_are_unchanged():
    # 38 held-out examples on 8 processes: shares of 5 and 4, i.e. 2 or 1 batches of 4. Under
    # FSDP each forward all-gathers weights, so a process running fewer leaves the others hung.
    from types import SimpleNamespace

    from conftest import tiny_model
    from data import Example
    from quant import quantize_model

    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(1, 128, (3 + i % 5,), generator=generator).tolist(),
                        torch.randint(1, 128, (2 + i % 3,), generator=generator).tolist()) for i in range(38)]
    teacher, student = tiny_model("llama"), tiny_model("llama")
    quantize_model(student, "int4", 32)
    forwards = []
    student.register_forward_hook(lambda *args: forwards.append(1))

    def heldout(world, rank):
        accelerator = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"),
                                      reduce=lambda tensor, reduction: tensor)  # this process's sums alone
        run = SimpleNamespace(accelerator=accelerator, student_model=student, teacher=teacher, eval_examples=examples,
                              tokenizer=SimpleNamespace(pad_token_id=0), c=SimpleNamespace(max_length=64),
                              totals={"heldout_kl_step0": None})
        forwards.clear()
        kl = train.heldout_kl(run)["heldout_kl"]
        return len(forwards), kl

    per_rank = [heldout(8, rank) for rank in range(8)]
    assert [count for count, _ in per_rank] == [2] * 8
    assert heldout(1, 0)[0] == 10  # one process alone: 38 examples, batches of 4
    # the filler forwards add nothing: the shares' KL sums add up to one process's
    from heldout import heldout_kl_sums

    sums = [heldout_kl_sums(teacher, student, examples[rank::8], 0, 64, forward_batches=2, filler=examples[0])
            for rank in range(8)]
    whole = heldout_kl_sums(teacher, student, examples, 0, 64)
    assert sum(t for _, t in sums) == whole[1]
    assert sum(k for k, _ in sums) == pytest.approx(whole[0], rel=1e-5)


def test_every_process_joins_the_collectives_of_a_save_and_only_the_main_one_writes(tmp_path):
    # Under FSDP, gathering the full state dict is a collective: a process that skips it
    # leaves the others waiting forever at the first checkpoint.
    calls = []

    class AnotherProcess:
        is_main_process = False

        def wait_for_everyone(self):
            calls.append("wait")

        def save_state(self, directory):
            calls.append("save_state")

        def get_state_dict(self, model):
            calls.append("get_state_dict")
            return {}

    checkpoints.save(AnotherProcess(), torch.nn.Linear(2, 2), None, tmp_path, {}, 1, {})
    assert calls == ["wait", "save_state", "get_state_dict", "wait"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [[], ["--freeze-quantized", "--eval-steps", "1"]], ids=["all", "frozen"])
def test_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, tiny_checkpoint, chat_dataset, flags):
    common = tiny_args(tiny_checkpoint, chat_dataset, "OUT", "--max-steps", "3", "--lmbda", "0.5", "--seed", "5",
                       *flags)
    # On a machine without GPUs, accelerate's multi-process launcher runs gloo CPU processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}

    def run(output_dir, launcher, *extra):
        args = [a if a != "OUT" else str(output_dir) for a in common]
        subprocess.run([*launcher, str(ROOT / "train.py"), *args, *extra], check=True, env=env, cwd=ROOT,
                       capture_output=True, timeout=300)  # a hang fails
        return [r["loss"] for r in metrics(output_dir) if r["step"]]

    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    one = run(tmp_path / "one", [*accelerate, "--num_processes", "1"], "--gradient-accumulation-steps", "2")
    two = run(tmp_path / "two", [*accelerate, "--num_processes", "2", "--multi_gpu"],
              "--gradient-accumulation-steps", "1")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_presets_parse(preset):
    c = train.parse_config(["--config", str(preset)])
    assert c.quant_type in ("mxfp4", "int4", "int4_sym")


def test_max_grad_norm_zero_means_no_clipping(tmp_path, tiny_checkpoint, chat_dataset):
    runs = {}
    for name, norm in (("zero", "0"), ("huge", "1e9")):
        assert train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / name, "--max-steps", "1", "--lmbda", "0",
                                    "--warmup-ratio", "0", "--max-grad-norm", norm)) == 0
        runs[name] = weights(tmp_path / name / "checkpoint-1")
    assert all(torch.equal(runs["zero"][k], runs["huge"][k]) for k in runs["zero"])
    teacher = weights(tiny_checkpoint)
    assert not torch.equal(runs["zero"]["model.layers.0.mlp.up_proj.weight"],
                           teacher["model.layers.0.mlp.up_proj.weight"])
    assert metrics(tmp_path / "zero")[0]["grad_norm"] > 0


def test_a_non_finite_last_step_still_leaves_the_final_checkpoint(tmp_path, tiny_checkpoint, chat_dataset,
                                                                  monkeypatch):
    import losses

    real, calls = losses.fused_linear_jsd_loss, []

    def nan_on_the_second_step(student_hidden, *args, **kwargs):
        calls.append(1)
        loss = real(student_hidden, *args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(losses, "fused_linear_jsd_loss", nan_on_the_second_step)
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "0")) == 0
    rows = metrics(out)
    assert [r.get("skipped", False) for r in rows] == [False, True]
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-2"


def test_a_bug_inside_training_keeps_its_traceback(tmp_path, tiny_checkpoint, chat_dataset, monkeypatch):
    import losses

    def broken(*args, **kwargs):
        raise ValueError("a bug in the loss")

    monkeypatch.setattr(losses, "fused_linear_jsd_loss", broken)
    with pytest.raises(ValueError, match="a bug in the loss"):
        train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / "run", "--max-steps", "1", "--lmbda", "0"))


def test_log_with_a_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert train.main(["--log-with", "wandb", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--log-with wandb needs the wandb package, which is not installed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_with_nothing_to_resume_says_so_and_starts(tmp_path, tiny_checkpoint, chat_dataset, caplog):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", "--resume")) == 0
    assert f"--resume: {out} holds no run yet, starting from scratch" in caplog.text
    assert (out / "checkpoint-1").exists()


def test_dropout_is_off_in_teacher_and_student(tmp_path, embedded_tokenizer, chat_dataset):
    from conftest import tiny_model

    path = tmp_path / "dropout_model"
    tiny_model("llama", vocab_size=len(embedded_tokenizer), attention_dropout=0.5).save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    teacher, student, _ = train.load_teacher_and_student(train.parse_config(["--model", str(path)]))
    ids = torch.randint(0, 100, (2, 12))
    for model in (teacher.train(), student.train()):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)
        assert model.config.attention_dropout == 0.0


def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path, tiny_checkpoint, chat_dataset):
    # Rank 1 alone gets SIGTERM during its first step; rank 0 never does.
    script = tmp_path / "train_signalled.py"
    script.write_text(f"""import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import losses, train
real = losses.fused_linear_jsd_loss
def signalled(*args, **kwargs):
    if os.environ.get("RANK") == "1" and not os.environ.get("SIGNALLED"):
        os.environ["SIGNALLED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
losses.fused_linear_jsd_loss = signalled
sys.exit(train.main(sys.argv[1:]))
""")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", "2", "--multi_gpu"]
    result = subprocess.run([*launch, str(script), *tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "5",
                                                              "--lmbda", "0")],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stderr.count("interrupted at step 1; checkpoint saved to") == 2, result.stderr[-3000:]
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-1"
    assert [r["step"] for r in metrics(out)] == [1]


def test_fsdp_rollouts_of_different_lengths_finish_on_both_processes(tmp_path, tiny_checkpoint):
    # Two gloo processes, the quantized student sharded by FSDP2 (fully_shard): every decoding
    # step all-gathers weights, and rank 0 stops after 2 tokens while rank 1 samples 6. Each
    # process's samples must equal those of the same student unsharded in one process.
    script = tmp_path / "fsdp_rollout.py"
    script.write_text(f"""import datetime, json, sys
from types import SimpleNamespace
sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.fsdp import fully_shard
import transformers.generation.utils
import train
from models import load_model
from quant import frozen_quant, quantize_model

# Do not rely on transformers recognising the model as FSDP-managed: accelerate's wrapping may not be.
transformers.generation.utils.is_fsdp_managed_module = lambda module: False
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
model, tokenizer = load_model({str(tiny_checkpoint)!r})
quantize_model(model, "mxfp4")
prompts = [[1, 42, 7 + rank, 99], [1, 5, 6]]
def run(distributed_type, world):
    accelerator = SimpleNamespace(distributed_type=distributed_type, num_processes=world, device=torch.device("cpu"))
    c = SimpleNamespace(temperature=0.9, max_new_tokens=2 if rank == 0 else 6)
    return SimpleNamespace(accelerator=accelerator, c=c, tokenizer=tokenizer)
with frozen_quant(model):
    alone = train.rollout(run(DistributedType.NO, 1), model, prompts, seed=rank)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
with frozen_quant(model):
    sharded = train.rollout(run(DistributedType.FSDP, 2), model, prompts, seed=rank)
open(f"{str(tmp_path)}/rank{{rank}}.json", "w").write(json.dumps({{"rank": rank, "alone": alone, "sharded": sharded}}))
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["rank"]: r for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))}  # not stdout: lines interleave
    assert sorted(rows) == [0, 1]
    for rank, row in rows.items():
        assert row["sharded"] == row["alone"]
        assert max(map(len, row["sharded"])) == (2 if rank == 0 else 6)


# configs/accelerate_fsdp.yaml's FSDP settings, as `accelerate launch --config_file` exports them.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "ACCELERATE_MIXED_PRECISION": "no"}


def fsdp_train(*args) -> str:
    """train.py sharded by FSDP2 over two gloo CPU processes (tests/fsdp_on_cpu.py); its log.
    A collective that only some processes join hangs: the timeout fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **FSDP_ENV}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "fsdp_on_cpu.py"), *args],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_fsdp2_on_two_processes_saves_resumes_and_evaluates_like_one_process(tmp_path, tiny_checkpoint,
                                                                           chat_dataset):
    # 9 held-out examples: shares of 5 and 4, two forward batches of 4 on one process and one on
    # the other unless the shorter share is padded. Seed 5: step 1 of 3 is on-policy.
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(chat_dataset.read_text().splitlines(keepends=True)[:9]))
    common = ("--max-steps", "3", "--lmbda", "0.5", "--seed", "5", "--eval-steps", "1", "--eval-dataset", str(heldout))
    straight, split, alone = tmp_path / "straight", tmp_path / "split", tmp_path / "alone"
    log = fsdp_train(*tiny_args(tiny_checkpoint, chat_dataset, straight, *common))
    assert "FSDP Model saved" in log  # accelerate's FSDP save path, not DDP's
    fsdp_train(*tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--stop-after", "1"))
    assert "resumed from" in fsdp_train(*tiny_args(tiny_checkpoint, chat_dataset, split, *common, "--resume"))
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, alone, *common, "--gradient-accumulation-steps",
                                "2")) == 0

    assert [r["on_policy"] for r in metrics(straight)[1:]] == [False, True, False]
    assert ["heldout_kl" in r for r in metrics(straight)] == [True] * 4
    # the checkpoint is the whole student (gathered, not a shard), trained
    saved, teacher = weights(straight / "checkpoint-3"), weights(tiny_checkpoint)
    assert all(saved[k].shape == t.shape for k, t in teacher.items())
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])
    # resumed from FSDP's sharded state: the same weights and curve as the uninterrupted run
    resumed = weights(split / "checkpoint-3")
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)
    assert [r.get("loss") for r in metrics(split)] == [r.get("loss") for r in metrics(straight)]
    assert [r.get("heldout_kl") for r in metrics(split)] == [r.get("heldout_kl") for r in metrics(straight)]
    # and what one unsharded process computes with the same examples per step
    assert len(metrics(alone)) == 4
    for sharded, single in zip(metrics(straight), metrics(alone)):
        assert sharded["heldout_kl"] == pytest.approx(single["heldout_kl"], rel=1e-4)
        if sharded["step"]:
            assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)
    final = weights(alone / "checkpoint-3")
    for k, t in final.items():
        torch.testing.assert_close(saved[k], t, rtol=1e-4, atol=1e-6)


def test_freeze_quantized_under_fsdp2_keeps_the_quantized_weights_and_matches_one_process(tmp_path, tiny_checkpoint,
                                                                                         chat_dataset):
    # seed 5: step 1 of 2 is on-policy (every process decodes with the sharded, frozen layers)
    common = ("--max-steps", "2", "--lmbda", "0.5", "--seed", "5", "--freeze-quantized")
    sharded, alone = tmp_path / "sharded", tmp_path / "alone"
    fsdp_train(*tiny_args(tiny_checkpoint, chat_dataset, sharded, *common))
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, alone, *common, "--gradient-accumulation-steps",
                                "2")) == 0
    saved, start = weights(sharded / "checkpoint-2"), weights(tiny_checkpoint)
    layers = [n for n in start if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert layers and all(torch.equal(saved[n], start[n]) for n in layers)
    assert not torch.equal(saved["model.norm.weight"], start["model.norm.weight"])
    assert [r["on_policy"] for r in metrics(sharded)] == [False, True]
    for a, b in zip(metrics(sharded), metrics(alone), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def fused_amaxes_apart_and_off_the_first_shard(tiny_checkpoint, path: Path) -> Path:
    """The tiny model with one large weight in k_proj and up_proj among the rows FSDP2 gives
    the second of two processes and a smaller one in v_proj among the first's: a fused
    group's layers then have tensor scales of their own (q, v, k: 2^-15 or 2^-14, 2^-13,
    2^-11; gate, up: 2^-15, 2^-12), and the group's largest magnitude on the first process's
    shards is not the whole group's. Asserts both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant import nvfp4_tensor_scale, tensor_scale_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[-1, 0] = 1.0
            layer.self_attn.v_proj.weight[0, 0] = 0.25
            layer.mlp.up_proj.weight[-1, 0] = 0.5
    linears = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for group in tensor_scale_groups(linears):
        own = [nvfp4_tensor_scale(linears[name].abs().amax()).item() for name in group]
        assert len(set(own)) == len(group), (group, own)
        first_shards = max(linears[name].chunk(2)[0].abs().amax() for name in group)  # fully_shard's dim-0 split
        assert nvfp4_tensor_scale(first_shards) < max(own), group
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(path)
    return path


def test_an_nvfp4_student_sharded_by_fsdp2_trains_like_one_process(tmp_path, tiny_checkpoint, chat_dataset):
    # A fused group's tensor scale reads its siblings' weights. FSDP2 gathers a decoder layer's
    # weights whole before its forward (rollouts too: step 2 is on-policy), so each layer
    # quantizes its whole weight under the whole group's scale, not one from its shard: this
    # model's first shards would give another, which would clip the largest weights.
    model = fused_amaxes_apart_and_off_the_first_shard(tiny_checkpoint, tmp_path / "model")
    common = ("--max-steps", "2", "--lmbda", "0.5", "--seed", "5")
    sharded, alone = tmp_path / "sharded", tmp_path / "alone"
    argv = {}
    for out in (sharded, alone):
        argv[out] = tiny_args(model, chat_dataset, out, *common)
        at = argv[out].index("--quant-type")
        argv[out][at:at + 4] = ["--quant-type", "nvfp4"]
    fsdp_train(*argv[sharded])
    assert train.main([*argv[alone], "--gradient-accumulation-steps", "2"]) == 0
    assert [r["on_policy"] for r in metrics(sharded)] == [r["on_policy"] for r in metrics(alone)] == [False, True]
    for a, b in zip(metrics(sharded), metrics(alone)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    saved, single = weights(sharded / "checkpoint-2"), weights(alone / "checkpoint-2")
    for k, t in single.items():
        torch.testing.assert_close(saved[k], t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rollout_dtype", ["float32", "bfloat16"])
def test_on_policy_samples_come_from_the_quantized_student(tmp_path, tiny_checkpoint, chat_dataset, monkeypatch,
                                                          rollout_dtype):
    from transformers import GenerationMixin

    from quant import FakeQuantLinear

    samplers = []
    real = GenerationMixin.generate

    def recording(model, *args, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
        # the student, with its 4-bit weights (the rollout cache on), not the teacher or a float copy
        samplers.append((len(layers), all(layer._reuse == "frozen" for layer in layers),
                         next(model.parameters()).requires_grad, {str(layer._cache_dtype) for layer in layers}))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / "run", "--max-steps", "2",
                                "--lmbda", "1", "--rollout-dtype", rollout_dtype)) == 0
    assert samplers == [(14, True, True, {f"torch.{rollout_dtype}"})] * 2


def test_gradient_checkpointing_saves_fewer_activations_and_keeps_the_gradients(tiny_checkpoint, capsys,
                                                                               monkeypatch):
    ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    grads, saved_bytes = {}, {}
    for flag in (False, True):
        argv = ["--model", str(tiny_checkpoint), "--quant-type", "mxfp4"] + (["--gradient-checkpointing"] if flag else [])
        _, student, _ = train.load_teacher_and_student(train.parse_config(argv))
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            # the decoder alone: the head's logits would dwarf a tiny model's activations
            loss = student.model(input_ids=ids, use_cache=False).last_hidden_state.square().mean()
        loss.backward()
        grads[flag] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        saved_bytes[flag] = sum(saved)
    assert saved_bytes[True] < 0.7 * saved_bytes[False]  # what the backward keeps from the forward
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-6, atol=1e-6)
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    assert train.main(["--model", str(tiny_checkpoint), "--gradient-checkpointing", "--output_dir", "unused"]) == 2
    assert "--gradient-checkpointing: LlamaForCausalLM does not support" in capsys.readouterr().err


def test_bf16_mixed_precision_keeps_float32_weights_and_exact_mxfp4_values(tmp_path, tiny_checkpoint, chat_dataset):
    from quant import fake_quantize

    from accelerate.state import AcceleratorState

    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        AcceleratorState._reset_state(True)  # one process, one precision: the state is a singleton
        try:
            assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--lmbda", "0",
                                        "--quant-type", "mxfp4", "--mixed-precision", precision)) == 0
        finally:
            AcceleratorState._reset_state(True)
        losses[precision] = [r["loss"] for r in metrics(out)]
        saved = weights(out / "checkpoint-2")
        assert {t.dtype for t in saved.values()} == {torch.float32}
        optimizer = torch.load(out / "checkpoint-2" / "accelerate_state" / "optimizer.bin", weights_only=True)
        assert {t.dtype for s in optimizer["state"].values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert losses["bf16"] != losses["no"]  # bf16 really computed
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["no"]), rtol=0.05, atol=1e-4)
    # what bf16 compute sees of an MXFP4 weight is the weight itself: every MXFP4 value is a bfloat16
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 2, 64).unsqueeze(1)
    q = fake_quantize(w, "mxfp4")
    assert torch.equal(q.to(torch.bfloat16).float(), q)


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_preset_parses_and_trains_a_student_export_can_ship(preset):
    import export

    c = train.parse_config(["--config", str(preset)])
    train.validate(c)  # raises BadInput on a value train.py would refuse
    export.check_exportable({"quant_type": c.quant_type}, "compressed-tensors")


def test_group_by_length_changes_which_examples_share_a_step_and_a_longer_run_regroups_none_already_used(
        tmp_path, tiny_checkpoint, chat_dataset):
    losses = {}
    for name, extra in (("short", ["--max-steps", "2", "--group-by-length"]),
                        ("long", ["--max-steps", "20", "--stop-after", "2", "--group-by-length"]),
                        ("as drawn", ["--max-steps", "2"])):
        out = tmp_path / name.replace(" ", "_")
        assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--seed", "5", "--lmbda", "0", *extra)) == 0
        losses[name] = [r["loss"] for r in metrics(out) if "loss" in r][:2]
    # the first update has learning rate 0 (warm-up), so both steps' losses depend on their examples alone
    assert losses["short"] == losses["long"]
    assert losses["short"] != losses["as drawn"]


@pytest.mark.parametrize("flags", [["--learn-scales"], ["--freeze-quantized"], ["--quantized-lr", "1e-3"]])
def test_parameters_trained_apart_under_fsdp_1_are_refused_before_anything_is_written(
        tmp_path, tiny_checkpoint, chat_dataset, monkeypatch, capsys, flags):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--quant-type", "int4_sym", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flags[0]} under FSDP 1" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("micro_batches, checkpointing, quantizations", [(2, False, 14), (2, True, 56), (1, False, 14)])
def test_a_step_quantizes_each_weight_once_for_all_its_micro_batches_unless_checkpointing(
        tmp_path, tiny_checkpoint, chat_dataset, monkeypatch, micro_batches, checkpointing, quantizations):
    import quant

    calls, reused = [], []
    real, real_reused = quant.fake_quantize, quant.reused_quant
    monkeypatch.setattr(quant, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(quant, "reused_quant", lambda model: reused.append(1) or real_reused(model))
    extra = ["--gradient-checkpointing"] if checkpointing else []
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, tmp_path / "run", "--max-steps", "1", "--lmbda", "0",
                                "--gradient-accumulation-steps", str(micro_batches), *extra)) == 0
    # 14 layers; with checkpointing (which must not hold them all) 2 micro-batches x (forward + rerun)
    assert len(calls) == quantizations
    # one micro-batch gains nothing from the cache and would hold every quantized weight to its end
    assert len(reused) == (micro_batches > 1 and not checkpointing)
