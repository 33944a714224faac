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
                 **overrides):
    """A saved tiny student whose latent weights have moved off the teacher's."""
    sizes = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=512)
    model = tiny_model(arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       **{**sizes, **overrides})
    quantize_model(model, quant_type, group_size, scale_rule=scale_rule)
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
        snippet = snippet.replace("torch.bfloat16", f"torch.{dtype}")
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
