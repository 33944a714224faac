"""The GGUF export in llama.cpp itself (engines.py): the student's function, a Qwen3-shaped
vocabulary, Llama 3's rotary scaling. llama.cpp is built into llamacpp/ on first use
(minutes; uv caches the wheel); the llama.cpp tests skip where it cannot build, or with
QAKD_LLAMACPP=skip."""

import copy
import os

import numpy as np
import pytest
import torch

from engines import build_llama_cpp, kl_per_token, llama_cpp_python, llama_cpp_score
from errors import BadInput
from export import write_gguf
from quant import quantize_model

from conftest import tiny_model


@pytest.fixture(scope="session")
def llama_cpp():
    if os.environ.get("QAKD_LLAMACPP") == "skip":
        pytest.skip("QAKD_LLAMACPP=skip")
    if llama_cpp_python() is None:
        python, why = build_llama_cpp()
        if python is None:
            pytest.skip(f"llama.cpp did not build here: {why}")
    return llama_cpp_python()


@pytest.fixture
def tokenizer(embedded_tokenizer):
    return copy.deepcopy(embedded_tokenizer)


def student_of(teacher, scale_rule="mse"):
    student = copy.deepcopy(teacher)
    quantize_model(student, "mxfp4", scale_rule=scale_rule)
    return student


def gguf_of(student, tokenizer, out):
    out.mkdir()
    write_gguf(student, tokenizer, student.quant_settings.to_dict(), {}, out)
    return out / "model.gguf"


def log_probs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.double(), -1).numpy()


def token_ids(vocab, rows=2, length=48, seed=0):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def mean_kl(reference, others):
    return float(np.mean([kl_per_token(r, o).mean() for r, o in zip(reference, others)]))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_cpp_computes_the_students_4_bit_function(llama_cpp, tmp_path, tokenizer, arch):
    """llama.cpp rounds activations for its MXFP4 dot products, so not bit for bit: its
    distribution must sit far closer to the student's than the nearest other 4-bit student
    (the same weights rounded with the floor exponent rule) does."""
    teacher = tiny_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         max_position_embeddings=256, initializer_range=0.2)
    student = student_of(teacher)
    ids = token_ids(len(tokenizer))
    ours = log_probs(student, ids)
    scored = llama_cpp_score(gguf_of(student, tokenizer, tmp_path / "gguf"), ids.tolist())
    assert scored["vocab"] == len(tokenizer)
    neighbour = mean_kl(ours, log_probs(student_of(teacher, "floor"), ids))
    assert mean_kl(ours, scored["logprobs"]) < neighbour / 20


def qwen3_shaped(tokenizer):
    """The embedded tokenizer grown as Qwen3's is: unmarked added tokens (<think>), a special
    one, and an embedding with more rows than tokens."""
    from transformers import AddedToken

    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.add_tokens([AddedToken("<|tool|>", special=True)], special_tokens=True)
    model = tiny_model("qwen3", vocab_size=len(tokenizer) + 13, hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256, initializer_range=0.2)
    return model, tokenizer


def test_a_vocabulary_larger_than_the_tokenizer_is_padded_and_added_tokens_typed_as_llama_cpp_types_them(
        tmp_path, tokenizer):
    import gguf

    model, tokenizer = qwen3_shaped(tokenizer)
    path = gguf_of(student_of(model), tokenizer, tmp_path / "gguf")
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == model.config.vocab_size
    think, tool = tokenizer.convert_tokens_to_ids(["<think>", "<|tool|>"])
    assert types[think] == gguf.TokenType.USER_DEFINED and tokens[think] == "<think>"
    assert types[tool] == gguf.TokenType.CONTROL
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.UNUSED and tokens[i] == f"[PAD{i}]"
               for i in range(len(tokenizer), model.config.vocab_size))
    assert types[100] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() == adds_bos
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False
    assert len(fields["tokenizer.ggml.merges"].contents()) > 1000


def test_a_qwen3_shaped_vocabulary_loads_and_runs_in_llama_cpp(llama_cpp, tmp_path, tokenizer):
    model, tokenizer = qwen3_shaped(tokenizer)
    student = student_of(model)
    ids = token_ids(len(tokenizer))
    scored = llama_cpp_score(gguf_of(student, tokenizer, tmp_path / "gguf"), ids.tolist(), texts=["<think>Hi"])
    assert scored["vocab"] == model.config.vocab_size
    assert scored["tokens"][0][0] == tokenizer.convert_tokens_to_ids("<think>")  # one token, as transformers has it
    assert scored["tokens"][0] == tokenizer("<think>Hi", add_special_tokens=False)["input_ids"]
    neighbour = mean_kl(log_probs(student, ids), log_probs(student_of(model, "floor"), ids))
    assert mean_kl(log_probs(student, ids), scored["logprobs"]) < neighbour / 20


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}


def test_llama_3_rotary_scaling_is_written_and_llama_cpp_computes_it(llama_cpp, tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256, initializer_range=0.2, rope_parameters=LLAMA3_ROPE)
    student = student_of(model)
    ids = token_ids(len(tokenizer), length=96)
    ours = log_probs(student, ids)
    plain = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256, initializer_range=0.2)
    plain.load_state_dict(model.state_dict())
    unscaled = mean_kl(ours, log_probs(student_of(plain), ids))  # what dropping the scaling would cost
    scored = llama_cpp_score(gguf_of(student, tokenizer, tmp_path / "gguf"), ids.tolist())
    assert mean_kl(ours, scored["logprobs"]) < unscaled / 20


def test_a_rotary_scaling_the_export_does_not_write_is_refused_in_one_line(tmp_path, tokenizer):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model = tiny_model("qwen3", vocab_size=len(tokenizer), rope_parameters=yarn, max_position_embeddings=256)
    with pytest.raises(BadInput, match="'yarn' rotary scaling, which the GGUF export does not write"):
        gguf_of(student_of(model), tokenizer, tmp_path / "gguf")


def test_a_tokenizer_with_more_tokens_than_the_embedding_is_refused(tmp_path, tokenizer):
    model = tiny_model("qwen3", vocab_size=len(tokenizer) - 1)
    with pytest.raises(BadInput, match="the tokenizer does not belong to this model"):
        gguf_of(student_of(model), tokenizer, tmp_path / "gguf")


def test_the_model_cards_llama_cpp_python_snippet_runs_as_written(llama_cpp, tmp_path, tokenizer):
    import subprocess

    import export

    student = student_of(tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    max_position_embeddings=256))
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "export"
    assert export.main([str(tmp_path / "student"), "--format", "gguf", "--out", str(out)]) == 0
    snippet = export.load_snippets(out, "gguf")["llama-cpp-python"]
    assert snippet.strip() in (out / "README.md").read_text()
    ran = subprocess.run([str(llama_cpp), "-c", snippet], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-500:]


def test_a_llama_3_scaled_gguf_is_refused_as_an_eval_row_and_its_card_has_no_transformers_snippet(tmp_path,
                                                                                                   tokenizer):
    import export
    from students import load_student

    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256, rope_parameters=LLAMA3_ROPE)
    student_of(model).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "export"
    assert export.main([str(tmp_path / "student"), "--format", "gguf", "--out", str(out)]) == 0
    with pytest.raises(BadInput, match="transformers' GGUF loader drops"):
        load_student(out)
    card = (out / "README.md").read_text()
    assert "gguf_file=" not in card and "from llama_cpp import Llama" in card
