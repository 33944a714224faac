"""quant.py's NVFP4: against a float64 reference written from the format's definition and
against torchao's ``nvfp4_quantize`` (which runs on CPU); the student's fused-group tensor
scales, checkpoints, rollout cache and adapters."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
from conftest import assert_rebuilt_from_its_config, tiny_model
from quant import (E2M1_VALUES, FakeQuantLinear, fake_quantize, frozen_quant, nvfp4_tensor_scale, pack_nvfp4,
                   quantize_model, quantize_model_from_settings, resolve_group_size, unpack_nvfp4)

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # halfway between neighbouring E2M1 values


# ---------------------------------------------------------------- the float64 reference

def e4m3_grid() -> torch.Tensor:
    """Every non-negative E4M3 value, ascending, from the bit layout (bias 7, subnormals
    m * 2^-9, 0x7F NaN): code c is at index c, so an even index is an even mantissa."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        values.append(mantissa * 2.0 ** -9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float64)


def nearest_even(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The grid value nearest each y >= 0 (within the grid's range), ties to the even index."""
    above = torch.searchsorted(grid, y).clamp(1, len(grid) - 1)
    low, high = grid[above - 1], grid[above]
    take_high = (high - y < y - low) | ((high - y == y - low) & (above % 2 == 0))
    return torch.where(take_high, high, low)


def nvfp4_reference(x: torch.Tensor, tensor_amax: float | None = None) -> torch.Tensor:
    """NVFP4 in float64: t = the least power of two with 448 * 6 * t >= amax (1 for an
    all-zero tensor); s = block amax / (6 t) clamped to [2^-9, 448] and rounded to the
    nearest E4M3 value, ties to even; v = the nearest E2M1 value to w / (s t), ties to
    even, saturating at 6; w_hat = v s t."""
    x64 = x.double()
    amax = x64.abs().max().item() if tensor_amax is None else float(tensor_amax)
    k = 0
    if amax > 0:
        k = math.ceil(math.log2(amax / 2688))
        while 2688 * 2.0 ** k < amax:
            k += 1
        while 2688 * 2.0 ** (k - 1) >= amax:
            k -= 1
    t = 2.0 ** k
    blocks = x64.reshape(*x.shape[:-1], -1, 16)
    s = (blocks.abs().amax(-1, keepdim=True) / (6 * t)).clamp(2.0 ** -9, 448)
    s = nearest_even(s, e4m3_grid())
    y = (blocks / (s * t)).abs().clamp(max=6)
    v = nearest_even(y, torch.tensor(E2M1_VALUES, dtype=torch.float64)) * torch.sign(blocks)
    return (v * s * t).reshape(x.shape)


# ---------------------------------------------------------------- test data

def spanning_magnitudes(rows, cols, seed, low=1e-6, high=1e4):
    """Random weights whose 16-element blocks have magnitudes spread log-uniformly over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(rows, cols // 16, 1).uniform_(math.log(low), math.log(high), generator=g))
    return (torch.randn(rows, cols // 16, 16, generator=g) * scale).reshape(rows, cols)


def tie_blocks(block_scales, tensor_scale, seed, near=False):
    """Blocks of exact ties (``near``: the float32 neighbours of ties) at the given block
    scales: each block's first element is 6 s t, so its scale is exactly s."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in block_scales:
        picks = torch.tensor(TIES, dtype=torch.float64)[torch.randint(len(TIES), (16,), generator=g)]
        block = (picks * s * tensor_scale).float()  # exact: few significant bits
        if near:
            direction = torch.where(torch.rand(16, generator=g) < 0.5, -math.inf, math.inf)
            block = torch.nextafter(block, direction.float())
        block = block * torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0)
        block[0] = 6 * s * tensor_scale
        rows.append(block)
    return torch.stack(rows)


def a_tensor_with_ties(seed, near=False):
    """Random blocks across magnitudes, then tie blocks at normal and subnormal E4M3 scales,
    in a tensor whose amax 168 = 2688 / 16 makes t = 1/16."""
    grid = e4m3_grid()
    scales = torch.cat([grid[1:8], grid[8:126:9], grid[[56, 64, 126]]]).tolist()  # subnormals, a spread, 448
    ties = tie_blocks(scales, 1 / 16, seed, near).reshape(-1, 64)
    x = torch.cat([spanning_magnitudes(ties.shape[0], 64, seed, 1e-6, 1e1), ties])
    x[0, 0] = 168.0
    return x


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low, high", [(1e-6, 1e4), (1e-6, 1e-3), (1e-2, 1e1), (1e1, 1e4)])
def test_nvfp4_matches_the_float64_reference_across_magnitudes(seed, low, high):
    x = spanning_magnitudes(32, 256, seed, low, high)
    assert torch.equal(fake_quantize(x, "nvfp4").double(), nvfp4_reference(x))


@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_matches_the_float64_reference_at_ties_and_next_to_them_at_every_kind_of_block_scale(seed, near):
    x = a_tensor_with_ties(seed, near)
    _, block_scales, tensor_scale = pack_nvfp4(x)
    assert tensor_scale.item() == 1 / 16
    assert (block_scales.float() < 2 ** -6).any() and (block_scales.float() == 448).any()  # subnormal and max
    assert torch.equal(fake_quantize(x, "nvfp4").double(), nvfp4_reference(x))


def test_nvfp4_ties_round_half_to_even():
    block = torch.tensor([6.0] + TIES + [-t for t in TIES] + [0.0])  # t = 2^-8, s = 6 / 6 / t = 256: s t = 1
    got = fake_quantize(block, "nvfp4")
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert got[1:8].tolist() == expected
    assert got[8:15].tolist() == [-v for v in expected]


def test_nvfp4_block_scale_rounds_to_nearest_even_e4m3_and_values_saturate_at_6():
    # t = 1 (amax 2688). A block whose amax / 6 = 13.5 lies halfway between the E4M3 values
    # 13 and 14: the even mantissa, 14. One at 13.25 rounds down to 13, so its largest
    # value, 79.5 / 13 > 6, saturates to 6.
    x = torch.zeros(3, 16)
    x[0, 0] = 2688.0
    x[1, 0], x[1, 1] = 81.0, 80.0
    x[2, 0], x[2, 1] = 79.5, -79.5
    _, block_scales, tensor_scale = pack_nvfp4(x)
    assert tensor_scale.item() == 1.0 and block_scales.float()[:, 0].tolist() == [448.0, 14.0, 13.0]
    out = fake_quantize(x, "nvfp4")
    assert out[1, :2].tolist() == [84.0, 84.0]  # 81 / 14 = 5.79 -> 6; 80 / 14 = 5.71 -> 6
    assert out[2, :2].tolist() == [78.0, -78.0]  # 6 * 13


def test_torchs_e4m3_cast_rounds_to_nearest_even_at_every_midpoint_subnormals_included():
    grid = e4m3_grid()
    midpoints = (grid[:-1] + grid[1:]) / 2
    even = torch.where(torch.arange(len(midpoints)) % 2 == 0, grid[:-1], grid[1:])
    assert torch.equal(midpoints.float().to(torch.float8_e4m3fn).double(), even)
    assert torch.equal(grid.float().to(torch.float8_e4m3fn).double(), grid)


def test_the_tensor_scale_is_the_least_power_of_two_that_keeps_block_scales_within_448():
    assert nvfp4_tensor_scale(torch.tensor(2688.0)).item() == 1.0
    assert nvfp4_tensor_scale(torch.tensor(2688.0 * (1 + 2 ** -20))).item() == 2.0
    assert nvfp4_tensor_scale(torch.tensor(2688.0 * 0.5)).item() == 0.5
    assert nvfp4_tensor_scale(torch.tensor(2688.0 * 0.26)).item() == 0.5
    assert nvfp4_tensor_scale(torch.tensor(0.0)).item() == 1.0
    assert nvfp4_tensor_scale(torch.tensor(1e-40)).item() == 2.0 ** -127  # float32's smallest normal / 2
    assert nvfp4_tensor_scale(torch.tensor(math.inf)).isnan()
    x = spanning_magnitudes(16, 64, seed=3)
    _, block_scales, tensor_scale = pack_nvfp4(x)
    assert 224 <= block_scales.float().max() <= 448
    assert tensor_scale.item() == 2.0 ** math.ceil(math.log2(x.abs().max().item() / 2688))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_is_bit_exact_with_torchao_given_the_same_tensor_scale(seed, dtype):
    """torchao's ``nvfp4_quantize`` (pure PyTorch, runs on CPU) with our tensor scale: the
    same codes, block scales and dequantized values, with two exceptions. torchao clamps
    block scales at E4M3's smallest normal 2^-6 (no subnormals): there its scale is 2^-6.
    And it multiplies by the reciprocal of s * t where the format divides: at an exact tie
    under a block scale that is not a power of two (bfloat16 weights have them) its
    quotient misses the tie, which then does not round to even. Both are left to the
    float64 reference; the tie blocks here sit at power-of-two block scales."""
    x = spanning_magnitudes(48, 256, seed)
    ties = tie_blocks([2.0 ** e for e in range(-6, 8)] * 8, nvfp4_tensor_scale(x.abs().amax()).item(), seed)
    x = torch.cat([x, ties.reshape(-1, 256)]).to(dtype)
    codes, block_scales, tensor_scale = pack_nvfp4(x)
    ao_scales, ao_codes = nvfp4_tensor.nvfp4_quantize(x, 16, per_tensor_scale=tensor_scale)
    ao = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=tensor_scale).dequantize(torch.float32)
    normal = block_scales.float() >= 2 ** -6
    assert normal.float().mean() > 0.2 and (~normal).any()
    assert torch.equal(ao_scales.float()[normal], block_scales.float()[normal])
    assert (ao_scales.float()[~normal] == 2 ** -6).all()
    scale = block_scales.double().repeat_interleave(16, dim=-1) * tensor_scale.item()
    quotient = (x.double() / scale).abs()
    tie = (quotient[..., None] == torch.tensor(TIES, dtype=torch.float64)).any(-1)
    tie_off_power_of_two = tie & (torch.frexp(scale).mantissa != 0.5)
    assert tie.sum() > 100 and tie_off_power_of_two.float().mean() < (0.01 if dtype == torch.bfloat16 else 1e-9)
    compared = normal.repeat_interleave(16, dim=-1) & ~tie_off_power_of_two
    nibbles = quant._unpack_nibbles  # same nibble order, -0 kept
    assert torch.equal(nibbles(ao_codes.view(torch.uint8))[compared], nibbles(codes)[compared])
    got = fake_quantize(x, "nvfp4")
    assert got.dtype == dtype and torch.equal(got.float()[compared], ao[compared])
    assert torch.equal(unpack_nvfp4(codes, block_scales, tensor_scale, dtype), got)


