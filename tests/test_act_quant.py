"""quant.py's activation quantization (W4A4, ``act_quant``): against the float64 references of
test_quant.py (MXFP4) and test_nvfp4.py (NVFP4) and torchao's quantizers; straight-through
gradients, the student's layers, the rollout cache, checkpoints, eval.py's low-precision path."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_rebuilt_from_its_config, tiny_model
from quant import (ACTIVATION_SCALE_RULE, FakeQuantLinear, QuantSettings, fake_quantize, fake_quantize_activation,
                   frozen_quant, nvfp4_tensor_scale, quantize_model)
from test_nvfp4 import nvfp4_reference
from test_quant import frozen_forwards, mxfp4_reference, with_ties

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

BLOCK = {"mxfp4": 32, "nvfp4": 16}


def activations(batch, tokens, hidden, seed, low=-30, high=30):
    """[batch, tokens, hidden]: each token's magnitude drawn log-uniformly over [2^low, 2^high],
    its blocks spread over a few binades around it, as hidden states have outlier channels."""
    g = torch.Generator().manual_seed(seed)
    per_token = torch.exp2(torch.empty(batch, tokens, 1).uniform_(low, high, generator=g))
    per_block = torch.exp2(torch.empty(batch, tokens, hidden // 16, 1).uniform_(-3, 3, generator=g))
    x = torch.randn(batch, tokens, hidden // 16, 16, generator=g) * per_block
    return x.reshape(batch, tokens, hidden) * per_token


def reference(x, quant_type, tensor_amax=None):
    if quant_type == "mxfp4":
        return mxfp4_reference(x, "floor")
    return nvfp4_reference(x, tensor_amax)


# ---------------------------------------------------------------- numerics

def test_activations_take_the_floor_rule():
    assert ACTIVATION_SCALE_RULE == "floor"


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("low, high", [(-30, 30), (-30, -20), (20, 30), (-4, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_activations_match_the_float64_reference_across_magnitudes(quant_type, low, high, seed):
    """NVFP4's dynamic tensor scale is the whole tensor's: across 60 binades the small tokens'
    block scales clamp to E4M3's least (2^-9) and most of their values round to 0, as the
    format makes them."""
    x = activations(2, 24, 128, seed, low, high)
    assert torch.equal(fake_quantize_activation(x, quant_type).double(), reference(x, quant_type))


def test_mxfp4_activations_round_ties_half_to_even_and_saturate_as_the_weights():
    x = with_ties(activations(1, 64, 128, seed=3, low=-8, high=8).reshape(64, 128), seed=3).reshape(2, 32, 128)
    assert torch.equal(fake_quantize_activation(x, "mxfp4").double(), mxfp4_reference(x, "floor"))


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_a_zero_token_stays_zero_and_leaves_the_others_as_they_were(quant_type):
    x = activations(1, 6, 64, seed=4, low=-2, high=2)
    zeroed = x.clone()
    zeroed[0, 2] = 0
    out = fake_quantize_activation(zeroed, quant_type)
    assert torch.equal(out[0, 2], torch.zeros(64))
    assert torch.equal(out.double(), reference(zeroed, quant_type))
    others = [0, 1, 3, 4, 5]
    assert torch.equal(out[0, others], fake_quantize_activation(x[0, others], quant_type))
    assert torch.equal(fake_quantize_activation(torch.zeros(3, 64), quant_type), torch.zeros(3, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_token_does_what_it_does_in_a_weight(bad):
    """MXFP4: that token's block turns NaN, nothing else. NVFP4: the tensor scale, and so every
    token of the tensor (the batch), turns NaN, as a weight's does."""
    x = activations(2, 3, 64, seed=5, low=-2, high=2)
    x[1, 2, 40] = bad
    out = fake_quantize_activation(x, "mxfp4")
    assert out[1, 2, 32:].isnan().all() and not out[1, 2, :32].isnan().any()
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[1, 2, 32:] = False
    assert torch.equal(out[clean], fake_quantize_activation(x.masked_fill(~clean, 0), "mxfp4")[clean])
    assert fake_quantize_activation(x, "nvfp4").isnan().all()


def test_mxfp4_tokens_are_quantized_independently():
    x = activations(3, 7, 96, seed=6)
    out = fake_quantize_activation(x, "mxfp4")
    for b in range(3):
        for t in range(7):
            assert torch.equal(out[b, t], fake_quantize_activation(x[b, t], "mxfp4"))


