"""Learned INT4 scales (quant.learn_scales): LSQ against a float64 reference, and a student
whose scales train, save, load, evaluate and export as the function it computes."""

import math

import pytest
import torch

from quant import (FakeQuantLinear, QuantSettings, _LearnedScaleInt4, fake_quantize, frozen_quant, int4_statistics,
                   is_learned_statistic, learn_scales, quantize_model)

from conftest import tiny_model

SYMMETRIC = {"int4_sym": True, "int4": False}


def weights_across_magnitudes(rows, cols, group, seed):
    """Groups whose magnitudes spread log-uniformly over 1e-3 .. 1e3, one all-zero group and
    one constant group."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.empty(rows, cols // group, 1).uniform_(math.log(1e-3), math.log(1e3), generator=g))
    w = (torch.randn(rows, cols // group, group, generator=g) * magnitude)
    w[0, 0] = 0.0
    w[-1, -1] = 0.25
    return w.reshape(rows, cols)


def lsq_reference(w, statistics, group, symmetric):
    """LSQ / LSQ+ written as the papers do, in float64 autograd: clamp the position, round
    straight through, the scale's and offset's gradients scaled by 1 / sqrt(g * Qp)."""
    def gradient_scaled(x, factor):
        return (x - x * factor).detach() + x * factor

    wg = w.reshape(w.shape[0], -1, group)
    if symmetric:
        (amax,) = statistics
        low, high = -8, 7
        scale, offset = amax.unsqueeze(-1) / 7.5, torch.zeros(())
    else:
        minimum, maximum = statistics
        low, high = 0, 15
        scale, offset = (maximum - minimum).unsqueeze(-1) / 15, minimum.unsqueeze(-1)
    factor = 1 / math.sqrt(group * high)
    scale = gradient_scaled(scale, factor)
    offset = gradient_scaled(offset, factor) if not symmetric else offset
    position = ((wg - offset) / scale).clamp(low, high)
    code = position + (torch.round(position) - position).detach()
    return (code * scale + offset).reshape(w.shape)


@pytest.mark.parametrize("quant_type", ["int4_sym", "int4"])
@pytest.mark.parametrize("group", [32, 128])
def test_learned_statistics_start_as_the_rule_bit_for_bit(quant_type, group):
    w = weights_across_magnitudes(8, 256, group, seed=1)
    statistics = int4_statistics(w, group, SYMMETRIC[quant_type])
    assert torch.equal(_LearnedScaleInt4.apply(w, group, *statistics), fake_quantize(w, quant_type, group))


@pytest.mark.parametrize("quant_type", ["int4_sym", "int4"])
@pytest.mark.parametrize("seed", [2, 3])
def test_learned_scale_values_and_gradients_match_the_float64_lsq_reference(quant_type, seed):
    group = 64
    w = weights_across_magnitudes(8, 256, group, seed)
    w[0, :group] = torch.linspace(-1, 1, group)  # no zero group here: its gradient is a 0/0 in float64
    symmetric = SYMMETRIC[quant_type]
    g = torch.Generator().manual_seed(seed)
    # Trained statistics sit off the weights' extremes: some codes clip, some groups do not reach an end.
    statistics = [s * (1 + 0.3 * (torch.rand(s.shape, generator=g) - 0.4)) for s in int4_statistics(w, group, symmetric)]
    if not symmetric:
        statistics[1] = torch.maximum(statistics[1], statistics[0] + 1e-3 * statistics[0].abs() + 1e-6)
    upstream = torch.randn(w.shape, generator=g)

    ours = [s.clone().requires_grad_() for s in statistics]
    w_ours = w.clone().requires_grad_()
    out = _LearnedScaleInt4.apply(w_ours, group, *ours)
    out.backward(upstream)

    theirs = [s.double().requires_grad_() for s in statistics]
    w_theirs = w.double().requires_grad_()
    ref = lsq_reference(w_theirs, theirs, group, symmetric)
    ref.backward(upstream.double())

    magnitude = w.abs().reshape(8, -1, group).amax(-1, keepdim=True).double()
    error = (out.double() - ref).abs().reshape(8, -1, group)
    assert (error <= 8 * magnitude * 2**-23).all()
    assert torch.equal(w_ours.grad, w_theirs.grad.float())  # passed inside the range, 0 where the code clips
    passed = w_ours.grad == upstream
    assert passed.any() and (~passed).any() and (w_ours.grad[~passed] == 0).all()
    for mine, reference in zip(ours, theirs):
        scale = (upstream.abs() * w.abs()).reshape(8, -1, group).sum(-1).double() / reference.detach().abs() + 1e-30
        assert ((mine.grad.double() - reference.grad).abs() <= 1e-5 * scale).all()
        assert (mine.grad != 0).any()


def test_learn_scales_keeps_the_function_and_adds_only_the_statistics(tiny):
    quantize_model(tiny, "int4_sym", 32)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = tiny(ids).logits
    names_before = {n for n, _ in tiny.named_parameters()}
    assert learn_scales(tiny) == 14
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, before)
    added = {n for n, _ in tiny.named_parameters()} - names_before
    assert len(added) == 14 and all(n.endswith(".weight_amax") and is_learned_statistic(n) for n in added)
    assert tiny.quant_settings.learn_scales and tiny.config.fake_quant["learn_scales"]
    with pytest.raises(ValueError, match="learned already"):
        learn_scales(tiny)


def test_learn_scales_refuses_mxfp4():
    model = tiny_model("llama")
    quantize_model(model, "mxfp4")
    with pytest.raises(ValueError, match="INT4"):
        learn_scales(model)


@pytest.mark.parametrize("quant_type", ["int4_sym", "int4"])
def test_a_step_moves_the_grid_without_any_latent_change(quant_type):
    """The lever the GPTQ start needs: with the latent weights frozen, training the scales
    alone changes the 4-bit weights and lowers the loss."""
    torch.manual_seed(0)
    layer = FakeQuantLinear(64, 16, bias=False, quant_type=quant_type, group_size=32)
    with torch.no_grad():  # Gaussian groups with one outlier each: a tighter grid errs less
        layer.weight.copy_(torch.randn(16, 64) * 0.02)
        layer.weight[:, ::32] *= 6
    model = torch.nn.Sequential(layer)
    model.quant_settings = QuantSettings(quant_type, 32)
    learn_scales(model)
    layer.weight.requires_grad_(False)
    x = torch.randn(256, 64)
    optimizer = torch.optim.Adam([p for n, p in layer.named_parameters() if is_learned_statistic(n)], lr=2e-3)
    losses = []
    with torch.no_grad():
        start = layer.quantized_weight().clone()
    for _ in range(50):
        loss = (layer(x) - x @ layer.weight.T).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        assert not torch.equal(layer.quantized_weight(), start)
    assert losses[-1] < 0.95 * losses[0]


def test_frozen_quant_requantizes_after_a_scale_step(tiny):
    quantize_model(tiny, "int4", 32)
    learn_scales(tiny)
    ids = torch.randint(0, 128, (1, 6))
    statistic = next(p for n, p in tiny.named_parameters() if n.endswith("weight_max"))
    with frozen_quant(tiny):
        with torch.no_grad():
            stale = tiny(ids).logits
            statistic.mul_(1.5)  # an optimizer step: in place, on the parameter
            cached = tiny(ids).logits
    with torch.no_grad():
        fresh = tiny(ids).logits
    assert not torch.equal(cached, stale)
    assert torch.equal(cached, fresh)


def test_a_student_with_learned_scales_saves_loads_and_exports_as_it_computes(tmp_path, embedded_tokenizer):
    """Saved in the checkpoint layout, loaded by students.load_student (eval.py's loader),
    exported to compressed-tensors and loaded by transformers: the same logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from export import write_compressed_tensors
    from students import load_student

    model = tiny_model("qwen3", vocab_size=len(embedded_tokenizer))
    quantize_model(model, "int4_sym", 32)
    learn_scales(model)
    with torch.no_grad():  # trained scales: away from the weights' amax
        for name, p in model.named_parameters():
            if is_learned_statistic(name):
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.1, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, len(embedded_tokenizer), (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        rule = model.model.layers[0].mlp.up_proj
        assert not torch.equal(rule.quantized_weight(), fake_quantize(rule.weight, "int4_sym", 32))
    model.save_pretrained(tmp_path / "checkpoint")
    embedded_tokenizer.save_pretrained(tmp_path / "checkpoint")
    loaded, _, settings = load_student(tmp_path / "checkpoint")
    assert settings["learn_scales"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)

    (tmp_path / "export").mkdir()
    write_compressed_tensors(loaded, embedded_tokenizer, settings, tmp_path / "export")
    shipped = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32,
                                                   quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, layer in loaded.named_modules():
        if isinstance(layer, FakeQuantLinear):
            assert torch.equal(shipped.get_submodule(name).weight, layer.quantized_weight().detach()), name
    with torch.no_grad():
        torch.testing.assert_close(shipped(ids).logits, expected, rtol=0, atol=1e-5)