@pytest.mark.parametrize("seed", [0, 1])
def test_given_torchaos_own_tensor_scale_the_numerics_are_torchaos(seed):
    """torchao's tensor scale is amax / 2688 itself; ours rounds it up to a power of two
    (quant.py says why). Under torchao's, the block scales and values are torchao's, bar
    its 2^-6 clamp; its reciprocal multiplication differs from our division only next to
    rounding boundaries, which these random weights do not reach."""
    x = spanning_magnitudes(48, 256, seed)
    tensor_scale = nvfp4_tensor.per_tensor_amax_to_scale(x.abs().amax())
    assert tensor_scale != nvfp4_tensor_scale(x.abs().amax())
    values, block_scale = quant._nv_quantize(x, tensor_scale)
    ao_scales, ao_codes = nvfp4_tensor.nvfp4_quantize(x, 16, per_tensor_scale=tensor_scale)
    normal = block_scale.squeeze(-1) >= 2 ** -6
    assert torch.equal(ao_scales.float()[normal], block_scale.squeeze(-1)[normal])
    same = normal.repeat_interleave(8, dim=-1)
    assert torch.equal(ao_codes.view(torch.uint8)[same], quant._pack_nibbles(quant._e2m1_codes(values))[same])
    ao = nvfp4_tensor.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=tensor_scale).dequantize(torch.float32)
    ours = quant._nv_dequantize(values, block_scale, tensor_scale).flatten(-2)
    same = normal.repeat_interleave(16, dim=-1)
    assert torch.equal(ours[same], ao[same])


