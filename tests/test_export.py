"""export.py: the exported 4-bit checkpoints compute what the student computed, read back by
the loaders users use (transformers + compressed-tensors, gguf-py, transformers' GGUF path)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

import eval as evaluation
import export
import students
from quant import FakeQuantLinear, fake_quantize, nvfp4_tensor_scale, quantize_model


def make_student(path: Path, tokenizer, arch="llama", quant_type="mxfp4", scale_rule="floor", group_size=None,
                 act_quant=False, **overrides):
    """A saved tiny student whose latent weights have moved off the teacher's."""
    sizes = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=512)
    model = tiny_model(arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       **{**sizes, **overrides})
    quantize_model(model, quant_type, group_size, scale_rule=scale_rule, act_quant=act_quant)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def student_of(checkpoint: Path):
    return students.load_student(checkpoint)[0]


def prompts(vocab: int, seed=0):
    return torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(a, b, ids):
    with torch.no_grad():
        x, y = a(ids).logits, b(ids).logits
    assert (x - y).abs().max().item() <= 1e-5 * x.abs().max().item()


def load_compressed(out: Path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **extra).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("quant_type, scale_rule", [("mxfp4", "floor"), ("mxfp4", "rceil"), ("mxfp4", "mse"),
                                                      ("nvfp4", "floor"), ("int4_sym", "floor")])
def test_compressed_tensors_export_is_the_students_function(tmp_path, embedded_tokenizer, arch, quant_type,
                                                            scale_rule, capsys):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, arch, quant_type, scale_rule)
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["quantization_status"] == "compressed"
    assert quantization["format"] == {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized",
                                      "int4_sym": "pack-quantized"}[quant_type]
    student = student_of(checkpoint)
    layers = dict(export.quantized_layers(student))
    targets = [t for group in quantization["config_groups"].values() for t in group["targets"]]
    assert sorted(targets) == sorted(layers) and quantization["ignore"] == ["lm_head"]
    for group in quantization["config_groups"].values():
        weights = group["weights"]
        strategy = "tensor_group" if quant_type == "nvfp4" else "group"
        assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (4, True, strategy)
        assert weights["type"] == ("int" if quant_type == "int4_sym" else "float")
    assert "fake_quant" not in config and config["qakd_quantization"]["quant_type"] == quant_type
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    bits = {"mxfp4": "4.25", "nvfp4": "4.50"}.get(quant_type)
    assert f"{bits} bits per parameter" in capsys.readouterr().out if bits else True
    assert_loads_as_the_student(out, student, quant_type, scale_rule, len(embedded_tokenizer))


def test_nvfp4_global_scales_are_the_reciprocal_tensor_scales_shared_by_fused_layers(tmp_path, embedded_tokenizer):
    from safetensors.torch import load_file

    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "nvfp4")
    student = student_of(checkpoint)
    with torch.no_grad():  # k_proj the largest of its group: q and v take k's tensor scale
        student.model.layers[0].self_attn.k_proj.weight.mul_(20)
    student.save_pretrained(checkpoint)
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    tensors = load_file(out / "model.safetensors")
    layers = dict(export.quantized_layers(student))
    for name, layer in layers.items():
        assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        expected = 1 / nvfp4_tensor_scale(layer.tensor_amax())
        assert torch.equal(tensors[f"{name}.weight_global_scale"], expected.reshape(1)), name
    global_scale = {name: tensors[f"{name}.weight_global_scale"].item() for name in layers}
    attention = "model.layers.0.self_attn."
    k_amax = student.model.layers[0].self_attn.k_proj.weight.abs().amax()
    assert global_scale[attention + "q_proj"] == global_scale[attention + "v_proj"] == \
        1 / nvfp4_tensor_scale(k_amax).item() != global_scale[attention + "o_proj"]
    for group in student.quant_settings.tensor_scale_groups:
        assert len({global_scale[name] for name in group}) == 1, group
    assert_loads_as_the_student(out, student, "nvfp4", "floor", len(embedded_tokenizer))