def test_nvfp4_tokens_are_independent_given_the_tensor_scale_and_alone_only_where_block_scales_stay_normal():
    """NVFP4's tensor scale is the activation tensor's (dynamic per tensor), so a token is not
    quantized as it would be alone: given the batch's scale it is (per-token blocks), and
    since the scale is a power of two, alone it is the same wherever its block scales stay in
    E4M3's normal range under the batch's scale. A token 2^20 below the largest is not."""
    x = activations(2, 5, 64, seed=7, low=-3, high=3)
    out = fake_quantize_activation(x, "nvfp4")
    amax = x.abs().amax()
    t = nvfp4_tensor_scale(amax)
    for b in range(2):
        for token in range(5):
            alone_under_the_batch_scale = fake_quantize_activation(x[b, token], "nvfp4", tensor_amax=amax)
            assert torch.equal(out[b, token], alone_under_the_batch_scale)
            block_scales = x[b, token].reshape(-1, 16).abs().amax(-1) / 6 / t
            assert (block_scales >= 2 ** -6).all()  # normal under the batch's scale: alone it is the same
            assert torch.equal(out[b, token], fake_quantize_activation(x[b, token], "nvfp4"))
    small = x.clone()
    small[1, 4] *= 2.0 ** -20
    out = fake_quantize_activation(small, "nvfp4")
    assert torch.equal(out.double(), nvfp4_reference(small))
    assert not torch.equal(out[1, 4], fake_quantize_activation(small[1, 4], "nvfp4"))
    assert torch.equal(out[0], fake_quantize_activation(small[0], "nvfp4", tensor_amax=small.abs().amax()))


def test_a_static_tensor_amax_sets_the_nvfp4_tensor_scale():
    x = activations(2, 4, 64, seed=8, low=-2, high=2)
    t = 2.0 ** -3
    static = torch.tensor(448 * 6 * t)
    assert nvfp4_tensor_scale(static).item() == t
    assert torch.equal(fake_quantize_activation(x, "nvfp4", tensor_amax=static).double(),
                       nvfp4_reference(x, static.item()))


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_passes_straight_through(quant_type, dtype):
    x = activations(2, 3, 64, seed=9, low=-4, high=4).to(dtype).requires_grad_()
    out = fake_quantize_activation(x, quant_type)
    assert out.dtype == dtype and torch.equal(out.detach(), fake_quantize(x.detach(), quant_type,
                                                                          scale_rule="floor"))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_only_mxfp4_and_nvfp4_quantize_activations():
    for quant_type in ("int4", "int4_sym"):
        message = f"activation quantization \\(W4A4\\) is for mxfp4 and nvfp4; {quant_type}"
        with pytest.raises(ValueError, match=message):
            fake_quantize_activation(torch.randn(2, 64), quant_type)
        with pytest.raises(ValueError, match="activation quantization"):
            FakeQuantLinear(64, 8, quant_type=quant_type, group_size=32, act_quant=True)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="activation quantization"):
        quantize_model(model, "int4_sym", 32, act_quant=True)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


@pytest.mark.parametrize("quant_type, hidden", [("mxfp4", 48), ("nvfp4", 40)])
def test_a_layer_the_block_does_not_divide_is_refused_as_for_weights_alone(quant_type, hidden):
    model = tiny_model("llama", hidden_size=hidden, head_dim=hidden // 4)
    with pytest.raises(ValueError, match=f"in_features {hidden} is not a multiple of the {quant_type.upper()} block"):
        quantize_model(model, quant_type, act_quant=True)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match=f"{quant_type.upper()} block size"):
        fake_quantize_activation(torch.randn(2, hidden), quant_type)