def test_nvfp4_zero_tensor_and_zero_blocks_stay_zero_with_the_smallest_block_scale():
    assert torch.equal(fake_quantize(torch.zeros(2, 32), "nvfp4"), torch.zeros(2, 32))
    x = torch.zeros(2, 32)
    x[1, 16:] = torch.randn(16, generator=torch.Generator().manual_seed(0))
    out = fake_quantize(x, "nvfp4")
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(32)) and torch.equal(out[1, :16], torch.zeros(16))
    codes, block_scales, tensor_scale = pack_nvfp4(x)
    assert block_scales.float()[:, 0].tolist() == [2 ** -9, 2 ** -9]
    assert torch.equal(unpack_nvfp4(codes, block_scales, tensor_scale), out)
    _, _, tensor_scale = pack_nvfp4(torch.zeros(1, 16))
    assert tensor_scale.item() == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nvfp4_nan_or_inf_anywhere_makes_the_whole_tensor_nan(bad):
    x = torch.randn(2, 64)
    x[0, 5] = bad
    assert fake_quantize(x, "nvfp4").isnan().all()
    codes, block_scales, tensor_scale = pack_nvfp4(x)
    assert tensor_scale.isnan() and unpack_nvfp4(codes, block_scales, tensor_scale).isnan().all()


