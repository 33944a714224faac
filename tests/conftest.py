import pytest
import torch


def tiny_config(arch: str, **overrides):
    """A random tiny config of a real architecture (fast path for unit tests)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  tie_word_embeddings=True)
    common.update(overrides)
    return {"llama": LlamaConfig, "qwen3": Qwen3Config}[arch](**common)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


@pytest.fixture(params=["llama", "qwen3"])
def tiny(request):
    return tiny_model(request.param)
