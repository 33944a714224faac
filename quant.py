"""Fake quantization of weights to MXFP4, NVFP4 and INT4, and the 4-bit student built from it.

Numerics are pure tensor functions (``fake_quantize``, ``pack_*``/``unpack_*``); the
student is a thin module swap (``quantize_model``) that makes every ``nn.Linear`` but
``lm_head`` see its quantized weight while the gradient flows straight through to the
full-precision latent weight.

Formats (quantization runs along the last dimension, the reduction dimension of a
``nn.Linear`` weight):

* ``mxfp4``: OCP Microscaling v1.0. Blocks of 32 share an E8M0 scale 2^e; elements are
  E2M1 {0, 0.5, 1, 1.5, 2, 3, 4, 6}, rounded to nearest with ties to even and saturated
  at +-6. ``scale_rule="floor"`` is the spec's e = floor(log2(amax)) - 2 (so magnitudes in
  (6, 8) x scale clip to 6), bit-exact with torchao's ``to_mx(..., FLOOR)``;
  ``scale_rule="rceil"`` is NVIDIA's e = ceil(log2(amax / 6)) used by some deployment
  kernels (nothing saturates); ``scale_rule="mse"`` picks per block whichever of the floor
  exponent and its two neighbours gives the least squared error (still one E8M0 byte per
  block: it deploys like the others). e is clamped to [-127, 127]; an all-zero block stays zero
  with scale byte 0. A block holding NaN or +-Inf dequantizes to all NaN (scale byte
  0xFF), so a diverging latent weight fails loudly instead of silently saturating.
  torchao divides by 2^-126 where e = -127 (a denormal-scale workaround) and so differs
  from this exact 2^-127 only for blocks whose amax is below 2^-125.
* ``nvfp4``: NVIDIA's FP4. Blocks of 16 share an FP8 E4M3 scale s, the tensor a float32
  scale t: w_hat = v * s * t, v the E2M1 values above. t is the power of two at or above
  amax(|W|) / (448 * 6), so the largest block's s lands in [224, 448]; s is
  block amax / 6 / t rounded to nearest even onto E4M3 (subnormals included), clamped to
  [2^-9, 448] (no block has a zero scale); v = E2M1(w / (s * t)), ties to even, saturating
  at +-6. torchao and ModelOpt take t = amax / (448 * 6) itself; a power of two makes
  s * t and 1 / t exact, and compressed-tensors stores 1 / t and unpacks to bfloat16, so
  only then is the shipped weight the trained one bit for bit (bfloat16 rollouts too).
  It costs no resolution: t moves every block scale by whole binades, so a layer's
  weights depend on t only where a block scale falls below E4M3's normal range (2^-6).
  Given the same t the numerics are torchao's ``nvfp4_quantize``, except that torchao
  clamps s at 2^-6 and multiplies by the reciprocal of s * t (ties at other than
  power-of-two s then miss round-to-even). Layers that serving engines fuse into one
  matmul (q/k/v, gate/up: ``FUSED_LAYERS``) share one t, from the amax of them all, as
  vLLM requires. A NaN or +-Inf anywhere makes t, and so the whole tensor (and its fused
  group), NaN.
* ``int4``: group-wise asymmetric INT4 with a float zero point, the numerics of torchao's
  ``Int4WeightFakeQuantizer`` for bf16 activations: scale = max(max - min, 1e-6) / 15,
  u = clamp(round((w - min) / scale), 0, 15), w_hat = (u - 8) * scale + (min + 8 * scale).
* ``int4_sym``: the symmetric W4A16 convention of compressed-tensors:
  scale = amax / 7.5, q = clamp(round(w / scale), -8, 7), w_hat = q * scale.

Activations (``act_quant``, W4A4; MXFP4 and NVFP4 only): the input of every quantized layer
is fake-quantized too, per token in blocks along its last (reduction) dimension, with the
weight's format and the same quantizers (``fake_quantize_activation``), straight-through.
MXFP4 activations take the floor rule (``ACTIVATION_SCALE_RULE`` says why). NVFP4
activations take their tensor scale from the activation tensor's own amax at every forward
(dynamic, as torchao's ``NVFP4DynamicActivationNVFP4WeightConfig``), a power of two as the
weights'; the block scales and values of a token then depend on the other tokens of the
tensor only where a block scale falls below E4M3's normal range (2^-6) under the larger
scale. A NaN or +-Inf in an activation does what it does in a weight: MXFP4 makes its block
NaN, NVFP4 the whole tensor (every token of the batch).

Learned scales (``learn_scales``, INT4 only): the statistics each group's grid is computed
from (``int4_sym``: amax; ``int4``: min and max) become trainable parameters, initialised
from the latent weight so the student starts as the same function, trained by LSQ's
gradient (Esser et al. 2020; LSQ+ for the minimum) scaled by 1 / sqrt(group size * Qp) as in
ParetoQ; the latent weight's gradient is zero where its code clips, as in LSQ. The codes
are those of the formulas above with the learned statistics in place of the measured ones.
Under Adam the gradient scale cancels (it only weighs the statistics in gradient clipping):
a statistic moves about the learning rate a step in absolute units, so a group whose amax
is not far above lr x steps can collapse (an amax at zero quantizes its group to 0).

All rounding is ``torch.round`` (half to even). Group sizes never pad: a dimension the
block or group size does not divide is an error that names the layer and its shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUANT_TYPES = ("mxfp4", "nvfp4", "int4", "int4_sym")
SCALE_RULES = ("floor", "rceil", "mse")
MX_BLOCK_SIZE = 32
NV_BLOCK_SIZE = 16
# The formats whose block size is part of their definition.
FIXED_BLOCK_SIZES = {"mxfp4": MX_BLOCK_SIZE, "nvfp4": NV_BLOCK_SIZE}
INT4_DEFAULT_GROUP_SIZE = 128
# Tried in order when the INT4 group size is not given explicitly.
INT4_FALLBACK_GROUP_SIZES = (128, 64, 32)
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127
E8M0_NAN = 255
# The formats that quantize activations too (``act_quant``): the block-scaled floating-point ones.
ACT_QUANT_TYPES = ("mxfp4", "nvfp4")
# MXFP4 activations: the OCP spec's floor rule, chosen per forward (the least-error ``mse``
# search triples the work on every activation and no kernel computes it). Measured on the
# embedded model's linear inputs (8 held-out sequences): squared error 1.060e-2 of the
# inputs' energy with floor, 1.023e-2 with rceil, 0.972e-2 with the rule that rounds the
# block amax's mantissa up from 1.75 (compressed-tensors' and AMD's MXFP4 activation
# quantizers, torchao's EVEN), 0.966e-2 with mse. Kernels disagree (rceil is NVIDIA's rule),
# so no rule matches every deployment and none errs much less; floor is the spec's, and
# torchao's to_mx(FLOOR) is bit-exact with it.
ACTIVATION_SCALE_RULE = "floor"
E4M3_MAX = 448.0
E4M3_SMALLEST = 2.0 ** -9  # the smallest E4M3 subnormal: the least NVFP4 block scale
INT4_ASYM_EPS = 1e-6


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid: {', '.join(QUANT_TYPES)}")


def _check_scale_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale_rule {scale_rule!r}; valid: {', '.join(SCALE_RULES)}")


def _check_floating(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        dtype = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"fake quantization needs a floating-point tensor, got {dtype}")


_logged_fallbacks: set[tuple[int, int]] = set()


def resolve_group_size(quant_type: str, in_features: int, group_size: int | None = None,
                       name: str = "tensor", shape: tuple | None = None) -> int:
    """The block/group size one layer uses.

    MXFP4 blocks are always 32, NVFP4 blocks 16. For INT4 an explicit ``group_size`` is
    strict; when it is None the layer uses 128 where it divides ``in_features``, else the
    largest of 64 and 32 that does (SmolLM2's hidden size 576 is not a multiple of 128).
    """
    _check_quant_type(quant_type)
    shape = tuple(shape) if shape is not None else (in_features,)
    if quant_type in FIXED_BLOCK_SIZES:
        block = FIXED_BLOCK_SIZES[quant_type]
        if group_size not in (None, block):
            raise ValueError(f"{quant_type} uses blocks of {block} by definition; got group_size={group_size}")
        if in_features % block:
            raise ValueError(f"{name} with shape {list(shape)}: in_features {in_features} is not a multiple of "
                             f"the {quant_type.upper()} block size {block}; skip this layer")
        return block
    if group_size is not None:
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"{name} with shape {list(shape)}: in_features {in_features} is not a multiple of "
                             f"group_size {group_size}; choose a group size that divides it or skip this layer")
        return group_size
    for candidate in INT4_FALLBACK_GROUP_SIZES:
        if in_features % candidate == 0:
            if candidate != INT4_DEFAULT_GROUP_SIZE and (in_features, candidate) not in _logged_fallbacks:
                _logged_fallbacks.add((in_features, candidate))
                log.info("int4: in_features %d is not a multiple of %d, using group size %d",
                         in_features, INT4_DEFAULT_GROUP_SIZE, candidate)
            return candidate
    raise ValueError(f"{name} with shape {list(shape)}: in_features {in_features} is not a multiple of any "
                     f"INT4 group size {INT4_FALLBACK_GROUP_SIZES}; skip this layer")


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


# ---------------------------------------------------------------- MXFP4

def _exp2(exponent: torch.Tensor) -> torch.Tensor:
    """Exactly 2^e as float32 for integer e in [-127, 127], from the bit pattern (no pow)."""
    exponent = exponent.to(torch.int32)
    bits = torch.where(exponent > -E8M0_BIAS, (exponent + E8M0_BIAS) << 23, 1 << 22)  # 2^-127: denormal
    return bits.view(torch.float32)


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) (int32) of positive finite x, exactly; 0 for x = 0."""
    mantissa, exponent = torch.frexp(x)  # x = m * 2^exponent, m in [0.5, 1)
    return exponent - (mantissa == 0.5).int()


def _mx_exponent(amax: torch.Tensor, scale_rule: str) -> torch.Tensor:
    """Unbiased shared exponent per block (int32), NaN/Inf blocks marked E8M0_NAN - bias."""
    if scale_rule == "floor":
        mantissa, exponent = torch.frexp(amax)  # amax = m * 2^exponent, m in [0.5, 1)
        shared = exponent - 1 - 2               # floor(log2(amax)) - floor(log2(6))
    else:
        shared = _ceil_log2(amax / E2M1_MAX)
    shared = torch.where(amax == 0, -E8M0_BIAS, shared).clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.where(torch.isfinite(amax), shared, E8M0_NAN - E8M0_BIAS)


def _mx_quantize(x: torch.Tensor, scale_rule: str):
    """(E2M1 values as float32 in blocks [..., K/32, 32], unbiased exponents [..., K/32, 1])."""
    xb = _blocks(x, MX_BLOCK_SIZE)
    exponent = _mx_exponent(xb.abs().amax(-1, keepdim=True), "floor" if scale_rule == "mse" else scale_rule)
    if scale_rule == "mse":
        return _mx_quantize_mse(xb, exponent)
    return _e2m1_round(xb * _exp2(-exponent)), exponent


_SCREENED_DEVICES = ("cpu",)  # where the mse rule sums in float64 only the blocks that need it


def _mx_quantize_mse(xb: torch.Tensor, floor_exponent: torch.Tensor):
    """Each block's exponent among floor, floor + 1, floor - 1 with the least squared error
    (summed in float64; ties go to the earliest of the three): the floor rule clips a
    block's largest values in (6, 8) x scale, a finer or coarser scale may err less. Any
    per-block exponent is an E8M0 byte, so the result deploys as is.

    This runs on every weight at every training step, so on the CPU the float64 sums are
    taken only for the blocks whose float32 sums could rank differently: a float32 sum of 32
    squares is within 2^-18 of the exact one relative (plus 2^-120 absolute for underflowed
    squares), far inside the margin, and an Inf or NaN sum is never taken as decided. An
    accelerator sums every block in float64: picking out the few would wait on the host."""
    values, exponents, residuals, errors = _mse_candidates(xb, floor_exponent)
    if xb.device.type in _SCREENED_DEVICES:
        lowest, second = errors.topk(2, -1, largest=False).values.unbind(-1)
        choice = errors.argmin(-1, keepdim=True)
        undecided = ~(second - lowest > 2.0 ** -10 * second + 2.0 ** -100)
        if undecided.any():
            choice[undecided] = _least_error_float64([r[undecided] for r in residuals])
    else:  # an accelerator: float64 everywhere beats asking the host which blocks need it
        choice = _least_error_float64(residuals)
    best_values = torch.where(choice == 0, values[0], torch.where(choice == 1, values[1], values[2]))
    best_exponent = torch.where(choice == 0, exponents[0], torch.where(choice == 1, exponents[1], exponents[2]))
    return best_values, best_exponent


def _mse_candidates(xb: torch.Tensor, floor_exponent: torch.Tensor):
    """The mse rule's three candidates (exponent floor, floor + 1, floor - 1): their E2M1
    values, exponents and residuals (lists of three), and float32 squared errors [..., 3].
    Elementwise passes only (``bench/bench_quant_compile.py`` compiles them)."""
    finite = floor_exponent != E8M0_NAN - E8M0_BIAS
    exponents = [torch.where(finite, (floor_exponent + shift).clamp(-E8M0_BIAS, E8M0_BIAS), floor_exponent)
                 for shift in (0, 1, -1)]
    values = [_e2m1_round(xb * _exp2(-exponent)) for exponent in exponents]
    residuals = [xb - v * _exp2(exponent) for v, exponent in zip(values, exponents)]
    errors = torch.cat([(r * r).sum(-1, keepdim=True) for r in residuals], -1)  # [..., blocks, 3]
    return values, exponents, residuals, errors


def _least_error_float64(residuals: list[torch.Tensor]) -> torch.Tensor:
    """[..., 1]: which of the candidates' residuals [..., 32] has the least float64 sum of
    squares, the earliest on ties; a NaN sum never wins over the first candidate."""
    best = torch.zeros(*residuals[0].shape[:-1], 1, dtype=torch.long, device=residuals[0].device)
    best_error = residuals[0].double().square().sum(-1, keepdim=True)
    for index, residual in enumerate(residuals[1:], start=1):
        error = residual.double().square().sum(-1, keepdim=True)
        better = error < best_error
        best = torch.where(better, index, best)
        best_error = torch.where(better, error, best_error)
    return best


def _e2m1_round(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each element of a fresh tensor (overwritten), saturating at 6."""
    magnitude = scaled.abs()
    # Round half to even onto the E2M1 grid (spacing 0.5 below 2, 1 below 4, 2 above) by
    # adding and subtracting c = spacing * 2^23, whose float32 ulp is the spacing: c has
    # the magnitude's binary exponent (at least that of 1.0) plus 22. In place: this runs
    # on every weight at every training step.
    magic = (magnitude.view(torch.int32) & 0x7F800000).clamp_(min=0x3F800000).add_(22 << 23)
    magic = magic.view(torch.float32)
    magnitude.add_(magic).sub_(magic).clamp_(max=E2M1_MAX)
    return magnitude.copysign_(scaled)


def _mx_dequantize(values: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    scale = torch.where(exponent == E8M0_NAN - E8M0_BIAS, float("nan"), _exp2(exponent))
    return values.mul_(scale)  # values are always a fresh tensor here


# ---------------------------------------------------------------- NVFP4

def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """The NVFP4 tensor scale t (float32 scalar) of a tensor, or fused group, whose largest
    magnitude is ``amax``: the power of two at or above amax / (448 * 6); 1 for an all-zero
    tensor, NaN where amax is NaN or Inf."""
    amax = torch.as_tensor(amax).float()
    exponent = _ceil_log2(amax / (E4M3_MAX * E2M1_MAX)).clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.where(torch.isfinite(amax), _exp2(exponent), float("nan"))


def _nv_quantize(x: torch.Tensor, tensor_scale: torch.Tensor):
    """(E2M1 values as float32 in blocks [..., K/16, 16], E4M3 block scales as float32
    [..., K/16, 1]) of x under the tensor scale t."""
    xb = _blocks(x, NV_BLOCK_SIZE)
    block_scale = xb.abs().amax(-1, keepdim=True).div_(E2M1_MAX).div_(tensor_scale)
    # torch's E4M3 cast rounds to nearest even, subnormals included (tests check it)
    block_scale = block_scale.clamp_(E4M3_SMALLEST, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return _e2m1_round(xb / (block_scale * tensor_scale)), block_scale


def _nv_dequantize(values: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    return values.mul_(block_scale * tensor_scale)  # values are always a fresh tensor here


def _tensor_amax(x: torch.Tensor, tensor_amax: torch.Tensor | None) -> torch.Tensor:
    return x.detach().abs().amax().float() if tensor_amax is None else torch.as_tensor(tensor_amax).float()


# ---------------------------------------------------------------- INT4

# A learned amax or range never reaches zero: the codes divide by it.
_SMALLEST_STATISTIC = torch.finfo(torch.float32).tiny


def int4_statistics(x: torch.Tensor, group_size: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """What the INT4 rule computes each group's grid from, [..., K/g]: (amax,) when symmetric,
    else (min, max). Learned scales start from these."""
    xg = _blocks(x, group_size)
    if symmetric:
        return (xg.abs().amax(-1),)
    return xg.amin(-1), xg.amax(-1)


def _int4_quantize(x: torch.Tensor, group_size: int, symmetric: bool):
    """(codes 0..15 as float32 in groups [..., K/g, g], scale [..., K/g, 1], zero [..., K/g, 1])
    from the groups' measured statistics.

    Dequantization is (code - 8) * scale + zero for both variants (zero = 0 when symmetric).
    """
    statistics = tuple(s.unsqueeze(-1) for s in int4_statistics(x, group_size, symmetric))
    if symmetric:  # an all-zero group: codes 0 on a finite grid
        statistics = (torch.where(statistics[0] == 0, 1.0, statistics[0]),)
    return _int4_quantize_with(_blocks(x, group_size), statistics)[:3]


def _int4_quantize_with(xg: torch.Tensor, statistics: tuple[torch.Tensor, ...]):
    """(codes, scale, zero, position on the grid) of groups xg [..., K/g, g] from their
    statistics [..., K/g, 1] (amax; or min and max), measured or learned."""
    if len(statistics) == 1:
        amax = statistics[0].clamp(min=_SMALLEST_STATISTIC)
        # w / amax * 7.5 rather than w / scale: the group's extreme lands exactly on the
        # tie +-7.5 (-> -8, +8 clamped to 7) instead of wherever amax / 7.5 rounded.
        position = xg / amax * 7.5
        codes = torch.round(position).clamp_(-8, 7).add_(8)
        scale = amax / 7.5
        return codes, scale, torch.zeros_like(scale), position
    low, high = statistics
    scale = (high - low).clamp(min=INT4_ASYM_EPS) / 15
    position = (xg - low) / scale
    codes = torch.round(position).clamp_(0, 15)
    return codes, scale, low + scale * 8, position


def _int4_dequantize(codes, scale, zero):
    return (codes - 8) * scale + zero


class _LearnedScaleInt4(torch.autograd.Function):
    """INT4 fake quantization with trainable group statistics (LSQ / LSQ+).

    Forward: ``_int4_quantize_with``. Backward, per element with position u on the grid and
    code q (u clamped to the codes' range before rounding, as LSQ writes it):
    d w_hat / d w = 1 inside the range, 0 where the code clips; d w_hat / d scale =
    round(u) - u inside, the clipped code outside; d w_hat / d zero offset = 0 inside, 1
    outside (asymmetric). Scale = amax / 7.5 (symmetric) or (max - min) / 15, offset = min.
    The statistics' gradients are summed over the group and scaled by 1 / sqrt(g * Qp).
    """

    @staticmethod
    def forward(ctx, weight, group_size, *statistics):
        xg = _blocks(weight, group_size)
        statistics = tuple(s.float().unsqueeze(-1) for s in statistics)
        codes, scale, zero, position = _int4_quantize_with(xg, statistics)
        ctx.save_for_backward(weight, *statistics)
        ctx.group_size = group_size
        return _int4_dequantize(codes, scale, zero).reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight, *statistics = ctx.saved_tensors
        g = ctx.group_size
        xg = _blocks(weight, g)
        grad = _blocks(grad_output, g)
        codes, scale, _, position = _int4_quantize_with(xg, tuple(statistics))
        symmetric = len(statistics) == 1
        low, high = (-8, 7) if symmetric else (0, 15)
        inside = (position >= low) & (position <= high)
        code = codes - 8 if symmetric else codes
        # d w_hat / d scale per element (LSQ), times the upstream gradient
        per_scale = grad * torch.where(inside, torch.round(position) - position, code)
        grad_scale = per_scale.sum(-1) / (g * high) ** 0.5
        grad_weight = (grad * inside).reshape(weight.shape).to(weight.dtype)
        if symmetric:  # no gradient where the forward clamped the amax
            return grad_weight, None, grad_scale * (statistics[0] > _SMALLEST_STATISTIC).squeeze(-1) / 7.5
        grad_offset = (grad * ~inside).sum(-1) / (g * high) ** 0.5
        # scale = max(max - min, eps) / 15 and offset = min
        grad_scale = grad_scale * (statistics[1] - statistics[0] > INT4_ASYM_EPS).squeeze(-1) / 15
        return grad_weight, None, grad_offset - grad_scale, grad_scale


# ---------------------------------------------------------------- public numerics

def fake_quantize(x: torch.Tensor, quant_type: str, group_size: int | None = None,
                  scale_rule: str = "floor", *, tensor_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` along its last dimension; same shape and dtype.

    ``tensor_amax`` (nvfp4): the amax the tensor scale comes from, where it is not x's own
    (a fused group's: the largest of its layers').
    """
    _check_quant_type(quant_type)
    _check_scale_rule(scale_rule)
    _check_floating(x)
    group = resolve_group_size(quant_type, x.shape[-1], group_size, shape=tuple(x.shape))
    if quant_type == "mxfp4":
        out = _mx_dequantize(*_mx_quantize(x, scale_rule))
    elif quant_type == "nvfp4":
        tensor_scale = nvfp4_tensor_scale(_tensor_amax(x, tensor_amax))
        out = _nv_dequantize(*_nv_quantize(x, tensor_scale), tensor_scale)
    else:
        out = _int4_dequantize(*_int4_quantize(x, group, quant_type == "int4_sym"))
    return out.reshape(x.shape).to(x.dtype)


def _check_act_quant(quant_type: str) -> None:
    if quant_type not in ACT_QUANT_TYPES:
        raise ValueError(f"activation quantization (W4A4) is for {' and '.join(ACT_QUANT_TYPES)}; "
                         f"{quant_type} quantizes weights only")


def fake_quantize_activation(x: torch.Tensor, quant_type: str, *,
                             tensor_amax: torch.Tensor | None = None) -> torch.Tensor:
    """An activation fake-quantized per token in blocks along its last dimension with the
    weight format ``quant_type`` (``ACT_QUANT_TYPES``); the gradient passes straight through.

    MXFP4: ``fake_quantize`` with ``ACTIVATION_SCALE_RULE``. NVFP4: ``fake_quantize``, whose
    tensor scale comes from x's own amax (dynamic), or from ``tensor_amax`` where a static
    scale is wanted (a deployed checkpoint's calibrated one: tensor_amax = 448 * 6 * t).
    """
    _check_act_quant(quant_type)
    return _StraightThrough.apply(x, quant_type, None, ACTIVATION_SCALE_RULE, tensor_amax)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., K] -> bytes [..., K/2]; element 2k low nibble, 2k+1 high."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 bit patterns (sign << 3 | index into E2M1_VALUES) of values on the grid [..., K/b, b],
    flattened to [..., K]."""
    table = torch.tensor(E2M1_VALUES, device=values.device)
    index = torch.bucketize(values.abs(), table).clamp_(max=7)  # exact hits; NaN -> 7
    return (index | (torch.signbit(values).to(index.dtype) << 3)).flatten(-2)


def _e2m1_values(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of ``_e2m1_codes`` on packed codes [..., K/2]: the values in blocks [..., K/b, b]."""
    nibbles = _unpack_nibbles(codes).long()
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    values = torch.where(nibbles >= 8, -table[nibbles & 7], table[nibbles & 7])
    return values.reshape(*values.shape[:-1], -1, block)


def pack_mxfp4(w: torch.Tensor, scale_rule: str = "floor"):
    """MXFP4 storage: (codes uint8 [..., K/2], E8M0 scale bytes uint8 [..., K/32]).

    A code is sign << 3 | index into E2M1_VALUES (the E2M1 bit pattern).
    """
    _check_scale_rule(scale_rule)
    _check_floating(w)
    resolve_group_size("mxfp4", w.shape[-1], shape=tuple(w.shape))
    values, exponent = _mx_quantize(w, scale_rule)
    return _pack_nibbles(_e2m1_codes(values)), (exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8)


def unpack_mxfp4(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Inverse of ``pack_mxfp4``: the dequantized tensor [..., K]."""
    values = _e2m1_values(codes, MX_BLOCK_SIZE)
    out = _mx_dequantize(values, scales.to(torch.int32).unsqueeze(-1) - E8M0_BIAS)
    return out.flatten(-2).to(dtype)


def pack_nvfp4(w: torch.Tensor, tensor_amax: torch.Tensor | None = None):
    """NVFP4 storage: (codes uint8 [..., K/2], block scales float8_e4m3fn [..., K/16], tensor
    scale float32 scalar). Codes as ``pack_mxfp4``'s; ``tensor_amax`` as ``fake_quantize``'s."""
    _check_floating(w)
    resolve_group_size("nvfp4", w.shape[-1], shape=tuple(w.shape))
    tensor_scale = nvfp4_tensor_scale(_tensor_amax(w, tensor_amax))
    values, block_scale = _nv_quantize(w, tensor_scale)
    return _pack_nibbles(_e2m1_codes(values)), block_scale.squeeze(-1).to(torch.float8_e4m3fn), tensor_scale


def unpack_nvfp4(codes: torch.Tensor, block_scales: torch.Tensor, tensor_scale: torch.Tensor,
                 dtype: torch.dtype = torch.float32):
    """Inverse of ``pack_nvfp4``: the dequantized tensor [..., K]."""
    values = _e2m1_values(codes, NV_BLOCK_SIZE)
    out = _nv_dequantize(values, block_scales.float().unsqueeze(-1), tensor_scale.float())
    return out.flatten(-2).to(dtype)


def pack_int4(w: torch.Tensor, group_size: int | None = None, symmetric: bool = False):
    """INT4 storage: (codes uint8 [..., K/2], scale float32 [..., K/g], zero float32 [..., K/g]).

    w_hat = (code - 8) * scale + zero; zero is all 0 when ``symmetric``.
    """
    _check_floating(w)
    group = resolve_group_size("int4", w.shape[-1], group_size, shape=tuple(w.shape))
    codes, scale, zero = _int4_quantize(w, group, symmetric)
    return _pack_nibbles(codes.flatten(-2)), scale.squeeze(-1), zero.squeeze(-1)


def unpack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                dtype: torch.dtype = torch.float32):
    """Inverse of ``pack_int4``; the group size is K / scale.shape[-1]."""
    nibbles = _unpack_nibbles(codes).float()
    groups = nibbles.reshape(*scale.shape, -1)
    return _int4_dequantize(groups, scale.unsqueeze(-1), zero.unsqueeze(-1)).flatten(-2).to(dtype)


# ---------------------------------------------------------------- the student

class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (or activation). Backward: the upstream gradient unchanged."""

    @staticmethod
    def forward(ctx, weight, quant_type, group_size, scale_rule, tensor_amax):
        return fake_quantize(weight, quant_type, group_size, scale_rule, tensor_amax=tensor_amax)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


class _ReusedStraightThrough(torch.autograd.Function):
    """Forward: a fake-quantized weight computed earlier from this latent weight (reused_quant).
    Backward: the upstream gradient unchanged, to the latent weight, as _StraightThrough's."""

    @staticmethod
    def forward(ctx, latent, quantized):
        ctx.latent_dtype = latent.dtype
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.to(ctx.latent_dtype), None


# The parameters ``learn_scales`` gives an INT4 layer: its group statistics, [out, in / g].
LEARNED_STATISTICS = {"int4_sym": ("weight_amax",), "int4": ("weight_min", "weight_max")}


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward sees its weight fake-quantized (straight-through gradient).

    What it quantizes is ``latent_weight()``: its own weight, or, where an adapter has set
    ``compose_weight`` on the layer (lora.py: W + s * B A), what that adapter makes of it. The
    adapter composes with the quantizer; the quantizer knows no adapter. After
    ``learn_scales`` an INT4 layer's grid comes from its learned statistics
    (``LEARNED_STATISTICS``) instead of being measured on the latent weight. An NVFP4 layer
    of a fused group (``fused_with``: the group's other layers) takes its tensor scale from
    the latent weights of the whole group. With ``act_quant`` (W4A4) its input is
    fake-quantized too (``fake_quantize_activation``), at every forward: the rollout cache
    holds weights only.
    """

    compose_weight = None  # an adapter's function(layer) -> the latent weight to quantize
    fused_with = ()  # nvfp4: the other layers sharing this one's tensor scale (quantize_model sets it)

    def __init__(self, in_features, out_features, bias=True, *, quant_type="mxfp4", group_size=None,
                 scale_rule="floor", act_quant=False, device=None, dtype=None, name="linear"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_quant_type(quant_type)
        _check_scale_rule(scale_rule)
        if act_quant:
            _check_act_quant(quant_type)
        self.quant_type = quant_type
        self.scale_rule = scale_rule
        self.act_quant = bool(act_quant)
        self.group_size = resolve_group_size(quant_type, in_features, group_size, name,
                                             (out_features, in_features))
        self._reuse = None  # None: quantize every forward; "frozen" (frozen_quant) or "step" (reused_quant)
        self._cache_dtype = None
        self._cache = None  # ((version, data_ptr) of weight and adapters, quantized weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name="linear", **quant_kwargs) -> "FakeQuantLinear":
        """Wrap ``linear``, sharing (not copying) its weight and bias parameters."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device="meta", name=name, **quant_kwargs)
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def latent_weight(self) -> torch.Tensor:
        return self.weight if self.compose_weight is None else self.compose_weight(self)

    def learned_statistics(self) -> tuple[torch.Tensor, ...]:
        """The learned group statistics (``learn_scales``), or () where the grid is measured."""
        names = LEARNED_STATISTICS.get(self.quant_type, ())
        if not names or names[0] not in self._parameters:
            return ()
        return tuple(self._parameters[n] for n in names)

    def tensor_amax(self, latent: torch.Tensor | None = None) -> torch.Tensor | None:
        """nvfp4: the amax the tensor scale comes from: the largest magnitude of the latent
        weight (``latent``, where the caller has it) and of the fused group's; None otherwise."""
        if self.quant_type != "nvfp4":
            return None
        with torch.no_grad():
            latent = self.latent_weight() if latent is None else latent
            return torch.stack([w.detach().abs().amax().float()
                                for w in (latent, *(m.latent_weight() for m in self.fused_with))]).amax()

    def _quantize(self, latent: torch.Tensor) -> torch.Tensor:
        statistics = self.learned_statistics()
        if statistics:
            return _LearnedScaleInt4.apply(latent, self.group_size, *statistics)
        return _StraightThrough.apply(latent, self.quant_type, self.group_size, self.scale_rule,
                                      self.tensor_amax(latent))

    def int4_parts(self):
        """(codes 0..15 [out, in/g, g], scale [out, in/g], zero [out, in/g]) of the quantized
        weight: dequantized, (code - 8) * scale + zero is exactly what the layer computes with."""
        with torch.no_grad():
            latent = self.latent_weight().detach()
            statistics = self.learned_statistics()
            if statistics:
                codes, scale, zero, _ = _int4_quantize_with(
                    _blocks(latent, self.group_size), tuple(s.float().unsqueeze(-1) for s in statistics))
            else:
                codes, scale, zero = _int4_quantize(latent, self.group_size, self.quant_type == "int4_sym")
        return codes, scale.squeeze(-1), zero.squeeze(-1)

    def quantized_weight(self) -> torch.Tensor:
        if self._reuse is None or (self._reuse == "step" and self.learned_statistics()):
            return self._quantize(self.latent_weight())  # learned scales take their gradient through it
        # what the latent weights (its own and its fused group's) are made of: the weights and
        # adapters' parameters, not the biases
        trained = [p for m in (self, *self.fused_with) for name, p in m.named_parameters(recurse=False)
                   if name != "bias"]
        if self._reuse == "frozen" and torch.is_grad_enabled() and any(p.requires_grad for p in trained):
            raise RuntimeError("a forward with gradients inside frozen_quant() would not train the latent "
                               "weights; run it under torch.no_grad() or leave frozen_quant() first")
        latent = None if self._reuse == "frozen" else self.latent_weight()
        dtype = self._cache_dtype
        if torch.is_autocast_enabled(self.weight.device.type):
            # what autocast would cast the weight to in every forward, held once: the cache
            # is then the very tensor the backward saves, not a float32 copy beside it
            dtype = torch.get_autocast_dtype(self.weight.device.type)
        key = (tuple((p._version, p.data_ptr()) for p in trained), dtype or self.weight.dtype)
        if self._cache is None or self._cache[0] != key:  # an optimizer step bumps the version
            with torch.no_grad():
                quantized = self._quantize(self.latent_weight() if latent is None else latent.detach())
                self._cache = (key, quantized.to(dtype or quantized.dtype))
        if latent is None:
            return self._cache[1]
        return _ReusedStraightThrough.apply(latent, self._cache[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:  # before any cast: the cache's dtype holds the quantized values exactly
            x = fake_quantize_activation(x, self.quant_type)
        weight = self.quantized_weight()
        # a rollout cache in another dtype computes in it (under autocast, autocast casts)
        if weight.dtype != x.dtype and self._reuse == "frozen" and not torch.is_autocast_enabled(x.device.type):
            bias = None if self.bias is None else self.bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        fused = f", fused_with={len(self.fused_with)} layers" if self.fused_with else ""
        return (f"{super().extra_repr()}, quant_type={self.quant_type}, group_size={self.group_size}, "
                f"scale_rule={self.scale_rule}{', act_quant=True' if self.act_quant else ''}{fused}")


@dataclass
class QuantSettings:
    """What ``quantize_model`` did: enough to rebuild the same student from its latent weights."""

    quant_type: str
    group_size: int | None = None  # as requested; None = per-layer default
    scale_rule: str = "floor"
    skip: tuple[str, ...] = ("lm_head",)
    layer_group_sizes: dict[str, int] = field(default_factory=dict)  # as resolved per layer
    learn_scales: bool = False  # INT4 group statistics trained as parameters (learn_scales)
    # nvfp4: the layers that share one tensor scale (fused by serving engines), by name
    tensor_scale_groups: list[list[str]] = field(default_factory=list)
    lora: dict | None = None  # the LoRA settings whose adapters were merged into these weights (lora.py)
    act_quant: bool = False  # W4A4: the layers' inputs fake-quantized too (mxfp4, nvfp4)

    def to_dict(self) -> dict:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSettings":
        return cls(**{**d, "skip": tuple(d.get("skip", ("lm_head",)))})


def quantize_inputs(layer: nn.Module, quant_type: str, tensor_amax: torch.Tensor | None = None):
    """Make a plain linear layer fake-quantize its input as a W4A4 ``FakeQuantLinear`` does
    (``tensor_amax``: NVFP4's static tensor scale, as a deployed checkpoint holds it); returns
    the hook's handle."""
    _check_act_quant(quant_type)
    return layer.register_forward_pre_hook(
        lambda module, args: (fake_quantize_activation(args[0], quant_type, tensor_amax=tensor_amax), *args[1:]))


# Layers that serving engines fuse into one matmul (vLLM: qkv_proj, gate_up_proj), so that an
# NVFP4 student's must share one tensor scale: vLLM serves a fused layer with one.
FUSED_LAYERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def tensor_scale_groups(names) -> list[list[str]]:
    """The groups of ``FUSED_LAYERS`` among the layer names, siblings under one module, all
    of a group's layers present."""
    children = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        children.setdefault(parent, set()).add(child)
    return [[f"{parent}.{child}" if parent else child for child in fused]
            for parent, present in children.items() for fused in FUSED_LAYERS if set(fused) <= present]


# Where the settings travel with a model: config.json of every saved checkpoint.
# (Not `quantization_config`, which transformers reads as a real quantizer.)
CONFIG_KEY = "fake_quant"


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(s in parts or name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, quant_type: str, group_size: int | None = None,
                   skip=("lm_head",), scale_rule: str = "floor", act_quant: bool = False) -> int:
    """Swap every ``nn.Linear`` not named in ``skip`` for a ``FakeQuantLinear`` in place.

    Parameters are shared, not copied (an optimizer built before still sees them; tied
    embeddings are untouched). NVFP4 layers that serving engines fuse share their tensor
    scale (``FUSED_LAYERS``). ``act_quant``: the layers' inputs are fake-quantized too
    (W4A4). Returns how many layers were wrapped and records the settings on
    ``model.quant_settings`` and, for Hugging Face models, in the config.
    """
    _check_quant_type(quant_type)
    _check_scale_rule(scale_rule)
    if act_quant:
        _check_act_quant(quant_type)
    skip = tuple(skip)
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it holds FakeQuantLinear layers)")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(name, skip)]
    if not targets:
        raise ValueError(f"no nn.Linear to quantize in {type(model).__name__} (skip={list(skip)})")
    settings = QuantSettings(quant_type, group_size, scale_rule, skip, act_quant=bool(act_quant))
    for name, linear in targets:  # build all first so a bad shape changes nothing
        settings.layer_group_sizes[name] = resolve_group_size(
            quant_type, linear.in_features, group_size, name, tuple(linear.weight.shape))
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear.from_linear(
            linear, name=name, quant_type=quant_type, group_size=settings.layer_group_sizes[name],
            scale_rule=scale_rule, act_quant=act_quant))
    if quant_type == "nvfp4":
        settings.tensor_scale_groups = tensor_scale_groups(name for name, _ in targets)
        for group in settings.tensor_scale_groups:
            layers = [model.get_submodule(name) for name in group]
            for layer in layers:  # a plain list: no submodules, nothing more in the state dict
                layer.fused_with = [other for other in layers if other is not layer]
    record_settings(model, settings)
    return len(targets)


def quantize_model_from_settings(model: nn.Module, settings: QuantSettings | dict) -> int:
    """Rebuild a saved student: the same layers, group sizes, scale rule and activation
    quantization as recorded."""
    if isinstance(settings, dict):
        settings = QuantSettings.from_dict(settings)
    count = quantize_model(model, settings.quant_type, settings.group_size, settings.skip, settings.scale_rule,
                           settings.act_quant)
    rebuilt = model.quant_settings
    if (settings.layer_group_sizes and rebuilt.layer_group_sizes != settings.layer_group_sizes) or \
            rebuilt.tensor_scale_groups != settings.tensor_scale_groups:
        raise ValueError("the model's layers do not match the recorded quantization settings "
                         "(different architecture or version?)")
    if settings.learn_scales:  # placeholders from the latent weights; the caller loads the saved ones
        learn_scales(model)
    record_settings(model, dataclasses.replace(model.quant_settings, lora=settings.lora))
    return count


def learn_scales(model: nn.Module) -> int:
    """Make every INT4 layer's group statistics (``LEARNED_STATISTICS``) trainable parameters,
    initialised from its latent weight as it is now: the student's function is unchanged
    until they train. Call it after anything that sets the latent weights (a GPTQ start).
    Returns how many layers learn their scales."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not layers or any(m.quant_type not in LEARNED_STATISTICS for m in layers):
        raise ValueError("learned scales are for INT4 students (int4, int4_sym): an MXFP4 scale is a "
                         "power of two, re-chosen from the weights at every step by --scale-rule")
    if any(m.learned_statistics() for m in layers):
        raise ValueError("the model's scales are learned already")
    for layer in layers:
        statistics = int4_statistics(layer.latent_weight().detach(), layer.group_size,
                                     layer.quant_type == "int4_sym")
        for name, value in zip(LEARNED_STATISTICS[layer.quant_type], statistics):
            layer.register_parameter(name, nn.Parameter(value.to(layer.weight.dtype).contiguous()))
    record_settings(model, dataclasses.replace(model.quant_settings, learn_scales=True))
    return len(layers)


def is_learned_statistic(parameter_name: str) -> bool:
    """Whether a parameter name (``model.layers.0.mlp.up_proj.weight_amax``) is a learned scale."""
    return parameter_name.rpartition(".")[2] in {n for names in LEARNED_STATISTICS.values() for n in names}


def record_settings(model: nn.Module, settings: QuantSettings) -> None:
    """Keep ``settings`` on the model and, for Hugging Face models, in its config."""
    model.quant_settings = settings
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, settings.to_dict())


@contextlib.contextmanager
def frozen_quant(model: nn.Module, dtype: torch.dtype | None = None):
    """Rollout cache: each layer quantizes its weight once and reuses it for every forward.

    For generation and evaluation, which rerun the forward many times on unchanged
    weights, and for training whose quantized layers are frozen (``--freeze-quantized``).
    A forward with gradients enabled inside raises where the latent weights would train
    (it would train nothing), and an in-place weight update (optimizer step) invalidates
    that layer's cache. Nested in another ``frozen_quant`` it starts from the outer cache
    (used where its dtype matches) and leaves it as it was, or its own where the outer one
    had none. Under autocast the cache holds autocast's dtype.

    ``dtype`` (e.g. bfloat16): the cache holds the quantized weights in it and those layers
    compute in it (input cast to it, output cast back), so decoding reads half the bytes.
    MXFP4 and NVFP4 weights are exact in bfloat16; INT4 weights and the activations are rounded
    (fake-quantized activations, ``act_quant``, are quantized first, so exact too).
    """
    with _reusing(model, "frozen", dtype):
        yield model


@contextlib.contextmanager
def reused_quant(model: nn.Module):
    """Training cache: each layer quantizes its weight once and every forward with gradients
    reuses it, straight through to the latent weight, until the weight changes.

    For a step's micro-batches (gradient accumulation): the weights change only at the
    optimizer step, so each would quantize the same weights again. The same values and
    gradients as without it. Under autocast it holds the weights in autocast's dtype, as
    autocast would cast them. Layers with learned scales quantize every forward (their
    scales take gradients through the quantizer). It holds every layer's quantized weight
    for as long as it lasts, as a backward holds them all at its start (gradient
    checkpointing exists not to: there this costs that memory back). Not for FSDP, whose
    gathered weights are not the layer's own between forwards.
    """
    with _reusing(model, "step"):
        yield model


@contextlib.contextmanager
def _reusing(model: nn.Module, reuse: str, dtype: torch.dtype | None = None):
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    outer = [(layer._reuse, layer._cache, layer._cache_dtype) for layer in layers]
    for layer in layers:  # a frozen cache inside a frozen one starts from it (its key still decides)
        cache = layer._cache if reuse == layer._reuse == "frozen" else None
        layer._reuse, layer._cache, layer._cache_dtype = reuse, cache, dtype
    try:
        yield model
    finally:  # a nested use (a rollout inside a step's cache) leaves the outer one as it was,
        # except that a frozen one's first quantization serves an empty frozen outer one too
        for layer, (outer_reuse, outer_cache, outer_dtype) in zip(layers, outer):
            if reuse == outer_reuse == "frozen" and outer_cache is None:
                outer_cache = layer._cache  # its key still decides whether it is used
            layer._reuse, layer._cache, layer._cache_dtype = outer_reuse, outer_cache, outer_dtype
