"""Export a trained student as a real 4-bit checkpoint that serving engines load.

    uv run python export.py dump/run --format compressed-tensors --out dump/run_ct
    uv run python export.py dump/run/checkpoint-100 --format gguf --out dump/run_gguf

* ``compressed-tensors`` (llm-compressor's format; vLLM and transformers load it): every
  fake-quantized linear layer stored packed with its scales, the rest as trained, a
  ``quantization_config`` naming the scheme (one config group), the tokenizer and generation
  config beside it. MXFP4 -> ``mxfp4-pack-quantized`` (E2M1 codes two per byte, E8M0 scale
  bytes); NVFP4 -> ``nvfp4-pack-quantized`` (E2M1 codes, E4M3 block scales, and the float32
  ``weight_global_scale``, which compressed-tensors defines as 1 / the tensor scale, the
  same in every layer of a fused group); ``int4_sym`` -> ``pack-quantized`` W4A16
  (symmetric, group-wise). The compressed-tensors package packs the weights from the
  scales the student trained with, so all three export exactly (an ``rceil`` MXFP4 student
  too: scales are scales). ``int4``
  (asymmetric with a float zero point, torchao's numerics) is refused: compressed-tensors
  stores integer zero points and would compute a different function. A W4A4 student
  (``--act-quant``) declares its input quantization as compressed-tensors' own W4A4 presets
  do (``MXFP4``: dynamic E8M0 scales per 32; ``NVFP4``: dynamic E4M3 block scales under a
  static ``input_global_scale``). That one the NVFP4 kernels read from the checkpoint, a
  calibrated 1 / tensor scale, so it is calibrated here (``input_amax``): the largest input
  magnitude each layer sees on the embedded held-out prompts with their completions, rounded
  up to a power of two as the weights' tensor scales. The student trained with a dynamic
  one; the two agree wherever a block scale stays within E4M3's normal range under both.
* ``gguf`` (llama.cpp): the whole model in one file, linear weights as GGML MXFP4 blocks
  written here from the trained exponents (gguf-py's quantizer would recompute them),
  everything else float32. MXFP4 students of the Llama and Qwen3 architectures. NVFP4 is
  refused: llama.cpp's NVFP4 blocks have no tensor scale, and the student's block scales
  times its tensor scale are not E4M3 values in general. So is a W4A4 student: llama.cpp
  quantizes a matmul's activations to 8 bits (Q8_0 / Q8_1 blocks), never to MXFP4.

The export is written to a temporary directory and renamed into place: an interrupted or
refused export leaves nothing behind. ``eval.py`` takes the exported directory as a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from errors import BadInput
from students import EXPORT_KEY, GGUF_FILE, load_student, resolve_checkpoint

log = logging.getLogger("export")

FORMATS = ("compressed-tensors", "gguf")
GGUF_ARCHITECTURES = {"llama": "LLAMA", "qwen3": "QWEN3"}
# llama.cpp's pre-tokenizer names for tokenizers built from a Hugging Face directory.
GGUF_PRE_TOKENIZERS = {"qwen3": "qwen2", "qwen2": "qwen2"}


# ---------------------------------------------------------------- the student's quantized layers

def quantized_layers(model) -> list[tuple[str, torch.nn.Module]]:
    from quant import FakeQuantLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def mxfp4_parts(weight: torch.Tensor, scale_rule: str):
    """(dequantized weight, power-of-two scales [out, in/32] float32, E2M1 codes [out, in/2],
    E8M0 bytes [out, in/32]) of a latent weight: exactly what the student computes with."""
    from quant import E8M0_BIAS, pack_mxfp4, unpack_mxfp4

    codes, exponents = pack_mxfp4(weight.detach().float(), scale_rule)
    if bool((exponents == 0xFF).any()):
        raise BadInput("a latent weight holds NaN or Inf (MXFP4 scale byte 0xFF); the checkpoint is broken")
    scales = torch.ldexp(torch.ones(exponents.shape), exponents.to(torch.int32) - E8M0_BIAS)
    return unpack_mxfp4(codes, exponents), scales, codes, exponents


def nvfp4_parts(layer):
    """(dequantized weight, E4M3 block scales [out, in/16], tensor scale) of an NVFP4 layer:
    exactly what the student computes with, its fused group's tensor scale included."""
    from quant import pack_nvfp4, unpack_nvfp4

    latent = layer.latent_weight().detach().float()
    codes, block_scales, tensor_scale = pack_nvfp4(latent, layer.tensor_amax(latent))
    if not bool(torch.isfinite(tensor_scale)):
        raise BadInput("a latent weight holds NaN or Inf (NVFP4 tensor scale NaN); the checkpoint is broken")
    return unpack_nvfp4(codes, block_scales, tensor_scale), block_scales, tensor_scale


