"""eval.py takes a compressed-tensors checkpoint written by another tool (llm-compressor's
baselines) as a row: settings read off its scheme, weights as packed. The checkpoint here is
built with the compressed-tensors package alone, without the qakd keys export.py adds."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import eval as evaluation
import students
from errors import BadInput

GROUP = 64


def int4_sym_g64(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, scales [out, in/64]) with scales no qakd rule would pick (a
    calibrated tool's): 1.1 x amax / 7.5, so some weights clip."""
    groups = weight.float().reshape(weight.shape[0], -1, GROUP)
    scale = groups.abs().amax(-1) / 7.5 * 1.1
    codes = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), -8, 7)
    return (codes * scale.unsqueeze(-1)).reshape(weight.shape), scale


def write_foreign_checkpoint(path: Path, tokenizer) -> dict[str, torch.Tensor]:
    """A tiny Llama as a W4A16 g64 pack-quantized checkpoint (targets Linear, lm_head ignored);
    returns the dequantized weight of every quantized layer."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)
    from safetensors.torch import save_file

    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    state, expected = {}, {}
    for name, layer in layers.items():
        expected[name], scale = int4_sym_g64(layer.weight.detach())
        packed = PackedQuantizationCompressor.compress({"weight": expected[name], "weight_scale": scale}, scheme)
        state.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
    state.update({k: v.contiguous() for k, v in model.state_dict().items()
                  if k.rpartition(".")[0] not in layers and k != "lm_head.weight"})  # tied head
    model.config.quantization_config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"],
        quantization_status=QuantizationStatus.COMPRESSED).to_dict()
    model.config.save_pretrained(path)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return expected


def test_a_foreign_w4a16_g64_checkpoint_is_a_row_with_its_settings_and_packed_weights(tmp_path, embedded_tokenizer):
    checkpoint = tmp_path / "gptq_int4_sym_g64"
    expected = write_foreign_checkpoint(checkpoint, embedded_tokenizer)
    config = json.loads((checkpoint / "config.json").read_text())
    assert "qakd_quantization" not in config and "fake_quant" not in config
    assert students.resolve_checkpoint(str(checkpoint)) == checkpoint
    model, _, settings = students.load_student(checkpoint)
    assert settings == {"quant_type": "int4_sym", "group_size": 64, "scale_rule": "floor", "skip": ["lm_head"]}
    for name, weight in expected.items():  # unpacked by compressed-tensors, bit for bit
        assert model.get_submodule(name).weight.dtype == torch.float32
        assert torch.equal(model.get_submodule(name).weight.detach(), weight), name
    evaluation.ptq_baseline(model, settings)  # its ptq row builds from these settings


def test_llm_compressors_mxfp4a16_preset_maps_to_mxfp4():
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("MXFP4A16", ["Linear"])},
                                format="mxfp4-pack-quantized", ignore=["lm_head"]).to_dict()
    assert students.compressed_tensors_settings(json.loads(json.dumps(config, default=str)), Path("x")) == {
        "quant_type": "mxfp4", "group_size": None, "scale_rule": "floor", "skip": ["lm_head"]}


@pytest.mark.parametrize("preset, message", [
    ("W4A16_ASYM", "is 4-bit group-wise asymmetric"),
    ("W4A8", "quantizes activations"),
    ("MXFP4", "quantizes activations"),
    ("W8A16", "is 8-bit group-wise"),
    ("NVFP4A16", "is 4-bit tensor_group-wise"),
])
def test_what_has_no_qakd_equivalent_is_refused_in_one_line(preset, message):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"]).to_dict()
    with pytest.raises(BadInput) as error:
        students.compressed_tensors_settings(json.loads(json.dumps(config, default=str)), Path("ckpt"))
    assert message in str(error.value) and "has no qakd equivalent" in str(error.value)
    assert len(str(error.value).splitlines()) == 1