def test_compressed_tensors_unpacks_nvfp4_to_bfloat16_so_only_a_power_of_two_tensor_scale_ships_exactly():
    """Why the NVFP4 tensor scale is a power of two (quant.py): compressed-tensors unpacks
    to bfloat16, multiplying by block scale / global scale; with torchao's amax / 2688
    itself the unpacked weights are not the float32 ones the student computed with."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    import quant

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    scheme = preset_name_to_scheme("NVFP4A16", ["layer"])

    def shipped(tensor_scale):
        values, block_scale = quant._nv_quantize(w, tensor_scale)
        dequantized = quant._nv_dequantize(values, block_scale, tensor_scale).flatten(-2)
        packed = NVFP4PackedCompressor.compress({"weight": dequantized, "weight_scale": block_scale.squeeze(-1),
                                                 "weight_global_scale": (1 / tensor_scale).reshape(1)}, scheme)
        unpacked = NVFP4PackedCompressor.decompress(packed, scheme)["weight"]
        return dequantized, unpacked

    trained, unpacked = shipped(w.abs().amax() / (448 * 6))
    assert unpacked.dtype == torch.bfloat16 and not torch.equal(unpacked.float(), trained)
    trained, unpacked = shipped(nvfp4_tensor_scale(w.abs().amax()))
    assert torch.equal(unpacked.float(), trained)


def assert_loads_as_the_student(out: Path, student, quant_type: str, scale_rule: str, vocab: int):
    """Unpacked by compressed-tensors, not by our code: every linear weight is the student's
    quantized weight bit for bit, and the logits agree."""
    loaded = load_compressed(out, dequantize=True)
    layers = dict(export.quantized_layers(student))
    for name, layer in layers.items():
        tensor_amax = None
        if quant_type == "nvfp4":  # the largest magnitude of its fused group, or its own
            group = next((g for g in student.quant_settings.tensor_scale_groups if name in g), [name])
            tensor_amax = max(layers[n].weight.detach().abs().amax() for n in group)
        expected = fake_quantize(layer.weight.detach(), quant_type, layer.group_size, scale_rule,
                                 tensor_amax=tensor_amax)
        assert torch.equal(loaded.get_submodule(name).weight.detach().float(), expected), name
    ids = prompts(vocab)
    assert_same_logits(student, loaded, ids)
    # a plain from_pretrained in float32, as a user's first load is written
    assert_same_logits(student, load_compressed(out, dequantize=False), ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("quant_type, preset", [("mxfp4", "MXFP4"), ("nvfp4", "NVFP4")])
def test_a_w4a4_export_declares_its_inputs_as_the_w4a4_preset_and_unpacks_to_the_students_weights(
        tmp_path, embedded_tokenizer, arch, quant_type, preset):
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file

    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, arch, quant_type, act_quant=True)
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == f"{quant_type}-pack-quantized" and config["qakd_quantization"]["act_quant"]
    [group] = quantization["config_groups"].values()
    expected = json.loads(preset_name_to_scheme(preset, ["x"]).model_dump_json(exclude_none=True))
    assert group["input_activations"] == {**expected["input_activations"], **{
        k: v for k, v in group["input_activations"].items() if v is None}}  # the preset's args, exactly
    assert group["input_activations"]["dynamic"] == (True if quant_type == "mxfp4" else "local")
    assert "W4A4" in (out / "README.md").read_text()
    student = student_of(checkpoint)
    layers = dict(export.quantized_layers(student))
    tensors = load_file(out / "model.safetensors")
    if quant_type == "nvfp4":  # the static input global scale vLLM reads: 1 / the calibrated tensor scale
        amax = export.input_amax(student, embedded_tokenizer)
        for name in layers:
            scale = tensors[f"{name}.input_global_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (1,)
            assert torch.equal(scale, (1 / nvfp4_tensor_scale(amax[name])).reshape(1)), name
        for fused in student.quant_settings.tensor_scale_groups:  # one input: one scale, as vLLM wants
            assert len({tensors[f"{name}.input_global_scale"].item() for name in fused}) == 1
    else:
        assert not [k for k in tensors if k.endswith(".input_global_scale")]
    # transformers + compressed-tensors unpack every weight to the student's bit for bit, and
    # compute with unquantized inputs; eval.py's loader quantizes them as vLLM would
    loaded = load_compressed(out, dequantize=True)
    for name, layer in layers.items():
        assert torch.equal(loaded.get_submodule(name).weight.detach().float(), layer.quantized_weight()), name
    # a calibration sequence: no input beyond the calibrated range, where a static NVFP4 scale
    # would saturate what the dynamic one does not (random token ids can go there)
    from heldout import heldout_examples

    example = heldout_examples(embedded_tokenizer, limit=1)[0]
    ids = torch.tensor([example.prompt_ids + example.completion_ids])
    assert_same_logits(student, student_of(out), ids)
    for layer in layers.values():
        layer.act_quant = False
    assert_same_logits(student, loaded, ids)


def test_w4a4_calibration_that_sees_a_non_finite_input_is_refused_in_one_line(tmp_path, embedded_tokenizer):
    from errors import BadInput

    student = student_of(make_student(tmp_path / "student", embedded_tokenizer, "llama", "nvfp4", act_quant=True))
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(BadInput, match="non-finite input on the calibration set"):
        export.input_amax(student, embedded_tokenizer)


def test_a_w4a4_student_is_refused_by_gguf_in_one_line_and_nothing_is_written(tmp_path, embedded_tokenizer, capsys):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "mxfp4", act_quant=True)
    capsys.readouterr()
    assert export.main([str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format gguf cannot run this W4A4 (--act-quant) student as trained: llama.cpp quantizes activations to " \
           "8 bits" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["student"]


@pytest.mark.parametrize("export_format", ["compressed-tensors", "gguf"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_model_cards_transformers_snippet_runs_as_written(tmp_path, embedded_tokenizer, export_format, dtype,
                                                              capsys):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "mxfp4", "mse")
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", export_format, "--out", str(out)]) == 0
    assert f"run it: {out / 'README.md'}" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    snippet = export.load_snippets(out, export_format)["transformers"]
    assert snippet.strip() in card
    if export_format == "compressed-tensors":
        snippet = snippet.replace("dtype=torch.float32", f"dtype=torch.{dtype}")
    elif dtype == "bfloat16":
        pytest.skip("the GGUF snippet loads in float32")
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("The capital of France is") and len(printed) > len("The capital of France is")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_int4_sym_layers_of_different_group_sizes_export_exactly(tmp_path, embedded_tokenizer, arch):
    # The default group size is 128 where it divides in_features, else 64: down_proj (384
    # inputs) gets 128, the 64-input layers 64 -- as on SmolLM2-135M (1536 and 576 inputs).
    # transformers dequantizes every dense layer with the first config group's scheme, so a
    # group per group size decompressed down_proj with 64 ("size of tensor a (6) must match
    # ... (3)").
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, arch, "int4_sym", intermediate_size=384)
    student = student_of(checkpoint)
    layers = dict(export.quantized_layers(student))
    assert {layer.group_size for layer in layers.values()} == {64, 128}
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [sorted(group["targets"]) for group in groups.values()] == [sorted(layers)]
    assert [group["weights"]["group_size"] for group in groups.values()] == [64]
    assert_loads_as_the_student(out, student, "int4_sym", "floor", len(embedded_tokenizer))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_export_dequantizes_bit_for_bit_and_loads_in_transformers(tmp_path, embedded_tokenizer, arch):
    import gguf
    from transformers import AutoModelForCausalLM

    # transformers' GGUF reader takes Qwen3's head_dim as 128 whatever the file says: so be it here
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, arch, "mxfp4",
                              **({"head_dim": 128} if arch == "qwen3" else {}))
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "gguf", "--out", str(out)]) == 0
    student = student_of(checkpoint)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, export.GGUF_ARCHITECTURES[arch]),
                                     student.config.num_hidden_layers)
    by_gguf_name = {names.get_name(f"{name}.weight", try_suffixes=(".weight",)): (name, layer)
                    for name, layer in export.quantized_layers(student)}
    reader = gguf.GGUFReader(out / export.GGUF_FILE)
    quantized = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.MXFP4]
    assert sorted(t.name for t in quantized) == sorted(by_gguf_name)
    config = student.config
    for tensor in quantized:
        name, layer = by_gguf_name[tensor.name]
        # gguf-py's own dequantizer against the student's quantized weight
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = fake_quantize(layer.weight.detach(), "mxfp4").numpy()
        if arch == "llama" and name.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary row order
            heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
            expected = export._rope_permute(expected, heads)
        assert values.shape == expected.shape and np.array_equal(values, expected)  # -0.0 == 0.0
    assert json.loads(reader.fields["qakd.quantization"].contents())["quant_type"] == "mxfp4"

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=export.GGUF_FILE, dtype=torch.float32).eval()
    assert_same_logits(student, loaded, prompts(len(embedded_tokenizer)))


def test_eval_takes_the_export_as_a_row(tmp_path, embedded_tokenizer, monkeypatch):
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path / "cache"))
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "mxfp4")
    (checkpoint / "run_config.json").write_text(json.dumps({"model": str(checkpoint)}))  # teacher: itself
    for export_format in export.FORMATS:
        assert export.main([str(checkpoint), "--format", export_format, "--out", str(tmp_path / export_format)]) == 0
    assert evaluation.main([str(tmp_path / "compressed-tensors"), str(tmp_path / "gguf"), str(checkpoint), "--tasks",
                            "", "--no-perplexity", "--embedded", "--limit", "4", "--output-dir",
                            str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert list(rows) == ["teacher", "ptq", "compressed-tensors", "gguf", "student"]
    for shipped in ("compressed-tensors", "gguf"):  # what ships measures what trained
        assert rows[shipped]["embedded"] == pytest.approx(rows["student"]["embedded"], rel=1e-5)


@pytest.mark.parametrize("quant_type, export_format, message", [
    ("int4", "compressed-tensors", "--quant-type int4 students (asymmetric, float zero point"),
    ("int4", "gguf", "--quant-type int4 students (asymmetric, float zero point"),
    ("int4_sym", "gguf", "--format gguf writes MXFP4 blocks; this student is int4_sym"),
    ("nvfp4", "gguf", "--format gguf cannot hold this nvfp4 student exactly: llama.cpp's NVFP4 blocks have no "
                      "tensor scale"),
])
def test_a_format_that_cannot_hold_the_student_is_refused(tmp_path, embedded_tokenizer, capsys, quant_type,
                                                          export_format, message):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", quant_type,
                              group_size=16 if quant_type == "nvfp4" else 32)
    capsys.readouterr()
    assert export.main([str(checkpoint), "--format", export_format, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["student"]  # nothing written, no staging left


def test_unquantized_checkpoint_and_existing_output_are_refused(tmp_path, embedded_tokenizer, tiny_checkpoint,
                                                                capsys):
    assert export.main([str(tiny_checkpoint), "--format", "gguf", "--out", str(tmp_path / "out")]) == 2
    assert "has no quantization settings ('fake_quant' in config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert export.main([str(checkpoint), "--format", "gguf", "--out", str(existing)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {existing} already exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert os.listdir(existing) == ["keep.txt"]
    assert export.main([str(checkpoint), "--format", "gguf", "--out", str(existing), "--overwrite"]) == 0
    assert sorted(os.listdir(existing)) == ["README.md", export.GGUF_FILE]
    assert sorted(os.listdir(tmp_path)) == ["existing", "student"]


@pytest.mark.parametrize("export_format", ["gguf", "compressed-tensors"])
def test_an_export_directory_given_as_the_checkpoint_is_one_line(tmp_path, embedded_tokenizer, capsys, export_format):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "mxfp4")
    assert export.main([str(checkpoint), "--format", export_format, "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert export.main([str(tmp_path / "exported"), "--format", "gguf", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is already an export ({export_format}); export takes a student checkpoint" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "again").exists()


def test_out_holding_the_checkpoint_is_refused_even_with_overwrite(tmp_path, embedded_tokenizer, capsys):
    checkpoint = make_student(tmp_path / "run" / "checkpoint-1", embedded_tokenizer, "llama", "mxfp4")
    assert export.main([str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "holds the checkpoint being exported" in capsys.readouterr().err
    assert (checkpoint / "model.safetensors").exists()


# ---------------------------------------------------------------- what vLLM reads
# vLLM cannot run here; these are the conditions its compressed-tensors loader sets, read from
# its source (vllm/model_executor/layers/quantization/compressed_tensors/): from_config and
# _quantization_scheme_map_from_config parse the config, get_scheme_dict matches a layer
# (utils.should_ignore_layer, find_matched_target), _get_scheme_from_parts picks the scheme,
# whose create_weights names the tensors its loader fills. An MXFP4 student must land in
# CompressedTensorsW4A16Mxfp4, an int4_sym one in CompressedTensorsWNA16, an NVFP4 one in
# CompressedTensorsW4A16Fp4 (_is_fp4a16_nvfp4, tried before any format rule) or, W4A4, in
# CompressedTensorsW4A4Fp4 (_is_fp4a4_nvfp4; nvfp4-pack-quantized is an activation format).
# The NVFP4 schemes register one weight_global_scale (and input_global_scale) per shard of a
# fused layer, then keep 1 / the largest (process_weights_after_loading: compressed-tensors
# stores the divisor): the shards' block scales are only right under their own, so they must
# be equal. The W4A4 scheme warns where they are not ("the global scale for input or weight
# are different for parallel layers"); the W4A16 one takes the largest silently.

# packed_modules_mapping of vLLM's Llama and Qwen3: these shards are one layer there
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# is_activation_quantization_format: with these, vLLM wants input_activations or FP8 weights
VLLM_ACTIVATION_FORMATS = {"naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized"}
# QuantizationArgs of compressed-tensors 0.13.0 (vLLM's pin once it has the MXFP4 scheme) forbids other keys
CT_0_13_WEIGHT_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                       "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
WNA16_GROUP_SIZES = {32, 64, 128}  # MARLIN_SUPPORTED_GROUP_SIZES less -1 (channel-wise); Machete takes 128


def vllm_refusals(config: dict, tensors: dict, linears: dict[str, tuple[int, int]], quant_type: str,
                  act_quant: bool = False) -> list[str]:
    """Why vLLM would not serve this export with the W4A16 scheme of ``quant_type`` (``act_quant``:
    NVFP4's W4A4 one), or would serve it wrong, one reason a line (none: it serves it as
    stored). ``linears``: (out, in) features of the model's linear layers by name."""
    reasons = []
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        reasons.append(f"quant_method {q.get('quant_method')!r}")
    if "config_groups" not in q:  # from_config indexes it
        reasons.append("no config_groups")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):  # acted on when set
        if q.get(key):
            reasons.append(f"{key} is set")
    if quant_type == "mxfp4" and str(config.get("dtype", config.get("torch_dtype"))) == "float16":
        reasons.append("config dtype float16: dtype auto would run MXFP4 Marlin in float16")
    rope = config.get("rope_parameters")  # transformers 5's; vLLM's pins allow transformers 4, which reads:
    if isinstance(rope, dict) and "rope_theta" in rope:
        if config.get("rope_theta") != rope["rope_theta"]:
            reasons.append(f"rope_theta {config.get('rope_theta')}: transformers 4 takes its default rotary base")
        if rope.get("rope_type", "default") != "default" and (config.get("rope_scaling") or {}).get("rope_type") \
                != rope["rope_type"]:
            reasons.append(f"rope_scaling {config.get('rope_scaling')}: transformers 4 does not scale the rotary base")
    expected_format = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized",
                       "int4_sym": "pack-quantized"}[quant_type]
    group_of, ignore = {}, q.get("ignore") or []
    for key, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        fmt = group.get("format") or q.get("format")  # get_scheme_dict falls back to the global format
        if fmt != expected_format or (fmt in VLLM_ACTIVATION_FORMATS and quant_type != "nvfp4"):
            reasons.append(f"{key}: format {fmt!r}")
        inputs = group.get("input_activations") or {}
        if group.get("output_activations") or (inputs and not act_quant):
            reasons.append(f"{key}: not weight-only")
        if act_quant and (inputs.get("num_bits"), inputs.get("type"), inputs.get("strategy"), inputs.get("group_size"),
                          inputs.get("symmetric")) != (4, "float", "tensor_group", 16, True):  # _is_fp4a4_nvfp4
            reasons.append(f"{key}: input_activations are not NVFP4 ({inputs})")
        for kind, args in (("weights", w), ("input_activations", inputs)):
            if unknown := sorted(set(args) - CT_0_13_WEIGHT_KEYS):
                reasons.append(f"{key}: {kind} keys {unknown} unknown to compressed-tensors 0.13")
        strategy = "tensor_group" if quant_type == "nvfp4" else "group"
        if (w.get("num_bits"), w.get("strategy"), w.get("symmetric"), w.get("dynamic", False), w.get("actorder")) \
                != (4, strategy, True, False, None):
            reasons.append(f"{key}: not 4-bit static symmetric {strategy}-wise without actorder ({w})")
        if quant_type == "nvfp4" and (w.get("type"), w.get("group_size")) != ("float", 16):  # _is_fp4a16_nvfp4
            reasons.append(f"{key}: not float groups of 16 ({w.get('type')}, {w.get('group_size')})")
        if quant_type == "mxfp4" and (w.get("type"), w.get("group_size")) != ("float", 32):  # _is_mxfp4
            reasons.append(f"{key}: not float groups of 32 ({w.get('type')}, {w.get('group_size')})")
        if quant_type == "int4_sym" and (w.get("type") != "int" or w.get("group_size") not in WNA16_GROUP_SIZES):
            reasons.append(f"{key}: not int groups of {sorted(WNA16_GROUP_SIZES)} ({w.get('type')}, "
                           f"group size {w.get('group_size')})")
        for target in group.get("targets") or []:
            if target not in linears:  # matched by exact name; no patterns or class names here
                reasons.append(f"{key}: target {target!r} is not a linear layer's name")
            if target in group_of:
                reasons.append(f"{target} is in two config groups")
            group_of[target] = key
    for name in ignore:
        if name not in linears:
            reasons.append(f"ignore {name!r} is not a linear layer's name")
    for name in linears:
        if name not in group_of and name not in ignore:
            reasons.append(f"{name} is neither targeted nor ignored")
        if name in group_of and name in ignore:
            reasons.append(f"{name} is targeted and ignored")
        prefix, _, proj = name.rpartition(".")
        for fused, shards in VLLM_FUSED.items():
            # should_ignore_layer refuses shards ignored apart; find_matched_target needs every
            # shard matched and gives the fused layer the first shard's scheme
            if proj == shards[0] and len({group_of.get(f"{prefix}.{s}") for s in shards}) > 1:
                reasons.append(f"{prefix}.{fused}: its shards are not in one config group")
            for part in ("weight_global_scale", "input_global_scale") if proj == shards[0] else ():
                values = {tensors[f"{prefix}.{s}.{part}"].item() for s in shards if f"{prefix}.{s}.{part}" in tensors}
                if len(values) > 1:  # NVFP4: one per fused layer, the largest taken
                    reasons.append(f"{prefix}.{fused}: its shards' {part} differ ({sorted(values)}); vLLM keeps "
                                   f"the largest")
    for name, key in group_of.items():  # what the scheme's create_weights registers, and only that
        if name not in linears:
            continue
        out_features, in_features = linears[name]
        group_size = q["config_groups"][key]["weights"].get("group_size") or 1
        if quant_type == "mxfp4":
            expected = {"weight_packed": (torch.uint8, (out_features, in_features // 2)),
                        "weight_scale": (torch.uint8, (out_features, in_features // 32))}
        elif quant_type == "nvfp4":
            expected = {"weight_packed": (torch.uint8, (out_features, in_features // 2)),
                        "weight_scale": (torch.float8_e4m3fn, (out_features, in_features // 16)),
                        "weight_global_scale": (torch.float32, (1,))}
            if act_quant:
                expected["input_global_scale"] = (torch.float32, (1,))
        else:
            expected = {"weight_packed": (torch.int32, (out_features, in_features // 8)),
                        "weight_scale": (None, (out_features, in_features // group_size)),
                        "weight_shape": (torch.int64, (2,))}
        found = {k.removeprefix(name + "."): t for k, t in tensors.items()
                 if k.startswith(name + ".") and k != f"{name}.bias"}
        if set(found) != set(expected):
            reasons.append(f"{name}: tensors {sorted(found)}, vLLM registers {sorted(expected)}")
            continue
        for part, (dtype, shape) in expected.items():
            t = found[part]
            dtype_ok = t.dtype == dtype if dtype is not None else t.is_floating_point()  # None: float, cast on load
            if not dtype_ok or tuple(t.shape) != shape:
                reasons.append(f"{name}.{part}: {t.dtype} {tuple(t.shape)}, vLLM's parameter is {dtype} {shape}")
        if quant_type == "int4_sym" and found["weight_shape"].tolist() != [out_features, in_features]:
            reasons.append(f"{name}.weight_shape is {found['weight_shape'].tolist()}")
        for part in ("weight_global_scale", "input_global_scale"):  # divisors: 1 / the tensor scale
            if part in found and not bool((found[part] > 0).all() and torch.isfinite(found[part]).all()):
                reasons.append(f"{name}.{part} is {found[part].tolist()}, not a positive finite divisor")
    return reasons


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def vllm_nvfp4_weight(tensors: dict, name: str) -> torch.Tensor:
    """The float32 weight of the vLLM layer holding linear layer ``name`` (the fused layer of
    its shards, ``VLLM_FUSED``), as its NVFP4 schemes build it: the shards' packed codes and
    E4M3 block scales stacked in shard order, one global scale, 1 / the largest stored
    weight_global_scale; codes two per byte, the first in the low nibble, E2M1 with the sign
    in bit 3 (nvfp4_emulation_utils.dequantize_to_dtype, which Marlin's repacking agrees with)."""
    prefix, _, proj = name.rpartition(".")
    shards = next((shards for shards in VLLM_FUSED.values() if proj in shards), (proj,))
    parts = {part: [tensors[f"{prefix}.{s}.{part}"] for s in shards]
             for part in ("weight_packed", "weight_scale", "weight_global_scale")}
    packed, scale = torch.cat(parts["weight_packed"]), torch.cat(parts["weight_scale"]).float()
    global_scale = 1 / torch.cat([g.reshape(1) for g in parts["weight_global_scale"]]).max()
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    values = torch.where(nibbles >= 8, -1.0, 1.0) * E2M1[(nibbles & 7).long()]
    return (values.reshape(*scale.shape, 16) * (scale * global_scale).unsqueeze(-1)).flatten(-2)


def exported_for_vllm(tmp_path: Path, tokenizer, arch: str, quant_type: str, checkpoint: Path | None = None,
                      **overrides):
    """(config, tensors, (out, in) of every linear layer by name) of the export of ``checkpoint``,
    or of a new tiny student."""
    from safetensors.torch import load_file

    checkpoint = checkpoint or make_student(tmp_path / "student", tokenizer, arch, quant_type, **overrides)
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    linears = {name: (m.out_features, m.in_features) for name, m in student_of(checkpoint).named_modules()
               if isinstance(m, torch.nn.Linear)}
    return json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors"), linears


@pytest.mark.parametrize("arch, quant_type, overrides", [
    ("llama", "mxfp4", {}),
    ("qwen3", "mxfp4", {}),
    ("llama", "nvfp4", {}),
    ("qwen3", "nvfp4", {"act_quant": True}),
    ("llama", "int4_sym", {"intermediate_size": 384}),  # layers of groups 64 and 128 in one config group
    # groups of 256, which vLLM's W4A16 kernels do not take, stored as groups of 128
    ("qwen3", "int4_sym", {"group_size": 256, "hidden_size": 256, "head_dim": 64, "intermediate_size": 512}),
])
def test_compressed_tensors_config_is_what_vllm_schemes_accept(tmp_path, embedded_tokenizer, arch, quant_type,
                                                               overrides):
    config, tensors, linears = exported_for_vllm(tmp_path, embedded_tokenizer, arch, quant_type, **overrides)
    assert vllm_refusals(config, tensors, linears, quant_type, overrides.get("act_quant", False)) == []
    assert config["quantization_config"]["ignore"] == ["lm_head"]


@pytest.mark.parametrize("act_quant", [False, True])
def test_vllm_builds_each_fused_nvfp4_layer_from_one_global_scale_into_the_students_weights(
        tmp_path, embedded_tokenizer, act_quant):
    # fused layers whose own tensor scales are 8 to 64 times apart, visible in their weights
    from test_nvfp4 import group_quantized, spread_fused_amaxes

    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "nvfp4", act_quant=act_quant)
    spread_fused_amaxes(student_of(checkpoint)).save_pretrained(checkpoint)
    config, tensors, linears = exported_for_vllm(tmp_path, embedded_tokenizer, "llama", "nvfp4", checkpoint=checkpoint)
    assert vllm_refusals(config, tensors, linears, "nvfp4", act_quant) == []
    student = student_of(checkpoint)
    under_group_scale = group_quantized(student)  # asserts every layer but a group's largest has a scale of its own
    grouped = {name: group for group in student.quant_settings.tensor_scale_groups for name in group}
    for name, layer in export.quantized_layers(student):
        shards = grouped.get(name, [name])
        if name != shards[0]:
            continue
        weight = torch.cat([student.get_submodule(shard).quantized_weight() for shard in shards])
        assert torch.equal(vllm_nvfp4_weight(tensors, name), weight), name
        if len(shards) > 1:
            assert torch.equal(weight, torch.cat([under_group_scale[shard] for shard in shards]))


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 100000.0},  # SmolLM2's base
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256}])
def test_the_rotary_settings_are_where_transformers_4_reads_them(tmp_path, embedded_tokenizer, rope):
    config, tensors, linears = exported_for_vllm(tmp_path, embedded_tokenizer, "llama", "mxfp4",
                                                 rope_parameters=dict(rope))
    assert config["rope_parameters"] == rope and config["rope_theta"] == rope["rope_theta"]
    assert config.get("rope_scaling") == (None if rope["rope_type"] == "default" else
                                          {k: v for k, v in rope.items() if k != "rope_theta"})
    assert vllm_refusals(config, tensors, linears, "mxfp4") == []
    student = student_of(tmp_path / "student")
    assert_loads_as_the_student(tmp_path / "export", student, "mxfp4", "floor", len(embedded_tokenizer))


def test_a_group_of_256_exports_as_groups_of_128_exactly(tmp_path, embedded_tokenizer):
    checkpoint = make_student(tmp_path / "student", embedded_tokenizer, "llama", "int4_sym", group_size=256,
                              hidden_size=256, head_dim=64, intermediate_size=512)
    student = student_of(checkpoint)
    assert {layer.group_size for _, layer in export.quantized_layers(student)} == {256}
    out = tmp_path / "export"
    assert export.main([str(checkpoint), "--format", "compressed-tensors", "--out", str(out)]) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [group["weights"]["group_size"] for group in groups.values()] == [128]
    assert_loads_as_the_student(out, student, "int4_sym", "floor", len(embedded_tokenizer))


@pytest.fixture(scope="module")
def vllm_exports(tmp_path_factory, embedded_tokenizer):
    """Exports by kind: a quant type, "W4A4" after it where the inputs are quantized too."""
    kinds = ("mxfp4", "int4_sym", "nvfp4 W4A4")
    return {kind: exported_for_vllm(tmp_path_factory.mktemp(kind.replace(" ", "_")), embedded_tokenizer, "llama",
                                    kind.split()[0], act_quant=kind.endswith("W4A4")) for kind in kinds}


def refusals_of(kind: str, config: dict, tensors: dict, linears: dict) -> list[str]:
    return vllm_refusals(config, tensors, linears, kind.split()[0], kind.endswith("W4A4"))


def _q(config):
    return config["quantization_config"]


def _weights(config):
    return _q(config)["config_groups"]["group_0"]["weights"]


def _inputs(config):
    return _q(config)["config_groups"]["group_0"]["input_activations"]


def _split_qkv(config):  # k_proj in a config group of its own, the same scheme
    group = _q(config)["config_groups"]["group_0"]
    group["targets"].remove("model.layers.0.self_attn.k_proj")
    _q(config)["config_groups"]["group_1"] = {**group, "targets": ["model.layers.0.self_attn.k_proj"]}


def _ignore_k(config):
    _q(config)["config_groups"]["group_0"]["targets"].remove("model.layers.0.self_attn.k_proj")
    _q(config)["ignore"].append("model.layers.0.self_attn.k_proj")


@pytest.mark.parametrize("quant_type, breaks, reason", [
    ("mxfp4", _split_qkv, "model.layers.0.self_attn.qkv_proj: its shards are not in one config group"),
    ("int4_sym", _ignore_k, "model.layers.0.self_attn.qkv_proj: its shards are not in one config group"),
    ("mxfp4", lambda c: _q(c)["config_groups"]["group_0"]["targets"].append("re:.*up_proj"), "not a linear layer"),
    ("mxfp4", lambda c: _q(c)["config_groups"]["group_0"]["targets"].remove("model.layers.1.mlp.down_proj"),
     "model.layers.1.mlp.down_proj is neither targeted nor ignored"),
    ("mxfp4", lambda c: _q(c)["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     "not weight-only"),
    ("mxfp4", lambda c: _weights(c).update(group_size=16), "not float groups of 32"),
    ("int4_sym", lambda c: _weights(c).update(group_size=256), "group size 256"),
    ("int4_sym", lambda c: _weights(c).update(symmetric=False), "symmetric"),
    ("int4_sym", lambda c: _weights(c).update(actorder="group"), "actorder"),
    ("int4_sym", lambda c: _q(c).update(format="int-quantized"), "format 'int-quantized'"),
    ("mxfp4", lambda c: _weights(c).update(scale_format="e8m0"), "unknown to compressed-tensors 0.13"),
    ("mxfp4", lambda c: _q(c).update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme is set"),
    ("mxfp4", lambda c: _q(c).pop("config_groups"), "no config_groups"),
    ("mxfp4", lambda c: c.pop("rope_theta"), "transformers 4 takes its default rotary base"),
    ("mxfp4", lambda c: c.update(dtype="float16"), "config dtype float16"),
    ("nvfp4 W4A4", lambda c: _weights(c).update(group_size=32), "not float groups of 16"),
    ("nvfp4 W4A4", lambda c: _weights(c).update(strategy="group"), "not 4-bit static symmetric tensor_group-wise"),
    ("nvfp4 W4A4", lambda c: _inputs(c).update(strategy="token"), "input_activations are not NVFP4"),
    ("nvfp4 W4A4", lambda c: _inputs(c).update(scale_format="e4m3"), "input_activations keys ['scale_format']"),
    ("nvfp4 W4A4", lambda c: _q(c).update(format="mxfp4-pack-quantized"), "format 'mxfp4-pack-quantized'"),
])
def test_the_vllm_conditions_catch_what_vllm_refuses(vllm_exports, quant_type, breaks, reason):
    import copy

    config, tensors, linears = vllm_exports[quant_type]
    config = copy.deepcopy(config)
    breaks(config)
    assert any(reason in line for line in refusals_of(quant_type, config, tensors, linears))


@pytest.mark.parametrize("quant_type, breaks, reason", [
    ("mxfp4", lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                                  t["model.layers.0.mlp.up_proj.weight_scale"].float()}), "torch.float32"),
    ("int4_sym", lambda t: t.pop("model.layers.0.mlp.up_proj.weight_shape"), "vLLM registers"),
    ("mxfp4", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)}), "vLLM registers"),
    ("nvfp4 W4A4", lambda t: t.update({"model.layers.1.mlp.up_proj.weight_scale":
                                       t["model.layers.1.mlp.up_proj.weight_scale"].float()}), "torch.float32"),
    ("nvfp4 W4A4", lambda t: t.pop("model.layers.0.self_attn.o_proj.input_global_scale"), "vLLM registers"),
    ("nvfp4 W4A4", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_global_scale":
                                       t["model.layers.0.self_attn.k_proj.weight_global_scale"] * 2}),
     "model.layers.0.self_attn.qkv_proj: its shards' weight_global_scale differ"),
    ("nvfp4 W4A4", lambda t: t.update({"model.layers.1.mlp.up_proj.input_global_scale":
                                       t["model.layers.1.mlp.up_proj.input_global_scale"] / 2}),
     "model.layers.1.mlp.gate_up_proj: its shards' input_global_scale differ"),
    ("nvfp4 W4A4", lambda t: t.update({"model.layers.0.mlp.down_proj.weight_global_scale": torch.zeros(1)}),
     "not a positive finite divisor"),
])
def test_the_vllm_conditions_catch_tensors_vllm_cannot_load(vllm_exports, quant_type, breaks, reason):
    config, tensors, linears = vllm_exports[quant_type]
    tensors = dict(tensors)
    breaks(tensors)
    assert any(reason in line for line in refusals_of(quant_type, config, tensors, linears))


@pytest.mark.slow
def test_the_embedded_model_exports_to_both_formats_with_its_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from models import load_model

    teacher, tokenizer = load_model(None)
    student = evaluation.ptq_baseline(teacher, {"quant_type": "mxfp4"})
    del teacher
    checkpoint = tmp_path / "checkpoint-0"
    student.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "run_config.json").write_text(json.dumps({"model": None}))  # the embedded teacher
    ids = prompts(len(tokenizer), seed=1)[:2, :16]
    for export_format in export.FORMATS:
        out = tmp_path / export_format
        assert export.main([str(checkpoint), "--format", export_format, "--out", str(out)]) == 0
        if export_format == "gguf":
            import gguf

            layers = dict(export.quantized_layers(student))
            names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, student.config.num_hidden_layers)
            reader = gguf.GGUFReader(out / export.GGUF_FILE)
            blocks = {t.name: t for t in reader.tensors}
            for name in ("model.layers.0.mlp.down_proj", "model.layers.29.self_attn.v_proj"):
                tensor = blocks[names.get_name(name + ".weight", try_suffixes=(".weight",))]
                assert np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                      fake_quantize(layers[name].weight.detach(), "mxfp4").numpy())
            loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=export.GGUF_FILE, dtype=torch.float32)
        else:
            loaded = load_compressed(out, dequantize=True)
        assert_same_logits(student, loaded.eval(), ids)
        del loaded
    assert isinstance(student.model.layers[0].mlp.up_proj, FakeQuantLinear)