def check_exportable(settings: dict, export_format: str) -> None:
    quant_type = settings.get("quant_type")
    if export_format == "gguf" and settings.get("act_quant"):
        raise BadInput("--format gguf cannot run this W4A4 (--act-quant) student as trained: llama.cpp quantizes "
                       "activations to 8 bits, not to MXFP4 (use --format compressed-tensors)")
    if quant_type == "int4":
        raise BadInput("--quant-type int4 students (asymmetric, float zero point: torchao's numerics) cannot be "
                       "stored exactly in compressed-tensors (integer zero points) or GGUF; train with "
                       "--quant-type int4_sym or mxfp4 to ship the function you trained")
    if export_format == "gguf" and quant_type == "nvfp4":
        raise BadInput("--format gguf cannot hold this nvfp4 student exactly: llama.cpp's NVFP4 blocks have no tensor "
                       "scale (use --format compressed-tensors)")
    if export_format == "gguf" and quant_type != "mxfp4":
        raise BadInput(f"--format gguf writes MXFP4 blocks; this student is {quant_type} "
                       f"(use --format compressed-tensors)")
    if quant_type not in ("mxfp4", "nvfp4", "int4_sym"):
        raise BadInput(f"quantization {quant_type!r} has no 4-bit export")


# ---------------------------------------------------------------- compressed-tensors

