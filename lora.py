"""Quantization-consistent LoRA: each adapted layer computes x @ Q(W + s * B A)^T.

The usual recipe (LoRA on a quantized base, Q(W) x + s * B A x) leaves no 4-bit model that
computes what was trained: merging gives Q(W) + s B A in full precision, and quantizing
the merge gives Q(Q(W) + s B A), another function. Here the adapters live inside the
quantizer: the straight-through gradient of Q reaches A and B, W stays frozen, and the
merged latent weight W + s * B A quantizes to exactly the weights the student trained
with. A checkpoint therefore stores the merged weights (what eval.py and export.py read)
and the adapters beside them (what a resumed run continues from).

There is no adapter dropout: a dropout on the adapter's input has no merged weight.
Initialisation as peft's default: A Kaiming-uniform (nn.Linear's), B zero, so training
starts from round-to-nearest exactly. Only the adapters train; norms and embeddings are
frozen with the base weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

ADAPTER_FILE = "adapter.safetensors"
ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    r: int
    alpha: float
    targets: tuple[str, ...] = (ALL_LINEAR,)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def _targeted(name: str, targets) -> bool:
    return ALL_LINEAR in targets or name in targets or name.rpartition(".")[2] in targets


def add_lora(model: nn.Module, settings: LoraSettings) -> int:
    """Give every fake-quantized linear layer named by ``settings.targets`` (a module name or
    its last part, as peft's ``target_modules``; ``all-linear``: all of them) a pair of
    adapters, and freeze every other parameter. Returns how many layers were adapted."""
    from quant import FakeQuantLinear

    if settings.r < 1:
        raise ValueError(f"--lora-r must be >= 1, got {settings.r}")
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, FakeQuantLinear) and _targeted(name, settings.targets)]
    if not layers:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)})
        raise ValueError(f"--lora-targets {','.join(settings.targets)} match no quantized linear layer; "
                         f"choose from {', '.join(names) or 'none (quantize the student first)'}")
    model.requires_grad_(False)
    for _, layer in layers:
        weight = layer.weight
        a = torch.empty(settings.r, layer.in_features, dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        layer.lora_A = nn.Parameter(a)
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, settings.r, dtype=weight.dtype,
                                                device=weight.device))
        layer.lora_scale = settings.scale
        layer.compose_weight = merged_weight  # what FakeQuantLinear quantizes from now on
    model.lora_settings = settings
    return len(layers)


def merged_weight(layer) -> torch.Tensor:
    """W + s * B A: the latent weight an adapted layer quantizes (W itself without adapters)."""
    if getattr(layer, "lora_A", None) is None:
        return layer.weight
    # float32 even under bf16 autocast: the merged checkpoint forms B A in float32, so training
    # must too, or the exported model computes another function than the trained one.
    with torch.autocast(layer.weight.device.type, enabled=False):
        return layer.weight + layer.lora_scale * (layer.lora_B @ layer.lora_A)


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name."""
    return {name: p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict of an adapted model with each adapted weight replaced by its merged
    weight (the same expression as the forward's, so the same float32 values) and the
    adapters left out: the plain model that computes what the adapted one does."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            layer = key[: -len(".lora_A")]
            with torch.no_grad():
                merged[f"{layer}.weight"] = (state[f"{layer}.weight"]
                                             + scale * (state[f"{layer}.lora_B"] @ state[key])).contiguous()
    return merged
