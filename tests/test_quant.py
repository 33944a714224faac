"""quant.py: MXFP4/INT4 numerics against torchao and float64 references, and the student."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from quant import (E2M1_VALUES, FakeQuantLinear, fake_quantize, frozen_quant, pack_int4, pack_mxfp4,
                   quantize_model, resolve_group_size, reused_quant, unpack_int4,
                   unpack_mxfp4)

from conftest import assert_rebuilt_from_its_config, tiny_model

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

TORCHAO_MODE = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def torchao_mxfp4(x, scale_rule="floor"):
    scale, data = mx.to_mx(x.contiguous(), torch.float4_e2m1fn_x2, 32, TORCHAO_MODE[scale_rule])
    return mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, x.dtype), scale, data


def spanning_magnitudes(rows, cols, seed, block=32, low=1e-6, high=1e4):
    """Random weights whose blocks have magnitudes spread log-uniformly over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    block_scale = torch.exp(torch.empty(rows, cols // block, 1).uniform_(math.log(low), math.log(high), generator=g))
    return (torch.randn(rows, cols // block, block, generator=g) * block_scale).reshape(rows, cols)


def with_ties(x, seed):
    """Overwrite a quarter of the blocks with exact ties and saturating values in units of their scale."""
    g = torch.Generator().manual_seed(seed)
    blocks = x.reshape(-1, 32).clone()
    special = torch.tensor(TIES + [6.0, 6.5, 7.0, 7.99, 4.0, 0.0], dtype=x.dtype)
    for i in range(0, blocks.shape[0], 4):
        scale = 2.0 ** torch.randint(-20, 12, (), generator=g).item()
        picks = special[torch.randint(len(special), (32,), generator=g)]
        signs = torch.where(torch.rand(32, generator=g) < 0.5, -1.0, 1.0)
        blocks[i] = picks * signs * scale
        blocks[i, 0] = 4.0 * scale  # amax in [4, 8): the block's scale is exactly `scale`
    return blocks.reshape(x.shape)


def mxfp4_reference(x, scale_rule="floor"):
    """float64 MXFP4 from the spec: nearest grid point, ties to the even code, saturate at 6;
    the block exponent by ``scale_rule``."""
    shape = x.shape
    x = x.double().reshape(-1, 32)
    out = torch.empty_like(x)
    for i, block in enumerate(x):
        amax = block.abs().max().item()
        if amax == 0:
            out[i] = 0
            continue
        floor = math.floor(math.log2(amax)) - 2
        if scale_rule == "floor":
            out[i] = mxfp4_reference_at(block, floor)
        elif scale_rule == "rceil":
            out[i] = mxfp4_reference_at(block, math.ceil(math.log2(float(torch.tensor(amax, dtype=torch.float32) / 6))))
        else:  # mse: floor, floor + 1, floor - 1, the least squared error (ties in that order)
            options = [mxfp4_reference_at(block, floor + shift) for shift in (0, 1, -1)]
            errors = [float(((block - o) ** 2).sum()) for o in options]
            out[i] = options[errors.index(min(errors))]
    return out.reshape(shape)


def mxfp4_reference_at(block: torch.Tensor, e: int) -> torch.Tensor:
    """float64 E2M1 rounding of one block at the scale 2^e (ties to the even code, saturating)."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    scale = 2.0 ** max(-127, min(127, e))
    y = (block / scale).abs().clamp(max=6.0)
    dist = (y[:, None] - grid[None, :]).abs()
    candidates = dist == dist.min(dim=1, keepdim=True).values
    # On a tie prefer the even code (even index into the grid = mantissa bit 0).
    even = candidates & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(1), even.float().argmax(1), candidates.float().argmax(1))
    return grid[idx] * torch.sign(block) * scale


@pytest.mark.parametrize("screened", [True, False], ids=["cpu: float64 where float32 could rank wrong",
                                                         "accelerators: float64 everywhere"])
def test_mxfp4_mse_scale_matches_float64_reference_and_never_errs_more_than_floor(monkeypatch, screened):
    if not screened:
        monkeypatch.setattr(quant, "_SCREENED_DEVICES", ())
    g = torch.Generator().manual_seed(5)
    magnitudes = torch.logspace(-30, 30, 64, base=2).repeat_interleave(32)[:, None]
    x = torch.cat([torch.randn(64 * 32, 32, generator=g) * magnitudes[: 64 * 32],
                   torch.randn(256, 32, generator=g).pow(3), torch.zeros(4, 32)])
    got = fake_quantize(x, "mxfp4", scale_rule="mse")
    assert torch.equal(got.double(), mxfp4_reference(x, "mse"))
    floor_error = (x.double() - fake_quantize(x, "mxfp4").double()).square().sum(-1)
    mse_error = (x.double() - got.double()).square().sum(-1)
    assert (mse_error <= floor_error).all() and (mse_error < floor_error).float().mean() > 0.1
    codes, scales = pack_mxfp4(x, "mse")
    assert torch.equal(unpack_mxfp4(codes, scales), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mxfp4_is_bit_exact_with_torchao_across_magnitudes_ties_and_saturation(dtype, scale_rule, seed):
    x = with_ties(spanning_magnitudes(48, 256, seed), seed).to(dtype)
    expected, _, _ = torchao_mxfp4(x, scale_rule)
    got = fake_quantize(x, "mxfp4", scale_rule=scale_rule)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
def test_mxfp4_matches_float64_reference(scale_rule):
    x = with_ties(spanning_magnitudes(8, 256, seed=7), seed=7)
    assert torch.equal(fake_quantize(x, "mxfp4", scale_rule=scale_rule).double(), mxfp4_reference(x, scale_rule))


def test_mxfp4_ties_round_half_to_even():
    block = torch.tensor([4.0] + TIES + [-t for t in TIES] + [0.0] * 17)  # amax 4: scale 1
    got = fake_quantize(block, "mxfp4")
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert got[1:8].tolist() == expected
    assert got[8:15].tolist() == [-v for v in expected]


def test_mxfp4_floor_saturates_values_between_6_and_8_times_the_scale():
    block = torch.tensor([7.99, 7.0, 6.5, 6.0, 5.5, -7.5] + [0.0] * 26)  # amax in [4, 8): scale 1
    assert fake_quantize(block, "mxfp4")[:6].tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, -6.0]
    # rceil picks scale 2 for amax 7.99, so nothing saturates: 7.99 -> 8 (4 x 2).
    assert fake_quantize(block, "mxfp4", scale_rule="rceil")[0].item() == 8.0


def test_mxfp4_zero_block_stays_zero_with_scale_byte_zero():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.randn(32)
    out = fake_quantize(x, "mxfp4")
    assert torch.equal(out[0], torch.zeros(64)) and torch.equal(out[1, :32], torch.zeros(32))
    _, scales = pack_mxfp4(x)
    assert scales[0].tolist() == [0, 0]
    assert torch.equal(scales, torch_scales(x))


def torch_scales(x):
    return torchao_mxfp4(x)[1].view(torch.uint8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_mxfp4_nan_or_inf_makes_its_block_nan_and_leaves_others_alone(bad):
    x = torch.randn(2, 64)
    x[0, 5] = bad
    out = fake_quantize(x, "mxfp4")
    assert out[0, :32].isnan().all()
    assert torch.equal(out[0, 32:], fake_quantize(x[0, 32:], "mxfp4"))
    assert torch.equal(out[1], fake_quantize(x[1], "mxfp4"))
    codes, scales = pack_mxfp4(x)
    assert scales[0, 0].item() == 255 and unpack_mxfp4(codes, scales)[0, :32].isnan().all()


@pytest.mark.parametrize("scale_rule", ["floor", "rceil"])
def test_pack_mxfp4_matches_torchao_storage_and_round_trips(scale_rule):
    x = with_ties(spanning_magnitudes(16, 128, seed=3), seed=3)
    codes, scales = pack_mxfp4(x, scale_rule)
    _, ao_scale, ao_data = torchao_mxfp4(x, scale_rule)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 64) and scales.shape == (16, 4)
    assert torch.equal(scales, ao_scale.view(torch.uint8))
    assert torch.equal(codes, ao_data.view(torch.uint8))  # same nibble order: element 2k low
    assert torch.equal(unpack_mxfp4(codes, scales), fake_quantize(x, "mxfp4", scale_rule=scale_rule))


def torchao_int4(w, group_size):
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import Int4WeightFakeQuantizer

    config = Int4WeightFakeQuantizeConfig(group_size=group_size, activation_dtype=torch.bfloat16)
    return Int4WeightFakeQuantizer(config)(w)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_matches_torchao_int4_weight_fake_quantizer(group_size, seed):
    w = spanning_magnitudes(32, 256, seed, block=group_size, low=1e-4, high=1e2)
    expected = torchao_int4(w, group_size)
    got = fake_quantize(w, "int4", group_size)
    torch.testing.assert_close(got, expected, rtol=2**-23, atol=0)


def test_int4_matches_float64_reference():
    w = spanning_magnitudes(16, 256, seed=5, block=64, low=1e-3, high=10).double()
    groups = w.reshape(16, -1, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    ref = torch.round((groups - low) / scale).clamp(0, 15) * scale + low
    got = fake_quantize(w.float(), "int4", 64).double().reshape(groups.shape)
    # float32 arithmetic: a few ulp of the group's largest magnitude.
    ulp = groups.abs().amax(-1, keepdim=True) * 2**-23
    assert ((got - ref).abs() <= 4 * ulp).all()


def test_int4_sym_matches_float64_reference():
    w = spanning_magnitudes(16, 256, seed=6, block=32, low=1e-3, high=10).double()
    groups = w.reshape(16, -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    codes = torch.round(groups / amax * 7.5).clamp(-8, 7)
    ref = codes * amax / 7.5
    got = fake_quantize(w.float(), "int4_sym", 32).double().reshape(groups.shape)
    assert ((got - ref).abs() <= 4 * amax * 2**-23).all()
    assert (codes == -8).any() and (codes == 7).any()  # both ends of the range are used


def test_int4_constant_and_zero_groups_are_finite():
    w = torch.zeros(2, 64)
    w[1] = 0.3
    for quant_type in ("int4", "int4_sym"):
        out = fake_quantize(w, quant_type, 32)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(64))
    torch.testing.assert_close(fake_quantize(w, "int4_sym", 32)[1], w[1], rtol=0.07, atol=0)


@pytest.mark.parametrize("quant_type", ["int4", "int4_sym"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_pack_int4_round_trips(quant_type, group_size):
    w = spanning_magnitudes(8, 256, seed=9, block=group_size, low=1e-3, high=10)
    codes, scale, zero = pack_int4(w, group_size, symmetric=quant_type == "int4_sym")
    assert codes.dtype == torch.uint8 and codes.shape == (8, 128) and scale.shape == (8, 256 // group_size)
    assert torch.equal(unpack_int4(codes, scale, zero), fake_quantize(w, quant_type, group_size))


def test_fake_quantize_keeps_leading_dimensions():
    x = torch.randn(3, 5, 64)
    assert torch.equal(fake_quantize(x, "mxfp4"), fake_quantize(x.reshape(15, 64), "mxfp4").reshape(3, 5, 64))


def test_int4_default_group_size_falls_back_where_128_does_not_divide():
    assert resolve_group_size("int4", 1536) == 128
    assert resolve_group_size("int4", 576) == 64  # SmolLM2's hidden size
    assert resolve_group_size("int4", 96) == 32
    assert resolve_group_size("mxfp4", 576) == 32


def test_explicit_group_size_is_strict_and_the_error_names_the_layer():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj with shape \[64, 576\].*group_size 128"):
        resolve_group_size("int4", 576, 128, "model.layers.0.mlp.down_proj", (64, 576))
    with pytest.raises(ValueError, match=r"\[4, 40\].*MXFP4 block size 32"):
        fake_quantize(torch.randn(4, 40), "mxfp4")
    with pytest.raises(ValueError, match="any INT4 group size"):
        fake_quantize(torch.randn(4, 40), "int4")


def test_bad_quant_type_scale_rule_and_dtype_are_rejected_clearly():
    with pytest.raises(ValueError, match="valid: mxfp4, nvfp4, int4, int4_sym"):
        fake_quantize(torch.randn(4, 32), "fp4")
    with pytest.raises(ValueError, match="valid: floor, rceil"):
        fake_quantize(torch.randn(4, 32), "mxfp4", scale_rule="ceil")
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        fake_quantize(torch.ones(4, 32, dtype=torch.long), "mxfp4")
    with pytest.raises(ValueError, match="blocks of 32"):
        fake_quantize(torch.randn(4, 64), "mxfp4", group_size=64)


# ---------------------------------------------------------------- the student

@pytest.mark.parametrize("quant_type", ["mxfp4", "int4", "int4_sym"])
def test_fake_quant_linear_forward_and_straight_through_gradient_are_exact(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    layer = FakeQuantLinear.from_linear(linear, quant_type=quant_type, group_size=32)
    assert layer.weight is linear.weight
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    w_q = fake_quantize(linear.weight.detach(), quant_type, 32)
    assert torch.equal(out, F.linear(x, w_q, linear.bias))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # Identity STE: the latent weight gets exactly the gradient the quantized weight would.
    assert torch.equal(linear.weight.grad, grad_out.t() @ x.detach())
    assert torch.equal(x.grad, grad_out @ w_q)


def test_straight_through_saves_no_extra_tensors_for_backward():
    def saved_count(module):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(torch.randn(3, 64, requires_grad=True))
        return count

    linear = nn.Linear(64, 8)
    assert saved_count(FakeQuantLinear.from_linear(linear)) == saved_count(linear)


def test_quantize_model_wraps_every_linear_but_lm_head_and_shares_parameters(tiny):
    before = {n: p for n, p in tiny.named_parameters()}
    count = quantize_model(tiny, "int4", 32)
    assert count == 7 * tiny.config.num_hidden_layers
    layers = [n for n, m in tiny.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(layers) == count and not any("lm_head" in n for n in layers)
    assert type(tiny.lm_head) is nn.Linear
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # tie intact
    after = {n: p for n, p in tiny.named_parameters()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert tiny.config.fake_quant["quant_type"] == "int4"
    assert set(tiny.config.fake_quant["layer_group_sizes"].values()) == {32}


def test_quantized_student_output_is_close_to_but_not_the_teacher(tiny):
    ids = torch.randint(0, 128, (2, 12))
    teacher_logits = tiny(ids).logits
    student = copy.deepcopy(tiny)
    quantize_model(student, "mxfp4")
    student_logits = student(ids).logits
    assert not torch.equal(student_logits, teacher_logits)
    assert (student_logits - teacher_logits).abs().max() < teacher_logits.abs().max()


def test_quantize_model_records_per_layer_default_group_sizes():
    model = tiny_model("llama", hidden_size=96, intermediate_size=256, head_dim=24)
    quantize_model(model, "int4")
    sizes = model.quant_settings.layer_group_sizes
    assert sizes["model.layers.0.mlp.down_proj"] == 128 and sizes["model.layers.0.self_attn.q_proj"] == 32


def test_quantize_model_errors_leave_the_model_untouched():
    model = tiny_model("llama", hidden_size=80, head_dim=20)
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        quantize_model(model, "int4", 64)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="no nn.Linear to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)), "mxfp4")
    quantize_model(model, "int4", 16)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4", 16)


def test_saved_student_is_rebuilt_exactly_from_its_config(tmp_path, tiny):
    quantize_model(tiny, "int4_sym", 32)
    assert_rebuilt_from_its_config(tiny, tmp_path, torch.randint(0, 128, (1, 10)))


def frozen_forwards(model, ids, monkeypatch, forwards: int) -> list:
    """Run ``forwards`` forwards inside ``frozen_quant``, each giving the uncached forward's
    logits; returns the list that gains an item at every ``fake_quantize`` call from then on."""
    with torch.no_grad():
        expected = model(ids).logits
    calls = []
    real = quant.fake_quantize
    monkeypatch.setattr(quant, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), frozen_quant(model):
        for _ in range(forwards):
            assert torch.equal(model(ids).logits, expected)
    return calls


def test_frozen_quant_quantizes_once_and_matches_the_uncached_forward(tiny, monkeypatch):
    quantize_model(tiny, "mxfp4")
    ids = torch.randint(0, 128, (2, 8))
    calls = frozen_forwards(tiny, ids, monkeypatch, 3)
    assert len(calls) == 14  # once per layer, not once per forward
    with torch.no_grad():
        tiny(ids)
    assert len(calls) == 28  # the cache is gone after the block


def test_frozen_quant_refuses_a_forward_that_would_train_on_the_cache(tiny):
    quantize_model(tiny, "int4", 32)
    with frozen_quant(tiny), pytest.raises(RuntimeError, match="torch.no_grad"):
        tiny(torch.randint(0, 128, (1, 4)))


def test_an_optimizer_step_inside_frozen_quant_invalidates_the_cache(tiny):
    quantize_model(tiny, "int4", 32)
    ids = torch.randint(0, 128, (1, 6))
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.5)
    with frozen_quant(tiny):
        with torch.no_grad():
            stale = tiny(ids).logits
        for p in tiny.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        with torch.no_grad():
            cached = tiny(ids).logits
    with torch.no_grad():
        fresh = tiny(ids).logits
    assert not torch.equal(cached, stale)
    assert torch.equal(cached, fresh)


def accumulated_gradients(model, micro_batches, cache: bool) -> dict[str, torch.Tensor]:
    """The gradients of a step of micro-batches (gradient accumulation), optionally inside
    reused_quant, from zero."""
    model.zero_grad(set_to_none=True)
    with reused_quant(model) if cache else contextlib.nullcontext():
        for ids in micro_batches:
            model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setup", ["full", "lora", "learned scales"])
def test_reused_quant_quantizes_once_a_step_with_the_same_gradients(tiny, monkeypatch, setup):
    from lora import LoraSettings, add_lora
    from models import enable_gradient_checkpointing

    quantize_model(tiny, "int4_sym" if setup == "learned scales" else "mxfp4", 32)
    if setup == "lora":
        add_lora(tiny, LoraSettings(r=4, alpha=8))
        for layer in tiny.modules():  # B = 0 would hide a gradient that reaches A wrongly
            if isinstance(layer, FakeQuantLinear):
                torch.nn.init.normal_(layer.lora_B, std=0.02)
    if setup == "learned scales":
        quant.learn_scales(tiny)
    enable_gradient_checkpointing(tiny.train())  # the backward reruns each forward
    g = torch.Generator().manual_seed(3)
    micro_batches = [torch.randint(0, 128, (2, 9), generator=g) for _ in range(3)]
    expected = accumulated_gradients(tiny, micro_batches, cache=False)
    calls = []
    real = quant.fake_quantize
    monkeypatch.setattr(quant, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = accumulated_gradients(tiny, micro_batches, cache=True)
    assert got.keys() == expected.keys() and len(got) > 0
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    if setup != "learned scales":  # those take their scales' gradients through the quantizer each forward
        assert len(calls) == 14  # once per layer for 3 micro-batches and their reruns


@pytest.mark.parametrize("quant_type", ["mxfp4", "int4_sym"])
def test_reused_quant_under_autocast_holds_what_autocast_computes_with_and_gives_the_same_gradients(tiny,
                                                                                                   quant_type):
    quantize_model(tiny, quant_type, 32)
    tiny.train()
    g = torch.Generator().manual_seed(4)
    micro_batches = [torch.randint(0, 128, (2, 9), generator=g) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = accumulated_gradients(tiny, micro_batches, cache=False)
        with reused_quant(tiny):
            tiny(micro_batches[0])
            layer = tiny.model.layers[0].mlp.up_proj
            assert layer._cache[1].dtype == torch.bfloat16  # not a float32 copy beside autocast's
        got = accumulated_gradients(tiny, micro_batches, cache=True)
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]) for name in expected)


def test_frozen_layers_train_the_rest_under_a_held_frozen_cache_as_without_it_under_autocast(tiny, monkeypatch):
    # --freeze-quantized: the quantized weights frozen, one quantization held for every step,
    # in autocast's dtype; a nested cache (a rollout's, an evaluation's) starts from it
    quantize_model(tiny, "mxfp4", 32)
    tiny.train()
    for layer in (m for m in tiny.modules() if isinstance(m, FakeQuantLinear)):
        layer.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    micro_batches = [torch.randint(0, 128, (2, 9), generator=g) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = accumulated_gradients(tiny, micro_batches, cache=False)
        calls = []
        real = quant.fake_quantize
        monkeypatch.setattr(quant, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
        with frozen_quant(tiny):
            got = accumulated_gradients(tiny, micro_batches, cache=False)
            with torch.no_grad(), frozen_quant(tiny):
                tiny(micro_batches[0])
            assert tiny.model.layers[0].mlp.up_proj._cache[1].dtype == torch.bfloat16
    assert len(calls) == 14  # once per layer
    assert got.keys() == expected.keys() and "model.norm.weight" in got
    assert not any(name.endswith("_proj.weight") for name in got)
    assert all(got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]) for name in expected)


def test_reused_quant_requantizes_after_an_optimizer_step_and_outlives_a_nested_rollout_cache(tiny, monkeypatch):
    quantize_model(tiny, "mxfp4")
    ids = torch.randint(0, 128, (1, 6))
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.5)
    calls = []
    real = quant.fake_quantize
    monkeypatch.setattr(quant, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    with reused_quant(tiny):
        tiny(ids, labels=ids).loss.backward()
        optimizer.step()
        with torch.no_grad(), frozen_quant(tiny):
            tiny(ids)
        assert len(calls) == 28
        trained = tiny(ids).logits  # the step's cache again, requantized after the update
        assert len(calls) == 42
        tiny(ids).logits.sum().backward()
        assert len(calls) == 42
    assert torch.equal(trained, tiny(ids).logits)


def test_a_bfloat16_rollout_cache_holds_the_exact_mxfp4_weights_and_computes_in_bfloat16(tiny):
    import torch.nn.functional as F

    quantize_model(tiny, "mxfp4")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    layer = tiny.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with frozen_quant(tiny):
            full, full_weight = tiny(ids).logits, layer.quantized_weight()
        with frozen_quant(tiny, dtype=torch.bfloat16):
            half, half_weight = tiny(ids).logits, layer.quantized_weight()
            y = layer(x)
        after = tiny(ids).logits
    assert half_weight.dtype == torch.bfloat16 and torch.equal(half_weight.float(), full_weight)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x.bfloat16(), half_weight).float())
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert torch.equal(after, full)  # outside the block: float32 again