def compressed_tensors_scheme(quant_type: str, group_size: int, targets: list[str], act_quant: bool = False):
    """The scheme of the student's layers. ``act_quant`` (W4A4): the input activations as the
    library's own W4A4 preset declares them (``NVFP4``, ``MXFP4``), taken from it."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if quant_type == "nvfp4":  # the library's own NVFP4 schemes, as llm-compressor writes them
        return preset_name_to_scheme("NVFP4" if act_quant else "NVFP4A16", targets)
    if quant_type == "mxfp4":
        weights = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="group", group_size=32,
                                   scale_dtype=torch.uint8)
    else:
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    inputs = preset_name_to_scheme("MXFP4", targets).input_activations if act_quant else None
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


# NVFP4 W4A4's input scales: calibrated on the embedded held-out prompts with their completions,
# all 38. On the embedded model, calibrated on 32 of them, none of the other 6 saturates any
# layer (their amax is at most 1.15x the calibrated one, and the power of two above the
# calibrated amax leaves up to 2x), and as many blocks (0.09%) get subnormal scales as under
# the dynamic scale; each doubling of headroom would add 0.3-0.5% subnormal blocks.
CALIBRATION_SEQUENCES = 64


def input_amax(student, tokenizer, sequences: int = CALIBRATION_SEQUENCES) -> dict[str, torch.Tensor]:
    """The largest input magnitude of each quantized layer over the embedded held-out prompts
    with their reference completions, run one at a time (no padding) through the student as
    it computes (its activations quantized): compressed-tensors' static_minmax observer, the
    calibration its NVFP4 W4A4 scheme's static input global scale comes from. Layers that
    serving engines fuse read one input, so they get one value."""
    from heldout import heldout_examples
    from quant import frozen_quant

    try:
        examples = heldout_examples(tokenizer, limit=sequences)
    except ValueError as e:
        raise BadInput(f"W4A4 export: cannot calibrate the NVFP4 input scales on the embedded held-out set with this "
                       f"student's tokenizer ({e})") from None
    amax: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(module, args):
            seen = args[0].detach().abs().amax().float()
            amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)
        return hook

    handles = [layer.register_forward_pre_hook(observe(name)) for name, layer in quantized_layers(student)]
    device = next(student.parameters()).device
    try:
        with torch.no_grad(), frozen_quant(student):
            for example in examples:
                student(torch.tensor([example.prompt_ids + example.completion_ids], device=device))
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, _ in quantized_layers(student) if name not in amax]
    if unseen:  # e.g. a mixture-of-experts expert no calibration token was routed to
        raise BadInput(f"W4A4 export: no calibration input reached {unseen[0]} ({len(unseen)} layers in all), so its "
                       f"static NVFP4 input scale is unknown")
    broken = [name for name, value in amax.items() if not torch.isfinite(value)]
    if broken:
        raise BadInput(f"W4A4 export: {broken[0]} sees a non-finite input on the calibration set ({len(broken)} layers "
                       f"in all); its NVFP4 input scale would be NaN")
    return amax


def compressed_tensors_export(student, settings: dict, input_amax: dict | None = None) -> tuple[dict, dict]:
    """(state dict with packed linear layers, quantization_config) of a student; ``input_amax``
    (NVFP4 W4A4): each layer's calibrated input amax, stored as ``input_global_scale``."""
    from compressed_tensors.compressors import (MXFP4PackedCompressor, NVFP4PackedCompressor,
                                                PackedQuantizationCompressor)
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from quant import INT4_FALLBACK_GROUP_SIZES, nvfp4_tensor_scale

    quant_type, act_quant = settings["quant_type"], bool(settings.get("act_quant"))
    layers = quantized_layers(student)
    # One config group for all the layers, at the smallest group size: transformers'
    # dequantizing load (CompressedTensorsConfig(dequantize=True), what eval.py uses)
    # decompresses every dense layer with the first config group's scheme whatever its
    # targets say, so a group per group size broke the layers of the other sizes. The group
    # sizes are powers of two, so the smallest divides the others: a layer trained with a
    # larger group stores its scale repeated per smaller group, the same codes, the same
    # function, at a few more scale bytes. vLLM's W4A16 kernels take groups of 128, 64 or 32
    # only (Marlin; Machete 128), so a coarser group (--group-size 256) is stored the same way
    # at the largest of those that divides every layer's group. FP4 formats have one block size.
    sizes = [layer.group_size for _, layer in layers] or [32]
    group = min(sizes) if quant_type in ("mxfp4", "nvfp4") else next(
        (g for g in INT4_FALLBACK_GROUP_SIZES if all(s % g == 0 for s in sizes)), min(sizes))
    packed = {}
    for name, layer in layers:
        weight = layer.weight.detach().float()
        scheme = compressed_tensors_scheme(quant_type, group, [name], act_quant)
        if quant_type == "mxfp4":
            dequantized, scales, _, _ = mxfp4_parts(weight, layer.scale_rule)
            tensors = MXFP4PackedCompressor.compress({"weight": dequantized, "weight_scale": scales}, scheme)
        elif quant_type == "nvfp4":
            dequantized, block_scales, tensor_scale = nvfp4_parts(layer)
            # a power of two: its reciprocal is exact
            tensors = NVFP4PackedCompressor.compress({"weight": dequantized, "weight_scale": block_scales.float(),
                                                      "weight_global_scale": (1 / tensor_scale).reshape(1)}, scheme)
            if act_quant:  # what the scheme registers beside the weights: 1 / the input's tensor scale
                tensors["input_global_scale"] = (1 / nvfp4_tensor_scale(input_amax[name])).reshape(1)
        else:
            if layer.group_size % group:
                raise BadInput(f"{name}: int4 group size {layer.group_size} is not a multiple of {group}, the "
                               f"smallest in this student; one compressed-tensors config group cannot hold both")
            _, scale, _ = layer.int4_parts()  # the learned scales where the student learns them
            scale = scale.repeat_interleave(layer.group_size // group, dim=-1)
            dequantized = layer.quantized_weight().detach().float()
            tensors = PackedQuantizationCompressor.compress({"weight": dequantized, "weight_scale": scale}, scheme)
        for key, value in tensors.items():
            packed[f"{name}.{key}"] = value.contiguous()
        if layer.bias is not None:
            packed[f"{name}.bias"] = layer.bias.detach().contiguous()
    quantized = {name for name, _ in layers}
    tied = getattr(student.config, "tie_word_embeddings", False)
    for key, value in student.state_dict().items():
        module = key.rpartition(".")[0]
        if module in quantized or (tied and key == "lm_head.weight"):
            continue
        packed[key] = value.detach().contiguous()
    # Its targets are the exact layer names.
    config = QuantizationConfig(
        config_groups={"group_0": compressed_tensors_scheme(quant_type, group, sorted(quantized), act_quant)}
        if layers else {},
        format={"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}.get(quant_type, "pack-quantized"),
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(name for name, m in student.named_modules()
                      if isinstance(m, torch.nn.Linear) and name not in quantized))
    config = config.to_dict()
    if quant_type in ("mxfp4", "nvfp4"):
        # transformers decompresses FP4 to bfloat16 weights on the first forward, which a
        # float32 load cannot multiply; decompressed at load time, in the dtype asked for, a
        # plain from_pretrained works in every dtype (vLLM does not read the key)
        config["dequantize"] = True
    return packed, config


def write_compressed_tensors(student, tokenizer, settings: dict, out: Path) -> None:
    from safetensors.torch import save_file

    from quant import CONFIG_KEY

    calibrated = input_amax(student, tokenizer) if settings.get("act_quant") and settings["quant_type"] == "nvfp4" \
        else None
    state_dict, quantization_config = compressed_tensors_export(student, settings, calibrated)
    config = student.config
    saved_settings = getattr(config, CONFIG_KEY, None)
    try:
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        config.quantization_config = quantization_config
        setattr(config, EXPORT_KEY, settings)
        config.save_pretrained(out)
    finally:
        del config.quantization_config
        delattr(config, EXPORT_KEY)
        if saved_settings is not None:
            setattr(config, CONFIG_KEY, saved_settings)
    save_file(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    if student.generation_config is not None:
        student.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    add_legacy_rope_keys(out / "config.json")


def add_legacy_rope_keys(config_file: Path) -> None:
    """The rotary base (and scaling) also under the keys transformers 4 reads: it ignores
    ``rope_parameters`` and takes its default base, and vLLM running with it (its pins allow
    transformers 4) then serves another model (SmolLM2's base is 100000, the default 10000)."""
    data = json.loads(config_file.read_text())
    rope = data.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # none, or one per layer type
        return
    data.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        data.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- GGUF

def gguf_mxfp4_blocks(codes: torch.Tensor, exponents: torch.Tensor) -> np.ndarray:
    """GGML MXFP4 rows [out, in/32 * 17]: per block the E8M0 byte, then 16 bytes holding
    element j in the low nibble and element j + 16 in the high one."""
    from quant import _unpack_nibbles

    nibbles = _unpack_nibbles(codes).reshape(*exponents.shape, 32)
    packed = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    blocks = torch.cat([exponents.unsqueeze(-1), packed], dim=-1)
    return blocks.reshape(exponents.shape[0], -1).numpy()


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama q/k projections (interleaved rotary halves)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def _source_gguf(run_config: dict) -> Path | None:
    """The GGUF file the teacher came from (the embedded model, or a .gguf --model)."""
    from models import embedded_gguf_path

    if not run_config:
        return None
    model = run_config.get("model")
    if model is None:
        return embedded_gguf_path()
    return Path(model) if str(model).endswith(".gguf") else None


def _looks_like_a_control_token(text: str) -> bool:
    """Added tokens that models leave unmarked but llama.cpp's converter types CONTROL."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<\uff5c") and text.endswith("\uff5c>")) \
        or (text.startswith("<unused") and text.endswith(">")) or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def gguf_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for the embedding's ``vocab_size`` rows, typed as llama.cpp's
    own converter types them: ids the tokenizer lacks are ``[PAD<i>]`` UNUSED (llama.cpp
    refuses a token list shorter than the embedding), special added tokens (and those
    that look it) CONTROL, other added tokens (Qwen3's ``<think>``) USER_DEFINED, the
    rest NORMAL."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise BadInput(f"--format gguf: the tokenizer has token ids up to {max(vocab.values())} but the model's "
                       f"embedding has {vocab_size} rows; the tokenizer does not belong to this model")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and (added[i].special or i in special or _looks_like_a_control_token(token)):
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(token.replace("\u2581", " "))  # llama.cpp matches user-defined tokens on raw text
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    return tokens, types


def _add_tokenizer(writer, tokenizer, config, source: Path | None) -> None:
    import gguf

    if source is not None:  # copy the tokenizer the teacher was converted from, field for field
        reader = gguf.GGUFReader(source)
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                value = field.contents()
                value_type = field.types[0]
                sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    bpe = json.loads(backend.to_str())["model"] if backend is not None else {}
    if bpe.get("type") != "BPE":
        raise BadInput("--format gguf: only byte-level BPE tokenizers (Llama 3, Qwen, SmolLM) are written from a "
                       "Hugging Face directory")
    tokens, types = gguf_vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    pre = GGUF_PRE_TOKENIZERS.get(config.model_type)
    if pre is None:
        log.warning("no llama.cpp pre-tokenizer known for %s; writing 'default'", config.model_type)
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, special token ids and the chat template, as llama.cpp's converter reads them
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        special = gguf.SpecialVocab(saved, load_merges=True, n_vocab=len(tokens))
    # whether a BOS / EOS is added: what the tokenizer does, which is what the student saw
    encoded = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and encoded[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and encoded[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def _rope_frequency_factors(config, arch_name: str, head_dim: int, rope_theta: float) -> np.ndarray | None:
    """None for plain rotary embeddings; for Llama 3's scaled ones the factor each rotary
    frequency is divided by (llama.cpp's ``rope_freqs`` tensor), taken from transformers'
    own frequencies so the file computes what the student computed. Other scalings are
    refused: this export does not write them."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3" or arch_name != "LLAMA":
        raise BadInput(f"--format gguf: this {config.model_type} model uses {rope_type!r} rotary scaling, which the "
                       f"GGUF export does not write (only Llama 3's); use --format compressed-tensors")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert attention_scaling == 1.0
    return (plain / scaled).float().numpy()


def write_gguf(student, tokenizer, settings: dict, run_config: dict, out: Path) -> None:
    import gguf

    config = student.config
    arch_name = GGUF_ARCHITECTURES.get(config.model_type)
    if arch_name is None:
        raise BadInput(f"--format gguf supports {', '.join(GGUF_ARCHITECTURES)} models; this one is "
                       f"{config.model_type} (use --format compressed-tensors)")
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(out / GGUF_FILE, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(run_config.get("output_dir") or "student").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_frequency_factors = _rope_frequency_factors(config, arch_name, head_dim, rope_theta)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_string("qakd.quantization", json.dumps(settings))
    _add_tokenizer(writer, tokenizer, config, _source_gguf(run_config))

    if rope_frequency_factors is not None:  # llama.cpp divides each rotary frequency by its factor
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_frequency_factors)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    layers = dict(quantized_layers(student))
    tied = getattr(config, "tie_word_embeddings", False)
    for key, value in student.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInput(f"--format gguf: no GGUF name for tensor {key}")
        module, _, kind = key.rpartition(".")
        permute_heads = None
        if arch_name == "LLAMA" and kind == "weight" and module.endswith(("q_proj", "k_proj")):
            permute_heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
        if module in layers and kind == "weight":
            _, _, codes, exponents = mxfp4_parts(value, layers[module].scale_rule)
            blocks = gguf_mxfp4_blocks(codes, exponents)
            if permute_heads:
                blocks = _rope_permute(blocks, permute_heads)
            writer.add_tensor(name, np.ascontiguousarray(blocks), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            array = value.detach().float().numpy()
            if permute_heads:
                array = _rope_permute(array, permute_heads)
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- sizes and main

def linear_bits_per_parameter(out: Path, export_format: str) -> float | None:
    """Bits per quantized linear weight on disk: packed codes plus scales."""
    if export_format == "gguf":
        import gguf

        reader = gguf.GGUFReader(out / GGUF_FILE)
        quantized = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.MXFP4]
        return 8 * sum(int(t.n_bytes) for t in quantized) / sum(int(t.n_elements) for t in quantized) \
            if quantized else None
    from safetensors import safe_open

    packed_bytes = elements = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.endswith(".weight_packed"):
                module = key[: -len(".weight_packed")]
                packed = f.get_tensor(key)
                scale = f.get_tensor(module + ".weight_scale")
                packed_bytes += packed.numel() * packed.element_size() + scale.numel() * scale.element_size()
                shape = (f.get_tensor(module + ".weight_shape").tolist() if module + ".weight_shape" in keys
                         else [packed.shape[0], packed.shape[1] * 2])
                elements += shape[0] * shape[1]
    return 8 * packed_bytes / elements if elements else None


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint-N directory, or a run directory (its latest checkpoint)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the directory to write (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def load_snippets(out: Path, export_format: str, rope_scaled: bool = False) -> dict[str, str]:
    """How to run the export, by tool: Python and shell snippets that run as written from the
    directory export.py was run in (tests/test_export.py runs the transformers ones, and
    tests/test_engines.py the llama.cpp one). A GGUF with Llama 3 rotary scaling gets no
    transformers snippet: transformers' GGUF loader drops the scaling."""
    if export_format == "compressed-tensors":
        return {"transformers": f"""import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# float32 holds the trained 4-bit weights exactly; bfloat16 runs too (exact for MXFP4 and
# NVFP4; INT4 weights round to bfloat16)
model = AutoModelForCausalLM.from_pretrained("{out}", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained("{out}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=8, do_sample=False)[0]))
""", "vllm": f"vllm serve {out}"}
    snippets = {"transformers": f"""import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# transformers dequantizes the GGUF's MXFP4 blocks to float32 (the same values)
model = AutoModelForCausalLM.from_pretrained("{out}", gguf_file="{GGUF_FILE}", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained("{out}", gguf_file="{GGUF_FILE}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=8, do_sample=False)[0]))
""", "llama-cpp-python": f"""from llama_cpp import Llama

llm = Llama(model_path="{out / GGUF_FILE}", verbose=False)
print(llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"])
""", "llama.cpp": f"llama-cli -m {out / GGUF_FILE} -p 'The capital of France is' -n 8"}
    if rope_scaled:
        del snippets["transformers"]
    return snippets


def write_model_card(directory: Path, out: Path, export_format: str, settings: dict, run_config: dict,
                     student_config) -> None:
    """README.md beside the weights: what the model is and how to run it."""
    quant = settings["quant_type"] + (f", groups of {settings['group_size']}" if settings.get("group_size") else "") \
        + (", activations too (W4A4)" if settings.get("act_quant") else "")
    lines = [f"# {out.name}", "",
             f"A 4-bit student ({quant}; every linear layer but `lm_head`) distilled by qakd from "
             f"`{run_config.get('model') or 'the embedded SmolLM2-135M-Instruct'}`, exported as {export_format}. "
             f"Its weights are the trained student's 4-bit weights bit for bit.", ""]
    if settings.get("act_quant"):
        lines += ["Its config declares the layers' inputs quantized as the student's were: vLLM's W4A4 kernels "
                  "quantize them; transformers computes with the 4-bit weights and unquantized activations.", ""]
    lines += ["## Run it", ""]
    rope = getattr(student_config, "rope_parameters", None) or {}
    rope_scaled = export_format == "gguf" and rope.get("rope_type", "default") != "default"
    for tool, snippet in load_snippets(out, export_format, rope_scaled).items():
        language = "python" if "import" in snippet else "bash"
        lines += [f"{tool}:", "", f"```{language}", snippet.rstrip(), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


def export(checkpoint_path: str, export_format: str, out: Path, overwrite: bool = False) -> Path:
    from quant import CONFIG_KEY

    if out.exists() and not overwrite:
        raise BadInput(f"--out {out} already exists; pass --overwrite to replace it or choose another directory")
    checkpoint = resolve_checkpoint(checkpoint_path)
    config_file = checkpoint / "config.json"
    if not config_file.exists() or EXPORT_KEY in json.loads(config_file.read_text()):
        kind = "compressed-tensors" if config_file.exists() else "gguf"
        raise BadInput(f"{checkpoint} is already an export ({kind}); export takes a student checkpoint "
                       f"saved by train.py (checkpoint-N or its run directory)")
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise BadInput(f"--out {out} holds the checkpoint being exported; choose another directory")
    settings = json.loads(config_file.read_text()).get(CONFIG_KEY)
    if not settings:
        raise BadInput(f"{checkpoint} has no quantization settings ('{CONFIG_KEY}' in config.json); export "
                       f"takes a student checkpoint saved by train.py")
    check_exportable(settings, export_format)
    student, tokenizer, settings = load_student(checkpoint)
    run_config_file = checkpoint / "run_config.json"
    run_config = json.loads(run_config_file.read_text()) if run_config_file.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with torch.no_grad():
            if export_format == "compressed-tensors":
                write_compressed_tensors(student, tokenizer, settings, staging)
            else:
                write_gguf(student, tokenizer, settings, run_config, staging)
        if run_config_file.exists():  # eval.py finds the teacher of an exported row here
            shutil.copy(run_config_file, staging / "run_config.json")
        write_model_card(staging, out, export_format, settings, run_config, student.config)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weights = (out / ("model.safetensors" if export_format == "compressed-tensors" else GGUF_FILE)).stat().st_size
    latent = (checkpoint / "model.safetensors").stat().st_size
    bits = linear_bits_per_parameter(out, export_format)
    print(f"wrote {out} ({export_format}, {settings['quant_type']}): weights {weights / 2**20:.1f} MiB, "
          f"{weights / latent:.3f}x the latent checkpoint's {latent / 2**20:.1f} MiB (directory "
          f"{directory_size(out) / 2**20:.1f} MiB); quantized linear weights {bits:.2f} bits per parameter")
    print(f"run it: {out / 'README.md'}")
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        export(args.checkpoint, args.format, Path(args.out), args.overwrite)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