def test_nvfp4_weights_are_exact_in_bfloat16():
    x = spanning_magnitudes(16, 128, seed=4, low=1e-4, high=1e2)
    got = fake_quantize(x, "nvfp4")
    assert torch.equal(got.bfloat16().float(), got)
    assert torch.equal(fake_quantize(x.bfloat16(), "nvfp4"), fake_quantize(x.bfloat16().float(), "nvfp4").bfloat16())


def test_a_given_tensor_amax_sets_the_tensor_scale_which_matters_only_where_block_scales_turn_subnormal():
    x = spanning_magnitudes(4, 64, seed=5, low=1e-2, high=1)
    # a power-of-two t moves every block scale by whole binades: exact while they stay normal
    amax = x.abs().amax() * 10
    assert torch.equal(fake_quantize(x, "nvfp4", tensor_amax=amax), fake_quantize(x, "nvfp4"))
    amax = x.abs().amax() * 1000
    assert torch.equal(fake_quantize(x, "nvfp4", tensor_amax=amax).double(), nvfp4_reference(x, amax.item()))
    assert not torch.equal(fake_quantize(x, "nvfp4", tensor_amax=amax), fake_quantize(x, "nvfp4"))
    assert pack_nvfp4(x, amax)[2] == nvfp4_tensor_scale(amax)


def test_nvfp4_blocks_are_16_and_a_dimension_they_do_not_divide_is_an_error_naming_the_layer():
    assert resolve_group_size("nvfp4", 576) == 16
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj with shape \[64, 40\].*NVFP4 block size 16"):
        resolve_group_size("nvfp4", 40, None, "model.layers.0.mlp.down_proj", (64, 40))
    with pytest.raises(ValueError, match="nvfp4 uses blocks of 16 by definition; got group_size=32"):
        fake_quantize(torch.randn(4, 64), "nvfp4", group_size=32)
    model = tiny_model("llama", hidden_size=40, head_dim=10)
    with pytest.raises(ValueError, match=r"with shape \[\d+, 40\]: in_features 40 is not a multiple of the NVFP4"):
        quantize_model(model, "nvfp4")
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


# ---------------------------------------------------------------- the student

def test_an_nvfp4_layer_computes_with_its_quantized_weight_and_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    layer = FakeQuantLinear.from_linear(linear, quant_type="nvfp4")
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    w_q = fake_quantize(linear.weight.detach(), "nvfp4")
    assert torch.equal(out, F.linear(x, w_q, linear.bias))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(linear.weight.grad, grad_out.t() @ x.detach())
    assert torch.equal(x.grad, grad_out @ w_q)


def fused(model, layer=0):
    """(attention, MLP) of a decoder layer: the modules holding the fused groups."""
    return model.model.layers[layer].self_attn, model.model.layers[layer].mlp


def test_fused_layers_share_one_tensor_scale_from_the_largest_of_them(tiny):
    quantize_model(tiny, "nvfp4")
    groups = tiny.quant_settings.tensor_scale_groups
    assert groups == [[f"model.layers.{i}.{part}" for part in parts] for i in range(2)
                      for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                    ("mlp.gate_proj", "mlp.up_proj"))]
    assert tiny.config.fake_quant["tensor_scale_groups"] == groups
    attention, mlp = fused(tiny)
    with torch.no_grad():  # far enough above q and v that some of their block scales turn subnormal
        attention.k_proj.weight.mul_(1e5)
    k_amax = attention.k_proj.weight.abs().amax()
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        expected = fake_quantize(layer.weight.detach(), "nvfp4", tensor_amax=k_amax)
        assert torch.equal(layer.quantized_weight(), expected)
    own = fake_quantize(attention.q_proj.weight.detach(), "nvfp4")
    assert not torch.equal(attention.q_proj.quantized_weight(), own)
    for layer in (attention.o_proj, mlp.down_proj):  # fused with nothing: their own
        assert torch.equal(layer.quantized_weight(), fake_quantize(layer.weight.detach(), "nvfp4"))
    gate_up_amax = torch.maximum(mlp.gate_proj.weight.abs().amax(), mlp.up_proj.weight.abs().amax())
    assert torch.equal(mlp.up_proj.quantized_weight(),
                       fake_quantize(mlp.up_proj.weight.detach(), "nvfp4", tensor_amax=gate_up_amax))


