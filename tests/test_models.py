"""models.py: the embedded default loads offline from the wheel; paths and hub ids resolve."""

import pytest
import torch

import models


def test_embedded_model_loads_offline_from_the_wheel_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QAKD_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = models.load_model()  # converts the GGUF once
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert (tmp_path / models.EMBEDDED_MODEL / "model.safetensors").exists()
    again, _ = models.load_model(models.EMBEDDED_MODEL)  # from the cache
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_local_directory_loads_and_missing_paths_are_one_line_errors(tiny_checkpoint):
    model, tokenizer = models.load_model(tiny_checkpoint)
    assert model.config.hidden_size == 64 and len(tokenizer) == model.config.vocab_size
    with pytest.raises(FileNotFoundError, match="model path './missing' does not exist"):
        models.load_model("./missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_source("weights/model.gguf")
    assert models.resolve_model_source("Qwen/Qwen3-4B-Instruct-2507") == "Qwen/Qwen3-4B-Instruct-2507"


def test_rollouts_stop_at_the_models_end_tokens_and_take_nothing_else_from_its_generation_config(
        embedded_tokenizer):
    from conftest import tiny_model

    from rollout import sampling, stop_token_ids

    model = tiny_model("llama", vocab_size=len(embedded_tokenizer))
    model.generation_config.update(eos_token_id=[7, 9], repetition_penalty=1.3, top_k=3, top_p=0.5, min_p=0.2,
                                   no_repeat_ngram_size=2, temperature=0.1, do_sample=False)
    own = model.generation_config
    assert stop_token_ids(model, embedded_tokenizer) == sorted({embedded_tokenizer.eos_token_id, 7, 9})
    with sampling(model, embedded_tokenizer, do_sample=True, temperature=0.9, max_new_tokens=5) as config:
        used, _ = model._prepare_generation_config(config)  # what generate() will run with
    assert model.generation_config is own
    assert (used.do_sample, used.temperature, used.top_k, used.top_p, used.max_new_tokens) == (True, 0.9, 0, 1.0, 5)
    assert (used.repetition_penalty, used.no_repeat_ngram_size, used.min_p) == (1.0, 0, None)
    assert sorted(used.eos_token_id) == stop_token_ids(model, embedded_tokenizer)
    assert used.pad_token_id == embedded_tokenizer.pad_token_id
