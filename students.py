"""A student as eval.py and export.py load it: a checkpoint, an export, or another tool's.

* a checkpoint of train.py (``checkpoint-N``, or a run directory: its latest): the latent
  weights, rebuilt with the quantization recorded in its config (what deploys);
* an export of export.py: compressed-tensors (the 4-bit weights as they ship, its settings
  under ``EXPORT_KEY`` in the config) or GGUF (``GGUF_FILE``, its settings in the
  ``qakd.quantization`` field);
* a compressed-tensors checkpoint another tool wrote (llm-compressor's baselines), its
  settings read off its scheme where our students could be it.

Settings are read without loading weights (``student_settings``), so a bad checkpoint is
refused before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from errors import BadInput

GGUF_FILE = "model.gguf"  # export.py's GGUF directory holds the model in this one file
EXPORT_KEY = "qakd_quantization"  # export.py's record of the student's settings in config.json


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or the latest checkpoint-N of a run directory."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"checkpoint {path} does not exist")
    if (p / "config.json").exists() or (p / GGUF_FILE).exists():
        return p
    from checkpoints import latest_checkpoint

    latest = latest_checkpoint(p)
    if latest is None:
        raise BadInput(f"{path} holds no checkpoint (config.json or checkpoint-N/)")
    return latest


def student_settings(checkpoint: Path) -> dict:
    """The quantization settings of a student (what its row is evaluated with, what its
    ``ptq`` row rounds with), read without loading its weights."""
    from quant import CONFIG_KEY

    if (checkpoint / GGUF_FILE).exists() and not (checkpoint / "config.json").exists():
        import gguf

        field = gguf.GGUFReader(checkpoint / GGUF_FILE).fields.get("qakd.quantization")
        if field is None:
            raise BadInput(f"{checkpoint / GGUF_FILE} was not written by export.py (no qakd.quantization field)")
        return json.loads(field.contents())
    if not (checkpoint / "config.json").exists():
        raise BadInput(f"{checkpoint} is not a checkpoint (no config.json); pass a checkpoint-N directory "
                       f"or a run directory that holds one")
    config = json.loads((checkpoint / "config.json").read_text())
    if EXPORT_KEY in config:
        return config[EXPORT_KEY]
    if is_foreign_compressed_tensors(config):  # another tool's (llm-compressor): read off its scheme
        return compressed_tensors_settings(config["quantization_config"], checkpoint)
    if not config.get(CONFIG_KEY):
        raise BadInput(f"{checkpoint} has no quantization settings ('{CONFIG_KEY}' in config.json); it is not a "
                       f"student saved by train.py with --quant-type mxfp4/nvfp4/int4/int4_sym")
    return config[CONFIG_KEY]


def is_foreign_compressed_tensors(config: dict) -> bool:
    """A compressed-tensors checkpoint that another tool (llm-compressor) wrote."""
    from quant import CONFIG_KEY

    return EXPORT_KEY not in config and not config.get(CONFIG_KEY) and "quantization_config" in config


def compressed_tensors_settings(quantization: dict, checkpoint: Path) -> dict:
    """Our settings for a compressed-tensors checkpoint another tool wrote (llm-compressor):
    they name its row's format and build its ``ptq`` row. Only what our students can be is
    taken: 4-bit weight-only, symmetric, group-wise INT (``int4_sym``) or MXFP4, one scheme for
    every quantized layer, skipped layers by name; anything else is refused in one line."""
    def refuse(why: str):
        raise BadInput(f"{checkpoint}: its compressed-tensors quantization {why}; it has no qakd equivalent "
                       f"(4-bit weight-only, symmetric, group-wise int4_sym or mxfp4)")

    if quantization.get("quant_method") != "compressed-tensors":
        refuse(f"method is {quantization.get('quant_method')!r}, not compressed-tensors")
    if quantization.get("kv_cache_scheme") or quantization.get("sparsity_config") or \
            quantization.get("transform_config"):
        refuse("has a KV-cache scheme, sparsity or transforms")
    found = set()
    for group in (quantization.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            refuse("quantizes activations")
        if any(str(t).startswith("re:") for t in group.get("targets", [])):
            refuse(f"targets layers by pattern ({group['targets']})")
        if (weights.get("num_bits"), weights.get("strategy")) != (4, "group") or not weights.get("symmetric"):
            refuse(f"is {weights.get('num_bits')}-bit {weights.get('strategy')}-wise"
                   f"{'' if weights.get('symmetric') else ' asymmetric'}")
        if weights.get("type") == "int":
            found.add(("int4_sym", weights.get("group_size")))
        elif weights.get("type") == "float" and weights.get("group_size") == 32 and \
                "uint8" in str(weights.get("scale_dtype")):
            found.add(("mxfp4", None))
        else:
            refuse(f"is a 4-bit {weights.get('type')} format with groups of {weights.get('group_size')} and "
                   f"{weights.get('scale_dtype')} scales")
    if len(found) != 1:
        refuse("uses no scheme or several" if not found else f"mixes schemes {sorted(map(str, found))}")
    ignore = quantization.get("ignore") or []
    if any(str(name).startswith("re:") for name in ignore):
        refuse(f"skips layers by pattern ({ignore})")
    (quant_type, group_size), = found
    # MXFP4 scales were chosen by the tool; the ptq row rounds with the spec's floor rule
    return {"quant_type": quant_type, "group_size": group_size, "scale_rule": "floor", "skip": list(ignore)}


def load_student(checkpoint: Path):
    """A saved student rebuilt with its recorded quantization (what deploys), or a
    compressed-tensors export of one, loaded as it ships; also a compressed-tensors
    checkpoint another tool wrote (llm-compressor's baselines), its settings read off its scheme."""
    from models import load_model
    from quant import quantize_model_from_settings

    settings = student_settings(checkpoint)
    if (checkpoint / GGUF_FILE).exists() and not (checkpoint / "config.json").exists():
        # export.py's GGUF directory: transformers dequantizes it (gguf-py) to float32
        import gguf

        if any(t.name == "rope_freqs.weight" for t in gguf.GGUFReader(checkpoint / GGUF_FILE).tensors):
            raise BadInput(f"{checkpoint / GGUF_FILE} scales its rotary embedding (Llama 3), which transformers' "
                           f"GGUF loader drops; evaluate the checkpoint or its compressed-tensors export instead")
        model, tokenizer = load_model(checkpoint / GGUF_FILE)
        return model.eval(), tokenizer, settings
    config = json.loads((checkpoint / "config.json").read_text())
    if EXPORT_KEY in config or is_foreign_compressed_tensors(config):
        # a compressed-tensors directory (export.py's or another tool's): the 4-bit weights as they ship
        from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

        model = AutoModelForCausalLM.from_pretrained(  # unpacked by compressed-tensors, in float32
            checkpoint, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
        if settings.get("act_quant"):  # transformers runs the weights alone: the inputs as training quantized them
            quantize_exported_inputs(model, checkpoint, config, settings["quant_type"])
        return model.eval(), AutoTokenizer.from_pretrained(checkpoint), settings
    model, tokenizer = load_model(checkpoint)
    quantize_model_from_settings(model, settings)
    if settings.get("learn_scales"):  # parameters transformers does not know: loaded here
        from checkpoints import load_weights

        load_weights(model, checkpoint)
    return model.eval(), tokenizer, settings


def quantize_exported_inputs(model, checkpoint: Path, config: dict, quant_type: str) -> None:
    """A W4A4 export as loaded by transformers computes with unquantized inputs: make each of
    its quantized layers fake-quantize its input as the scheme declares, NVFP4 under the
    static tensor scale the export holds (1 / ``input_global_scale``), not the dynamic one
    the student trained with."""
    from safetensors import safe_open

    from quant import E2M1_MAX, E4M3_MAX, quantize_inputs

    targets = [t for group in config["quantization_config"]["config_groups"].values() for t in group["targets"]]
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        for name in targets:
            tensor_amax = None
            if quant_type == "nvfp4":  # the amax whose tensor scale is 1 / input_global_scale
                tensor_amax = E4M3_MAX * E2M1_MAX / f.get_tensor(f"{name}.input_global_scale").float().squeeze()
            quantize_inputs(model.get_submodule(name), quant_type, tensor_amax)