def test_a_fused_group_with_a_skipped_layer_does_not_share(tiny):
    quantize_model(tiny, "nvfp4", skip=("lm_head", "v_proj"))
    assert all(len(group) == 2 for group in tiny.quant_settings.tensor_scale_groups)
    assert not fused(tiny)[0].q_proj.fused_with


def test_a_saved_nvfp4_student_is_rebuilt_exactly_from_its_config(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    quantize_model(tiny, "nvfp4")
    with torch.no_grad():
        fused(tiny)[0].k_proj.weight.mul_(1000)
    reloaded = assert_rebuilt_from_its_config(tiny, tmp_path, torch.randint(0, 128, (1, 10)))
    tampered = dict(reloaded.config.fake_quant, tensor_scale_groups=[])
    with pytest.raises(ValueError, match="do not match the recorded quantization settings"):
        quantize_model_from_settings(AutoModelForCausalLM.from_pretrained(tmp_path), tampered)


def test_the_rollout_cache_requantizes_a_layer_when_a_fused_siblings_weight_changes(tiny):
    quantize_model(tiny, "nvfp4")
    attention, _ = fused(tiny)
    with torch.no_grad(), frozen_quant(tiny):
        before = attention.q_proj.quantized_weight()
        attention.k_proj.weight.mul_(1e5)  # in place, as an optimizer step: q's tensor scale grows
        after = attention.q_proj.quantized_weight()
        assert not torch.equal(after, before)
        assert torch.equal(after, fake_quantize(attention.q_proj.weight, "nvfp4",
                                                tensor_amax=attention.k_proj.weight.abs().amax()))


def test_a_bfloat16_rollout_cache_holds_the_exact_nvfp4_weights(tiny):
    quantize_model(tiny, "nvfp4")
    layer = fused(tiny)[0].q_proj
    with torch.no_grad():
        with frozen_quant(tiny):
            full = layer.quantized_weight()
        with frozen_quant(tiny, dtype=torch.bfloat16):
            half = layer.quantized_weight()
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), full)


def test_an_adapted_nvfp4_layer_takes_its_tensor_scale_from_the_merged_weights_of_its_group(tiny):
    from lora import LoraSettings, add_lora

    quantize_model(tiny, "nvfp4")
    add_lora(tiny, LoraSettings(r=4, alpha=8.0))
    _, mlp = fused(tiny)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (mlp.gate_proj, mlp.up_proj):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    merged = {layer: (layer.weight + layer.lora_scale * (layer.lora_B @ layer.lora_A)).detach()
              for layer in (mlp.gate_proj, mlp.up_proj)}
    amax = max(w.abs().amax() for w in merged.values())
    assert torch.equal(mlp.up_proj.quantized_weight(),
                       fake_quantize(merged[mlp.up_proj], "nvfp4", tensor_amax=amax))
    assert not torch.equal(mlp.up_proj.quantized_weight(), fake_quantize(mlp.up_proj.weight.detach(), "nvfp4"))


# ---------------------------------------------------------------- the fused groups keep one tensor scale
# A student whose fused layers' amaxes are far apart, so that each would have a tensor scale of
# its own (8 to 64 times apart), and whose blocks span seven decades, so that the tensor scale a
# layer quantizes with shows in its weights (its smallest blocks' E4M3 scales are subnormal, and
# differ between the two). Each test fails if a layer of a group quantizes with its own scale.

SPREAD_AMAXES = {"q_proj": 1.0, "k_proj": 64.0, "v_proj": 8.0, "gate_proj": 0.5, "up_proj": 4.0}


def spread_fused_amaxes(model, seed=0):
    """In place: every fused layer's weight random, its blocks' magnitudes log-uniform over
    [1e-7, 1] of its largest, that largest ``SPREAD_AMAXES`` of its kind."""
    with torch.no_grad():
        for index, (name, layer) in enumerate(model.named_modules()):
            kind = name.rpartition(".")[2]
            if kind in SPREAD_AMAXES and isinstance(layer, nn.Linear):
                w = spanning_magnitudes(*layer.weight.shape, seed=seed + index, low=1e-7, high=1.0)
                layer.weight.copy_(w / w.abs().amax() * SPREAD_AMAXES[kind])
    return model


