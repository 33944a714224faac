"""Checkpoints of a training run: where they are, whether a run may go on, saving and loading.

A run directory holds ``run_config.json`` (the settings), ``metrics.jsonl`` and
``checkpoint-<step>/`` directories. Each checkpoint is the student in the Hugging Face
layout (``model.safetensors``, config with the quantization settings, tokenizer), which is
what eval.py and export.py read and the only copy of the weights, plus
``accelerate_state/`` (optimizer, scheduler, random states) and ``trainer_state.json``
(the step and that step's metrics). A checkpoint is written to a temporary directory and
renamed, so a directory named ``checkpoint-<step>`` is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from errors import BadInput

log = logging.getLogger("checkpoints")

CHECKPOINT_PREFIX = "checkpoint-"
# Settings that may change between a run and its resumption (a moved directory is the same run).
RESUMABLE_CHANGES = {"max_steps", "save_steps", "save_total_limit", "stop_after", "resume", "overwrite", "do_eval", "log_with",
                     "config", "eval_args", "eval_steps", "gradient_checkpointing", "output_dir"}


# Settings added with a default other than what runs saved before them did: such a run counts as this value.
BEFORE_THE_SETTING_EXISTED = {"gptq_actorder": False}


def config_differences(saved: dict, config) -> list[str]:
    """The settings in which ``config`` (a dataclass) differs from a saved run configuration,
    beyond those a resumed run may change; a setting added since the run was saved counts
    as what runs did before it existed (its default, or BEFORE_THE_SETTING_EXISTED)."""
    before = {**dataclasses.asdict(type(config)()), **BEFORE_THE_SETTING_EXISTED}
    return sorted(k for k, v in dataclasses.asdict(config).items()
                  if k not in RESUMABLE_CHANGES and saved.get(k, before[k]) != v)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete ``checkpoint-<step>`` directories of a run, oldest first."""
    steps = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(steps)]


def rotate(output_dir: Path, keep: int, keep_also: Path | None = None) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (and ``keep_also``, the one a
    resumed run started from); returns those removed. Each is renamed first, so a crash
    mid-removal never leaves a directory that looks like a complete checkpoint."""
    removed = []
    for checkpoint in complete_checkpoints(output_dir)[:-keep]:
        if keep_also is not None and checkpoint.resolve() == Path(keep_also).resolve():
            continue
        doomed = checkpoint.with_name(f".{checkpoint.name}.removing")
        os.replace(checkpoint, doomed)
        shutil.rmtree(doomed)
        removed.append(checkpoint)
    return removed


def checkpoint_to_resume(config) -> Path | None:
    """Refuse to clobber a run: the checkpoint ``config`` (train.py's settings) resumes from,
    if any; raises BadInput for a directory holding another run or one given neither
    --resume nor --overwrite."""
    out = Path(config.output_dir)
    saved = out / "run_config.json"
    if not out.exists() or not any(out.iterdir()):
        if config.resume:
            log.warning("--resume: %s holds no run yet, starting from scratch", out)
        return None
    if config.overwrite:
        return None
    if not config.resume:
        raise BadInput(f"output directory {out} already holds a run; pass --resume to continue it, "
                       f"--overwrite to replace it, or choose another --output_dir")
    if saved.exists():
        differ = config_differences(json.loads(saved.read_text()), config)
        if differ:
            raise BadInput(f"--resume: {out} was run with a different configuration ({', '.join(differ)}); "
                           f"use the same settings or another --output_dir")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    return checkpoint


def load_weights(model, checkpoint: Path) -> None:
    """The Hugging Face layout weights of a checkpoint (one file or shards) into ``model``,
    exactly; only weights tied to another (lm_head to the embedding) may be absent. A model
    with LoRA adapters takes the adapters alone (its frozen weights are the run's start)."""
    from safetensors.torch import load_file

    from lora import ADAPTER_FILE, adapters

    if getattr(model, "lora_settings", None) is not None:
        saved, own = load_file(checkpoint / ADAPTER_FILE), adapters(model)
        if set(saved) != set(own):
            raise BadInput(f"{checkpoint / ADAPTER_FILE}: its adapters do not fit this model")
        with torch.no_grad():
            for name, tensor in saved.items():
                own[name].copy_(tensor)
        return
    index = checkpoint / "model.safetensors.index.json"
    files = (sorted({checkpoint / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else [checkpoint / "model.safetensors"])
    state = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise BadInput(f"{checkpoint}: its weights do not fit this model (missing "
                       f"{sorted(result.missing_keys)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]})")


def keep_one_weight_copy(accelerator, student) -> None:
    """Make accelerate's state leave the student's weights out (the Hugging Face layout file
    beside it is the copy resume reads); it keeps the optimizer, scheduler and RNGs. FSDP
    keeps its own sharded copy as well."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return
    accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())

    def load_student_weights(models, directory):
        load_weights(accelerator.unwrap_model(student), Path(directory).parent)
        models.clear()

    accelerator.register_load_state_pre_hook(load_student_weights)


def save(accelerator, student, tokenizer, output_dir: Path, run_config: dict, step: int, metrics: dict) -> Path:
    """Write ``checkpoint-<step>`` atomically: built in a temporary directory, then renamed."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    staging = Path(output_dir) / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "accelerate_state"))
    # Every process: under FSDP gathering the full state dict is a collective (the main
    # process alone would wait for the others forever); elsewhere it is only a copy.
    state = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        from lora import ADAPTER_FILE, merged_state_dict

        unwrapped = accelerator.unwrap_model(student)
        lora = getattr(unwrapped, "lora_settings", None)
        if lora is not None:  # the merged student for eval.py and export.py, the adapters to resume
            save_file({k: v.contiguous() for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))},
                      staging / ADAPTER_FILE)
            state = merged_state_dict(state, lora.scale)
        unwrapped.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "run_config.json").write_text(json.dumps(run_config, indent=2))
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, checkpoint: Path) -> dict:
    """Restore the prepared student, optimizer, scheduler and random states from a
    checkpoint; returns its trainer state (the step and that step's metrics)."""
    accelerator.load_state(str(checkpoint / "accelerate_state"))
    return json.loads((checkpoint / "trainer_state.json").read_text())
