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


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, embedded_tokenizer):
    """A random tiny Llama with the embedded model's tokenizer, saved as a model directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", vocab_size=len(embedded_tokenizer), hidden_size=64, intermediate_size=128,
                       max_position_embeddings=512, eos_token_id=embedded_tokenizer.eos_token_id,
                       pad_token_id=embedded_tokenizer.pad_token_id, bos_token_id=embedded_tokenizer.bos_token_id)
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_student(tmp_path, tiny_checkpoint):
    """A student checkpoint as train.py writes it: latent weights + quantization settings."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    quantize_model(model, "int4", 32)
    path = tmp_path / "run" / "checkpoint-2"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(path)
    (path / "trainer_state.json").write_text("{}")
    (path.parent / "run_config.json").write_text(json.dumps({"model": str(tiny_checkpoint)}))
    return path


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory):
    """A small local dataset in the chat `messages` schema."""
    import json

    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    topics = ["the sea", "a cat", "rain", "numbers", "music", "trees", "a train", "snow"]
    with open(path, "w") as f:
        for i, topic in enumerate(topics * 2):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {topic} ({i})."},
                                             {"role": "assistant", "content": f"Here is a fact about {topic}."}]})
                    + "\n")
    return path


def assert_rebuilt_from_its_config(model, path, ids):
    """Saved and reloaded, the student rebuilt from the settings in its config computes the
    same logits; returns the reloaded model."""
    from transformers import AutoModelForCausalLM

    from quant import quantize_model_from_settings

    expected = model(ids).logits
    model.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert quantize_model_from_settings(reloaded, reloaded.config.fake_quant) == 14
    assert torch.equal(reloaded(ids).logits, expected)
    return reloaded