# ---------------------------------------------------------------- torchao

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_mxfp4_activations_are_bit_exact_with_torchaos_floor_quantizer(dtype, seed):
    x = activations(2, 32, 256, seed, low=-30, high=30)
    x = with_ties(x.reshape(64, 256), seed).reshape(2, 32, 256).to(dtype)
    scale, data = mx.to_mx(x.reshape(-1, 256).contiguous(), torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    expected = mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, dtype).reshape(x.shape)
    assert torch.equal(fake_quantize_activation(x, "mxfp4"), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_activations_are_torchaos_given_the_same_tensor_scale(seed):
    """torchao's dynamic activation quantizer (``nvfp4_linear``) takes amax / 2688 itself as the
    tensor scale, ours the power of two above it (quant.py says why); given ours, its
    quantizer computes our values wherever its 2^-6 clamp of block scales does not bite."""
    x = activations(4, 16, 128, seed, low=-6, high=6)
    t = nvfp4_tensor_scale(x.abs().amax())
    flat = x.reshape(-1, 128)
    ao = nvfp4_tensor.NVFP4Tensor.to_nvfp4(flat, per_tensor_scale=t).dequantize(torch.float32).reshape(x.shape)
    normal = (x.reshape(*x.shape[:-1], -1, 16).abs().amax(-1, keepdim=True) / 6 / t >= 2 ** -6)
    normal = normal.expand(*x.shape[:-1], 8, 16).reshape(x.shape)
    assert normal.float().mean() > 0.9
    assert torch.equal(fake_quantize_activation(x, "nvfp4")[normal], ao[normal])


# ---------------------------------------------------------------- the student

@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_a_w4a4_layer_computes_with_quantized_input_and_weight_and_passes_both_gradients_straight_through(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    layer = FakeQuantLinear.from_linear(linear, quant_type=quant_type, act_quant=True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    x_q = fake_quantize(x.detach(), quant_type, scale_rule=ACTIVATION_SCALE_RULE)
    w_q = fake_quantize(linear.weight.detach(), quant_type)
    assert torch.equal(out, F.linear(x_q, w_q, linear.bias))
    assert not torch.equal(out, F.linear(x, w_q, linear.bias))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ w_q)
    assert torch.equal(linear.weight.grad, grad_out.reshape(-1, 16).t() @ x_q.reshape(-1, 64))
    assert "act_quant=True" in repr(layer)


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_quantize_model_records_act_quant_and_old_settings_read_as_weight_only(tiny, quant_type):
    quantize_model(tiny, quant_type, act_quant=True)
    layers = [m for m in tiny.modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == 14 and all(m.act_quant for m in layers)
    assert tiny.quant_settings.act_quant and tiny.config.fake_quant["act_quant"] is True
    assert QuantSettings.from_dict({"quant_type": quant_type}).act_quant is False


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_frozen_quant_caches_the_weights_only_and_gives_the_unfrozen_logits(tiny, quant_type, monkeypatch):
    weight_only = tiny_model(tiny.config.model_type)
    quantize_model(weight_only, quant_type)
    quantize_model(tiny, quant_type, act_quant=True)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(tiny(ids).logits, weight_only(ids).logits)
    calls = frozen_forwards(tiny, ids, monkeypatch, 2)
    assert len(calls) == 14 + 2 * 14  # the weights once, the inputs at every forward


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_a_bfloat16_rollout_cache_quantizes_the_input_before_computing_in_bfloat16(tiny, quant_type):
    quantize_model(tiny, quant_type, act_quant=True)
    layer = tiny.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    x_q = fake_quantize(x, quant_type, scale_rule=ACTIVATION_SCALE_RULE)
    assert torch.equal(x_q.bfloat16().float(), x_q)  # exact in bfloat16
    with torch.no_grad(), frozen_quant(tiny, dtype=torch.bfloat16):
        y = layer(x)
        weight = layer.quantized_weight()
    assert torch.equal(y, F.linear(x_q.bfloat16(), weight).float())


@pytest.mark.parametrize("quant_type", ["mxfp4", "nvfp4"])
def test_a_saved_w4a4_student_is_rebuilt_exactly_from_its_config(tmp_path, tiny, quant_type):
    quantize_model(tiny, quant_type, act_quant=True)
    reloaded = assert_rebuilt_from_its_config(tiny, tmp_path, torch.randint(0, 128, (1, 10)))
    assert reloaded.quant_settings.act_quant and all(
        m.act_quant for m in reloaded.modules() if isinstance(m, FakeQuantLinear))


def test_eval_below_float32_keeps_quantizing_the_inputs(tiny):
    import eval as evaluation

    quantize_model(tiny, "nvfp4", act_quant=True)
    layer = tiny.model.layers[1].self_attn.o_proj
    weight = layer.quantized_weight().detach().bfloat16()
    plain = evaluation.on_device(tiny, torch.device("cpu"), torch.bfloat16).model.layers[1].self_attn.o_proj
    assert type(plain) is nn.Linear
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        assert torch.equal(plain(x), F.linear(fake_quantize(x, "nvfp4"), weight))


def test_eval_rounds_a_w4a4_ptq_row_with_its_inputs_quantized_and_keeps_weight_only_cache_keys():
    import eval as evaluation

    w4a16 = {"quant_type": "mxfp4", "group_size": None, "scale_rule": "mse", "skip": ["lm_head"]}
    rows = evaluation.ptq_rows([w4a16, {**w4a16, "act_quant": False}, {**w4a16, "act_quant": True}])
    assert rows == {"ptq mxfp4 gNone": w4a16, "ptq mxfp4 gNone w4a4": {**w4a16, "act_quant": True}}
    model = evaluation.ptq_baseline(tiny_model("llama"), rows["ptq mxfp4 gNone w4a4"])
    assert model.quant_settings.act_quant
    assert math.isfinite(model(torch.randint(0, 128, (1, 5))).logits.sum().item())
