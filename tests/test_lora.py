"""lora.py: adapters inside the quantizer, Q(W + s * B A); merged checkpoints; resume; bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import train
from lora import ADAPTER_FILE, LoraSettings, add_lora
from quant import FakeQuantLinear, fake_quantize, quantize_model
from test_train import tiny_args


@pytest.mark.parametrize("quant_type", ["mxfp4", "int4"])
def test_an_adapted_layer_quantizes_the_merged_weight_and_trains_only_its_adapters(tiny, quant_type):
    quantize_model(tiny, quant_type, group_size=32 if quant_type == "int4" else None)
    assert add_lora(tiny, LoraSettings(r=4, alpha=8.0)) == 14
    layer = tiny.model.layers[0].mlp.up_proj
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
    x = torch.randn(3, 5, layer.in_features, generator=generator)
    upstream = torch.randn(3, 5, layer.out_features, generator=generator)
    (layer(x) * upstream).sum().backward()

    w, a, b = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    merged = layer.weight + 2.0 * (layer.lora_B @ layer.lora_A)
    q = fake_quantize(merged.detach(), quant_type, layer.group_size).double()
    torch.testing.assert_close(layer(x).double(), x.double() @ q.T, rtol=1e-6, atol=1e-6)
    assert not torch.equal(fake_quantize(merged.detach(), quant_type, layer.group_size),
                           fake_quantize(w.float(), quant_type, layer.group_size))
    # straight-through: dL/dW' = upstream^T x, then the chain rule through W' = W + s B A
    grad_merged = upstream.double().reshape(-1, layer.out_features).T @ x.double().reshape(-1, layer.in_features)
    torch.testing.assert_close(layer.lora_B.grad.double(), 2.0 * grad_merged @ a.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad.double(), 2.0 * b.T @ grad_merged, rtol=1e-5, atol=1e-6)
    trained = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_A", ".lora_B")) for n in trained)
    assert layer.weight.grad is None


def test_adapters_start_at_zero_so_the_student_starts_at_round_to_nearest(tiny):
    quantize_model(tiny, "mxfp4")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = tiny(ids).logits
        add_lora(tiny, LoraSettings(r=2, alpha=2.0, targets=("q_proj", "v_proj")))
        assert torch.equal(tiny(ids).logits, before)
    adapted = [n for n, m in tiny.named_modules() if isinstance(m, FakeQuantLinear) and hasattr(m, "lora_A")]
    assert adapted and all(n.endswith(("q_proj", "v_proj")) for n in adapted)


def test_under_bf16_autocast_the_layer_quantizes_the_merged_weight_the_checkpoint_holds(tiny):
    from lora import merged_state_dict, merged_weight

    quantize_model(tiny, "mxfp4")
    add_lora(tiny, LoraSettings(r=4, alpha=8.0))
    layer = tiny.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    state = {k: v.detach() for k, v in tiny.state_dict().items()}
    saved = merged_state_dict(state, 2.0)["model.layers.0.mlp.up_proj.weight"]  # what the checkpoint holds
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --mixed-precision bf16
        trained = merged_weight(layer)
    assert trained.dtype == torch.float32 and torch.equal(trained.detach(), saved)


def lora_run(tiny_checkpoint, chat_dataset, out, *extra):
    return tiny_args(tiny_checkpoint, chat_dataset, out, "--lmbda", "0", "--lora-r", "4", "--lora-alpha", "8",
                     "--learning-rate", "2e-2", *extra)


def test_a_lora_checkpoint_is_the_merged_student_that_computes_the_trained_function(tmp_path, tiny_checkpoint,
                                                                                   chat_dataset):
    import students

    out = tmp_path / "run"
    argv = lora_run(tiny_checkpoint, chat_dataset, out, "--max-steps", "3")
    assert train.main(argv) == 0
    checkpoint = checkpoints.latest_checkpoint(out)
    saved = load_file(checkpoint / "model.safetensors")
    assert not any("lora" in k for k in saved)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["fake_quant"]["lora"] == {"r": 4, "alpha": 8.0, "targets": ["all-linear"]}

    # the training-time student: the start weights with the saved adapters
    _, trained, _ = train.load_teacher_and_student(train.parse_config(argv))
    checkpoints.load_weights(trained, checkpoint)
    assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if n.endswith("lora_B"))
    deployed, _, settings = students.load_student(checkpoint)
    assert settings["lora"]["r"] == 4
    teacher = load_file(tiny_checkpoint / "model.safetensors")
    for name, tensor in saved.items():  # only the adapted weights moved
        assert torch.equal(tensor, teacher[name]) == ("proj" not in name), name
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deployed(ids).logits, trained.eval()(ids).logits, rtol=1e-6, atol=1e-6)


def test_a_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, tiny_checkpoint, chat_dataset):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(lora_run(tiny_checkpoint, chat_dataset, straight, "--max-steps", "4")) == 0
    assert train.main(lora_run(tiny_checkpoint, chat_dataset, split, "--max-steps", "4", "--stop-after", "2")) == 0
    assert train.main(lora_run(tiny_checkpoint, chat_dataset, split, "--max-steps", "4", "--resume")) == 0
    for file in ("model.safetensors", ADAPTER_FILE):
        a, b = load_file(straight / "checkpoint-4" / file), load_file(split / "checkpoint-4" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


@pytest.mark.parametrize("extra, message", [
    (["--lora-r", "-1"], "--lora-r must be >= 1"),
    (["--lora-r", "4", "--lora-dropout", "0.1"], "--lora-dropout must be 0"),
    (["--lora-r", "4", "--lora-targets", "nosuch"], "--lora-targets nosuch match no quantized linear layer"),
    (["--lora-r", "4", "--quant-type", "none"], "--lora-r adapts the fake-quantized layers"),
])
def test_bad_lora_settings_are_one_line_and_write_nothing(tmp_path, tiny_checkpoint, chat_dataset, capsys, extra,
                                                          message):
    out = tmp_path / "run"
    assert train.main(tiny_args(tiny_checkpoint, chat_dataset, out, "--max-steps", "1", *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_resuming_a_lora_run_without_its_lora_flags_is_refused(tmp_path, tiny_checkpoint, chat_dataset, capsys):
    out = tmp_path / "run"
    assert train.main(lora_run(tiny_checkpoint, chat_dataset, out, "--max-steps", "2", "--stop-after", "1")) == 0
    plain = tiny_args(tiny_checkpoint, chat_dataset, out, "--lmbda", "0", "--learning-rate", "2e-2", "--max-steps", "2",
                      "--resume")
    assert train.main(plain) == 2
    assert "different configuration (lora_alpha, lora_r)" in capsys.readouterr().err
    assert checkpoints.latest_checkpoint(out) == out / "checkpoint-1"