def spread_student(arch="llama", **kwargs):
    model = tiny_model(arch)
    quantize_model(model, "nvfp4", **kwargs)
    return spread_fused_amaxes(model)


def group_quantized(model) -> dict[str, torch.Tensor]:
    """Each fused layer's latent weight quantized under its group's tensor scale (from the
    largest magnitude of the group's latent weights), by name. Asserts the test can tell: in
    every group, every layer but the largest quantizes differently under its own."""
    expected = {}
    for group in model.quant_settings.tensor_scale_groups:
        latent = {name: model.get_submodule(name).latent_weight().detach() for name in group}
        amax = max(w.abs().amax() for w in latent.values())
        own = {name for name, w in latent.items()
               if not torch.equal(fake_quantize(w, "nvfp4"), fake_quantize(w, "nvfp4", tensor_amax=amax))}
        assert len(own) == len(group) - 1, (group, own)
        expected.update({name: fake_quantize(w, "nvfp4", tensor_amax=amax) for name, w in latent.items()})
    return expected


def assert_forward_uses_group_scales(model, ids, dtype=torch.float32):
    """A forward of ``model`` (in whatever cache the caller set up): every fused layer's output
    is its (quantized, W4A4) input times its weight quantized under its group's tensor scale (in
    ``dtype``, that of a rollout cache)."""
    expected, seen = group_quantized(model), {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach(), output.detach())
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in expected]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == sorted(expected)
    for name, (x, out) in seen.items():
        layer = model.get_submodule(name)
        if layer.act_quant:  # W4A4: the layer quantizes its input first
            x = quant.fake_quantize_activation(x, "nvfp4")
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        assert torch.equal(out, F.linear(x.to(dtype), expected[name].to(dtype), bias).to(out.dtype)), name


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cache", ["none", "training step (reused_quant)", "rollout (frozen_quant)",
                                   "bfloat16 rollout (frozen_quant)"])
def test_every_fused_layer_computes_with_its_groups_tensor_scale(tiny, cache):
    quantize_model(tiny, "nvfp4")
    spread_fused_amaxes(tiny)
    if cache == "none":
        assert_forward_uses_group_scales(tiny.train(), IDS)
    elif cache.startswith("training"):
        with quant.reused_quant(tiny.train()):
            assert_forward_uses_group_scales(tiny, IDS)
            assert_forward_uses_group_scales(tiny, IDS)  # the second forward reuses the first's
    else:
        dtype = torch.bfloat16 if cache.startswith("bfloat16") else None
        with torch.no_grad(), frozen_quant(tiny, dtype):
            assert_forward_uses_group_scales(tiny, IDS, dtype or torch.float32)
            assert_forward_uses_group_scales(tiny, IDS, dtype or torch.float32)  # from the cache


@pytest.mark.parametrize("act_quant", [False, True])
def test_a_student_rebuilt_from_its_saved_config_keeps_the_groups_tensor_scales(tmp_path, act_quant):
    # what students.load_student (eval.py, export.py) and train.py (--student-model) rebuild
    from transformers import AutoModelForCausalLM

    spread_student(act_quant=act_quant).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    quantize_model_from_settings(reloaded, reloaded.config.fake_quant)
    assert reloaded.quant_settings.act_quant == act_quant
    assert_forward_uses_group_scales(reloaded, IDS)


def test_with_adapters_a_group_takes_its_tensor_scale_from_the_merged_weights():
    from lora import LoraSettings, add_lora

    student = spread_student()
    add_lora(student, LoraSettings(r=4, alpha=8.0))
    attention = fused(student)[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # q's adapter makes q the group's largest: k and v take q's merged amax
        q = attention.q_proj
        q.lora_B.copy_(torch.randn(q.lora_B.shape, generator=generator))
        q.lora_B.mul_(200 / (q.lora_scale * q.lora_B @ q.lora_A).abs().amax())
    merged_amax = q.latent_weight().abs().amax()
    assert nvfp4_tensor_scale(merged_amax) > nvfp4_tensor_scale(attention.k_proj.weight.abs().amax())
    assert_forward_uses_group_scales(student, IDS)
    with torch.no_grad(), frozen_quant(student):
        assert_forward_uses_group_scales(student, IDS)
