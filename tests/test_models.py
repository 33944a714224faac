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
