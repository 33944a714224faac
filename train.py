"""On-policy distillation of a 4-bit student from its full-precision teacher.

    uv run accelerate launch train.py --lmbda 1 --quant-type int4_sym --output_dir run
    uv run accelerate launch train.py --config configs/smollm2_mxfp4.toml --max-steps 20

Each optimizer step is on-policy with probability ``lmbda``: the student (with its
quantized weights cached, ``quant.frozen_quant``) samples completions for the batch's
prompts; otherwise the dataset's completions are used (or, with ``--seq-kd``, the
teacher's samples). Teacher and student then see the same sequences and the student
minimises the generalized JSD (``losses.py``) on the completion tokens, normalised by the
completion-token count of the whole step (all micro-batches, all processes).

Configuration: the defaults below, then ``--config FILE.toml``, then command-line flags
(dash or underscore spelling). Run ``train.py --help`` for the list.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from errors import BadInput

log = logging.getLogger("train")

MAX_NONFINITE_IN_A_ROW = 3


# Where a default was chosen by an experiment, README.md's table of train.py's flags gives
# the evidence.
@dataclass
class TrainConfig:
    model: str | None = None  # teacher weights (the student starts from them): hub id, dir, .gguf; default embedded
    student_model: str | None = None  # a different starting point for the student (same tokenizer)
    dataset: str | None = None  # hub name or local .json/.jsonl/.parquet; default: the embedded set
    dataset_split: str = "train"
    lmbda: float = 0.0  # probability that a step is on-policy (student generations)
    beta: float = 0.0  # generalized JSD interpolation: 0 forward KL, 1 reverse KL
    temperature: float = 0.9  # sampling temperature of the rollouts
    rollout_dtype: str = "float32"  # float32 | bfloat16: the quantized weights the rollouts compute with
    loss_temperature: float = 1.0  # temperature of the distributions the loss compares
    jsd_normalize: bool = False  # divide the interior JSD by beta * (1 - beta)
    seq_kd: bool = False  # off-policy steps use teacher samples instead of dataset completions
    quant_type: str = "mxfp4"  # mxfp4 | nvfp4 | int4 | int4_sym | none
    group_size: int | None = None  # int4: default 128 where it divides, else 64 or 32
    scale_rule: str | None = None  # mxfp4: floor (OCP spec) | rceil (NVIDIA) | mse (least-error exponent per
    # block; the default for mxfp4); INT4 and NVFP4 have no scale rule (floor is recorded)
    act_quant: bool = False  # W4A4 (mxfp4, nvfp4): every quantized layer's input fake-quantized too, per token
    init: str = "rtn"  # the student's start: rtn (round-to-nearest) | gptq (GPTQ onto the same grids, gptq.py)
    init_samples: int = 512  # --init gptq: calibration sequences from --dataset (prompt + completion)
    gptq_latent: str = "values"  # --init gptq: latent weights at GPTQ's values | unrounded (just before rounding)
    gptq_actorder: bool = True  # --init gptq: columns by decreasing Hessian diagonal, grids fixed first (off: natural order)
    learn_scales: bool = False  # int4 / int4_sym: train each group's scale (LSQ), initialised from the start
    learning_rate: float = 1e-4  # the Qwen3-4B presets set their own
    quantized_lr: float | None = None  # the quantized layers' parameters (latent weights, learned scales) at their
    # own peak rate; the rest (norms, embedding, head, biases) at learning_rate. None: all at learning_rate
    freeze_quantized: bool = False  # the quantized layers keep the start's 4-bit weights (GPTQ's or round-to-nearest's),
    # quantized once; only the unquantized parameters train (norms, embedding, head, biases)
    max_steps: int = 100  # 0: only the start, saved as checkpoint-0 (e.g. the GPTQ model, to evaluate or export)
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    max_new_tokens: int = 128
    group_by_length: bool = False  # each step's examples of similar length (less padding; the same examples)
    min_completion_tokens: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 42
    output_dir: str | None = None  # default: dump/<quant>_lmbda<l>_beta<b>_lr<lr>
    save_steps: int = 0  # checkpoint every N steps (0: only at the end)
    save_total_limit: int = 0  # keep the last N checkpoints (and the one resumed from); 0: keep all
    stop_after: int = 0  # run at most N steps in this invocation, then checkpoint (0: no limit)
    resume: bool = False
    overwrite: bool = False
    eval_steps: int = 0  # held-out KL(teacher || student) at step 0 and every N steps (0: off)
    eval_dataset: str | None = None  # for --eval-steps; default: the embedded held-out set
    eval_dataset_split: str = "test"
    do_eval: bool = False
    eval_args: str = ""  # extra eval.py flags for --do-eval, e.g. "--limit 100 --tasks arc_easy"
    teacher_dtype: str = "float32"
    mixed_precision: str = "no"  # no | bf16: the student computes in bf16 (weights, optimizer stay float32)
    gradient_checkpointing: bool = False  # student: recompute activations in the backward (same gradients)
    lora_r: int = 0  # > 0: train rank-r adapters inside the quantizer, Q(W + alpha/r * B A), W frozen (lora.py)
    lora_alpha: float | None = None  # default: r (scale 1)
    lora_dropout: float = 0.0  # only 0: a dropout on the adapter's input has no merged 4-bit weight
    lora_targets: str = "all-linear"  # comma-separated module names or their last parts (q_proj,v_proj)
    log_with: str = "none"  # none | tensorboard | wandb
    fused_loss: bool = True  # never materialise [tokens, vocab] logits when the model allows
    loss_chunk_size: int = 0  # tokens per loss chunk; 0: about 32 MiB per [chunk, vocab] tensor
    config: str | None = None


QUANT_CHOICES = ("mxfp4", "nvfp4", "int4", "int4_sym", "none")
INIT_CHOICES = ("rtn", "gptq")
GPTQ_LATENT_CHOICES = ("values", "unrounded")
CHOICES = {"quant_type": QUANT_CHOICES, "init": INIT_CHOICES, "gptq_latent": GPTQ_LATENT_CHOICES}
ALIASES = {"learning_rate": ["--lr"], "per_device_train_batch_size": ["--batch-size", "--batch_size"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise BadInput(f"{message} (see train.py --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else []) + ALIASES.get(f.name, [])
        default = f.default
        if f.type in ("bool",) or isinstance(default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=f"(default: {default})")
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
        choices = CHOICES.get(f.name)
        parser.add_argument(*flags, dest=f.name, type=kind, choices=choices, help=f"(default: {default})")
    return parser


def parse_config(argv=None) -> TrainConfig:
    """Defaults, then the TOML file named by --config, then the command line."""
    cli = vars(build_parser().parse_args(argv))
    values = {}
    if cli.get("config"):
        path = Path(cli["config"])
        if not path.exists():
            raise BadInput(f"config file {path} does not exist")
        try:
            with open(path, "rb") as f:
                values = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"config file {path} is not valid TOML ({e})") from None
        unknown = set(values) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise BadInput(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        values = {k: _typed(path, k, v) for k, v in values.items()}
    values.update(cli)
    config = TrainConfig(**values)
    validate(config)
    if config.scale_rule is None:
        config.scale_rule = "mse" if config.quant_type == "mxfp4" else "floor"
    return config


_TOML_KINDS = {"bool": (bool, "true or false"), "int": (int, "an integer"), "float": (float, "a number"),
               "str": (str, "a quoted string")}


def _typed(path: Path, key: str, value):
    """A TOML value as the field's type (an integer where a float is expected is fine), or an
    BadInput naming the key: the command line's parser checks flags, nothing checks a file."""
    kind, meaning = _TOML_KINDS[TrainConfig.__dataclass_fields__[key].type.removesuffix(" | None")]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise BadInput(f"{path}: {key} must be {meaning}, got {value!r}")
    return float(value) if kind is float else value


def validate(c: TrainConfig) -> None:
    from quant import ACT_QUANT_TYPES, SCALE_RULES

    for f in fields(TrainConfig):  # nan passes every comparison below, inf most: refuse both first
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("lmbda", "beta"):
        value = getattr(c, name)
        if not 0.0 <= value <= 1.0:
            raise BadInput(f"--{name} must be in [0, 1], got {value}")
    for name, allowed in CHOICES.items():  # a TOML file bypasses argparse's choices
        if getattr(c, name) not in allowed:
            raise BadInput(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}")
    if c.scale_rule is not None and c.scale_rule not in SCALE_RULES:
        raise BadInput(f"--scale-rule must be one of {', '.join(SCALE_RULES)}, got {c.scale_rule!r}")
    if c.scale_rule not in (None, "floor") and c.quant_type != "mxfp4":
        raise BadInput(f"--scale-rule {c.scale_rule} chooses MXFP4 block exponents; {c.quant_type} has no such "
                       f"choice (drop the flag)")
    if c.quantized_lr is not None and c.quant_type == "none":
        raise BadInput("--quantized-lr sets the quantized layers' rate; --quant-type none has none (drop the flag)")
    positive = ["temperature", "loss_temperature", "learning_rate"]
    positive += ["quantized_lr"] if c.quantized_lr is not None else []
    for name in positive:
        if not getattr(c, name) > 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(c, name)}")
    if c.resume and c.overwrite:
        raise BadInput("--resume continues the run in --output_dir and --overwrite deletes it: pass one of them")
    for name in ("save_steps", "save_total_limit", "stop_after", "eval_steps"):
        if getattr(c, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    if c.max_steps < 0:
        raise BadInput(f"--max-steps must be >= 0 (0: save the start as checkpoint-0), got {c.max_steps}")
    if c.init == "gptq" and c.quant_type == "none":
        raise BadInput("--init gptq quantizes the student's start; it needs a --quant-type other than none")
    if c.init == "gptq" and c.quant_type == "nvfp4" and (c.gptq_latent != "values" or not c.gptq_actorder):
        raise BadInput("--init gptq with nvfp4 fixes its grids (the tensor scale) before GPTQ: it runs in activation "
                       "order with the latent at GPTQ's values; drop --no-gptq-actorder and --gptq-latent unrounded")
    if c.act_quant and c.learn_scales:
        raise BadInput("--act-quant with --learn-scales: activations are quantized in MXFP4 and NVFP4, learned scales "
                       "are INT4's; use one of them")
    if c.act_quant and c.quant_type not in ACT_QUANT_TYPES:
        raise BadInput(f"--act-quant quantizes activations in the weights' format, {' or '.join(ACT_QUANT_TYPES)}; "
                       f"--quant-type {c.quant_type} has no 4-bit activation format (use mxfp4 or nvfp4)")
    if c.learn_scales and c.quant_type not in ("int4", "int4_sym"):
        raise BadInput(f"--learn-scales trains INT4 group scales; {c.quant_type} has none to learn (MXFP4 and NVFP4 "
                       f"scales are re-chosen from the weights at every step)")
    if c.freeze_quantized and c.quant_type == "none":
        raise BadInput("--freeze-quantized keeps the quantized layers as they start; --quant-type none has none "
                       "(drop the flag)")
    for flag, on in (("--lora-r", c.lora_r), ("--learn-scales", c.learn_scales),
                     ("--quantized-lr", c.quantized_lr is not None)):
        if c.freeze_quantized and on:
            raise BadInput(f"--freeze-quantized keeps the quantized layers as they start; {flag} trains them: "
                           f"use one of the two")
    if c.quantized_lr is not None and c.lora_r:
        raise BadInput("--quantized-lr with --lora-r: only the adapters train, all at one rate; set it with "
                       "--learning-rate")
    if c.learn_scales and c.lora_r:
        raise BadInput("--learn-scales with --lora-r: the adapters' checkpoints would not hold the learned scales; "
                       "use one of them")
    if c.init != "gptq" and (c.gptq_latent != "values" or not c.gptq_actorder):
        raise BadInput("--gptq-latent and --no-gptq-actorder shape a GPTQ start: pass them with --init gptq")
    if c.init_samples < 1:
        raise BadInput(f"--init-samples must be >= 1, got {c.init_samples}")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "max_new_tokens", "min_completion_tokens"):
        if getattr(c, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.teacher_dtype not in ("float32", "bfloat16", "float16"):
        raise BadInput(f"--teacher-dtype must be float32, bfloat16 or float16, got {c.teacher_dtype!r}")
    if c.rollout_dtype not in ("float32", "bfloat16"):
        raise BadInput(f"--rollout-dtype must be float32 or bfloat16, got {c.rollout_dtype!r}")
    if c.mixed_precision not in ("no", "bf16"):
        raise BadInput(f"--mixed-precision must be no or bf16, got {c.mixed_precision!r} (fp16 cannot hold every "
                       f"MXFP4 scale, and its loss scaling is not worth it where bf16 exists)")
    if c.log_with not in ("none", "tensorboard", "wandb"):
        raise BadInput(f"--log-with must be none, tensorboard or wandb, got {c.log_with!r}")
    if c.log_with != "none" and importlib.util.find_spec(c.log_with) is None:
        raise BadInput(f"--log-with {c.log_with} needs the {c.log_with} package, which is not installed: "
                       f"uv pip install {c.log_with} (or log nothing; metrics.jsonl is always written)")
    if c.weight_decay < 0:
        raise BadInput(f"--weight-decay must be >= 0, got {c.weight_decay}")
    if c.max_grad_norm < 0:
        raise BadInput(f"--max-grad-norm must be >= 0 (0: no clipping), got {c.max_grad_norm}")
    if c.lora_r < 0:
        raise BadInput(f"--lora-r must be >= 1 (or 0: no LoRA, all weights train), got {c.lora_r}")
    if c.lora_dropout != 0:
        raise BadInput(f"--lora-dropout must be 0, got {c.lora_dropout}: a dropout on the adapter's input has no "
                       f"merged weight, so the 4-bit model would not compute what was trained")
    if c.lora_alpha is not None and not c.lora_alpha > 0:
        raise BadInput(f"--lora-alpha must be > 0, got {c.lora_alpha}")
    if c.lora_r and c.quant_type == "none":
        raise BadInput("--lora-r adapts the fake-quantized layers; it needs a --quant-type other than none")
    if not 0 <= c.warmup_ratio < 1:
        raise BadInput(f"--warmup-ratio must be in [0, 1), got {c.warmup_ratio}")
    if c.do_eval or c.eval_args:  # now, not after hours of training
        check_eval_args(c.eval_args)


def check_eval_args(eval_args: str) -> None:
    import shlex

    import eval as evaluation

    try:
        evaluation.parse_args(["CHECKPOINT", *shlex.split(eval_args)])
    except (ValueError, FileNotFoundError) as e:  # ValueError: shlex's unclosed quote
        raise BadInput(f"--eval-args {eval_args!r}: {e}") from None


def default_output_dir(c: TrainConfig) -> str:
    return f"dump/{c.quant_type}_lmbda{c.lmbda:g}_beta{c.beta:g}_lr{c.learning_rate:g}"


def run_config_dict(c: TrainConfig) -> dict:
    return dataclasses.asdict(c)


# ---------------------------------------------------------------- models

def load_teacher_and_student(c: TrainConfig):
    """The frozen teacher, the trainable float32 student (fake-quantized), the tokenizer."""
    import copy

    from models import disable_dropout, load_model

    dtype = getattr(torch, c.teacher_dtype)
    teacher, tokenizer = load_model(c.model, dtype=dtype)
    teacher.eval().requires_grad_(False)
    disable_dropout(teacher)
    if c.student_model or dtype != torch.float32:
        student, student_tokenizer = load_model(c.student_model or c.model, dtype=torch.float32)
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise BadInput(f"teacher {c.model or 'embedded'} and student {c.student_model} use different "
                           f"tokenizers; distillation needs the same vocabulary")
    else:
        student = copy.deepcopy(teacher)
    prepare_student(student, c)
    return teacher, student, tokenizer


def prepare_student(student, c: TrainConfig) -> None:
    """In place: dropout off, gradient checkpointing, fake quantization (a saved student's own,
    or ``c``'s), LoRA adapters; trainable, in training mode."""
    from lora import LoraSettings, add_lora
    from models import disable_dropout, enable_gradient_checkpointing
    from quant import quantize_model, quantize_model_from_settings, record_settings

    disable_dropout(student)
    if c.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise BadInput(f"--gradient-checkpointing: {type(student).__name__} does not support gradient "
                           f"checkpointing")
        enable_gradient_checkpointing(student)
    student.requires_grad_(True).train()
    saved_settings = getattr(student.config, "fake_quant", None)
    if saved_settings:  # a saved student: rebuild exactly the quantization it was trained with
        if c.act_quant and not saved_settings.get("act_quant"):  # a W4A16 student goes on as W4A4
            saved_settings = {**saved_settings, "act_quant": True}
        if saved_settings.get("act_quant") and not c.act_quant:
            raise BadInput(f"{c.student_model or c.model} is a W4A4 student (its inputs quantized too): pass "
                           f"--act-quant to go on training it, or start from its full-precision teacher")
        quantize_model_from_settings(student, saved_settings)
        if saved_settings.get("learn_scales"):  # not weights to transformers: loaded here
            from checkpoints import load_weights
            from models import resolve_model_source

            source = Path(resolve_model_source(c.student_model or c.model))
            if not (source / "model.safetensors").exists():
                raise BadInput(f"{source}: a student with learned scales starts only from a checkpoint directory "
                               f"saved by train.py (checkpoint-N)")
            if c.init == "gptq":
                raise BadInput("--init gptq would move the latent weights under this student's saved learned scales; "
                               "start GPTQ from the full-precision model instead")
            load_weights(student, source)
        log.info("student keeps its saved quantization (%s)", saved_settings["quant_type"])
    elif c.quant_type != "none":
        count = quantize_model(student, c.quant_type, c.group_size, scale_rule=c.scale_rule, act_quant=c.act_quant)
        log.info("student: %d linear layers fake-quantized to %s%s", count, c.quant_type,
                 ", their inputs too (W4A4)" if c.act_quant else "")
    if c.lora_r:
        settings = LoraSettings(c.lora_r, c.lora_alpha or c.lora_r, tuple(t.strip() for t in c.lora_targets.split(",")))
        try:
            count = add_lora(student, settings)
        except ValueError as e:
            raise BadInput(str(e)) from None
        record_settings(student, dataclasses.replace(student.quant_settings, lora=settings.to_dict()))
        log.info("student: rank-%d adapters in %d layers (scale %g), every other weight frozen", settings.r, count,
                 settings.scale)
    if c.freeze_quantized:
        from quant import FakeQuantLinear

        layers = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
        for layer in layers:  # the weight and a saved student's learned scales: what the 4-bit weight is made of
            for name, parameter in layer.named_parameters(recurse=False):
                parameter.requires_grad_(name == "bias")
        log.info("student: %d quantized layers frozen at their start; the norms, embedding, head and biases train",
                 len(layers))


GPTQ_BATCH_SIZE = 8  # calibration sequences per forward


def parameter_groups(student, c: TrainConfig) -> list[dict]:
    """AdamW's groups: weight decay on matrices only (not on learned scales); with
    --quantized-lr the quantized layers' parameters (not their unquantized biases) in groups
    of their own rate, after the rest's (the first group's rate is --learning-rate's)."""
    from quant import FakeQuantLinear, is_learned_statistic

    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]  # with LoRA: the adapters
    parts = [(trained, c.learning_rate)]
    if c.quantized_lr is not None:
        quantized = {id(p) for m in student.modules() if isinstance(m, FakeQuantLinear)
                     for name, p in m.named_parameters() if name != "bias"}
        parts = [([(n, p) for n, p in trained if id(p) not in quantized], c.learning_rate),
                 ([(n, p) for n, p in trained if id(p) in quantized], c.quantized_lr)]
    groups = []
    for named, lr in parts:
        groups += [{"params": [p for n, p in named if p.dim() >= 2 and not is_learned_statistic(n)],
                    "weight_decay": c.weight_decay, "lr": lr},
                   {"params": [p for n, p in named if p.dim() < 2 or is_learned_statistic(n)],
                    "weight_decay": 0.0, "lr": lr}]
    return groups


def gptq_start(student, tokenizer, records, c: TrainConfig, accelerator) -> None:
    """In place: the student's latent weights from GPTQ onto its own grids (gptq.py),
    calibrated on ``--init-samples`` of the dataset's prompts with their completions.
    Every process computes it and takes the main process's result, so all start alike."""
    from data import build_batch, examples_in_use_order
    from gptq import apply_gptq

    try:
        chosen = examples_in_use_order(records, tokenizer, c.max_length, min(c.init_samples, len(records)),
                                       c.seed, c.min_completion_tokens, need_completions=True)
    except ValueError as e:
        raise BadInput(f"--init gptq calibrates on prompts with their completions: {e}") from None
    chosen = list({id(e): e for e in chosen}.values())  # a filtered record can bring a second epoch's repeats
    if len(chosen) < c.init_samples:
        log.info("--init gptq: the dataset holds %d usable sequences; calibrating on all of them", len(chosen))
    chosen.sort(key=lambda e: len(e.prompt_ids) + len(e.completion_ids))  # batches of like lengths pad little
    batches = []
    for first in range(0, len(chosen), GPTQ_BATCH_SIZE):
        part = chosen[first:first + GPTQ_BATCH_SIZE]
        batch = build_batch([e.prompt_ids for e in part], [e.completion_ids for e in part],
                            tokenizer.pad_token_id, c.max_length)
        batches.append({k: batch[k].to(accelerator.device) for k in ("input_ids", "attention_mask")})
    student.to(accelerator.device)
    summary = apply_gptq(student, batches, actorder=c.gptq_actorder, unrounded=c.gptq_latent == "unrounded")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for parameter in student.parameters():
            parameter.data.copy_(broadcast(parameter.data.contiguous()))
    log.info("--init gptq: %d layers from %d sequences (%d tokens) in %.0f s", summary["layers"], len(chosen),
             summary["calibration_tokens"], summary["seconds"])


# ---------------------------------------------------------------- the run

class Interrupted(Exception):
    pass


@dataclass
class Run:
    """What a training run holds between steps."""
    c: TrainConfig
    accelerator: object
    teacher: object
    student: object  # as accelerate prepared it (a DDP or FSDP wrapper, or the model)
    student_model: object  # the model inside it
    tokenizer: object
    optimizer: object
    scheduler: object
    loss: object  # losses.DistillationLoss
    examples: list  # the run's examples in the order its steps use them
    eval_examples: list
    start_step: int
    totals: dict  # train_s, tokens_generated, on_policy_steps, heldout_kl_step0: carried over a resumption
    resumed_from: Path | None = None  # the checkpoint this invocation started from: never rotated away


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        c = parse_config(argv)
        c.output_dir = c.output_dir or default_output_dir(c)
        return train(c)
    except BadInput as e:  # bad input: one line, nothing written (a bug keeps its traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2


def set_up(c: TrainConfig) -> Run:
    """Models, data, optimizer and the output directory; the state of the checkpoint being
    resumed. What the run cannot use (a model, dataset or directory) is a BadInput."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import get_cosine_schedule_with_warmup

    import checkpoints
    from data import LENGTH_GROUP_WINDOW_STEPS, examples_in_use_order, group_by_length, load_records
    from heldout import heldout_examples
    from losses import DistillationLoss
    from quant import learn_scales

    if c.mixed_precision == "bf16" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise BadInput("--mixed-precision bf16 under FSDP: accelerate's FSDP bf16 casts the sharded latent weights "
                       "themselves, so the quantizer would train on bf16-rounded weights and the checkpoint would hold "
                       "another function; run FSDP with --mixed-precision no (mixed_precision: 'no' in its config)")
    fsdp_1 = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
        os.environ.get("FSDP_VERSION", "1") != "2"
    # FSDP 1 flattens a wrapped block's parameters into one: what trains apart cannot
    apart = [flag for flag, on in (("--learn-scales", c.learn_scales), ("--freeze-quantized", c.freeze_quantized),
                                   ("--quantized-lr", c.quantized_lr is not None)) if on]
    if fsdp_1 and apart:
        raise BadInput(f"{apart[0]} under FSDP 1: its flat parameters hold a block's quantized and unquantized "
                       f"weights together, so they cannot train apart; use FSDP 2 (fsdp_version: 2, as "
                       f"configs/accelerate_fsdp.yaml)")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", c.mixed_precision)
    if launcher_precision != c.mixed_precision:  # accelerate would silently take train.py's
        raise BadInput(f"the launcher's mixed_precision is {launcher_precision} (accelerate config or "
                       f"--mixed_precision) but train.py's --mixed-precision is {c.mixed_precision}; train.py's flag "
                       f"decides: pass --mixed-precision {launcher_precision} or launch with --mixed_precision "
                       f"{c.mixed_precision}")
    try:  # input errors; anything raised later is a bug and keeps its traceback
        resume_from = checkpoints.checkpoint_to_resume(c)
        accelerator = Accelerator(log_with=None if c.log_with == "none" else c.log_with, project_dir=c.output_dir,
                                  mixed_precision=c.mixed_precision)
        torch.manual_seed(c.seed)
        teacher, student, tokenizer = load_teacher_and_student(c)
        records = load_records(c.dataset, c.dataset_split)
        # A resumed run's weights come from its checkpoint, except a LoRA run's frozen base,
        # which its checkpoint does not hold: that is rebuilt as it started.
        if c.init == "gptq" and (resume_from is None or c.lora_r):
            gptq_start(student, tokenizer, records, c, accelerator)
        if c.learn_scales and not student.quant_settings.learn_scales:
            # from the start's weights (a resumed run's saved scales load over them)
            log.info("student: learned scales in %d layers", learn_scales(student))
        need_completions = c.lmbda < 1 and not c.seq_kd
        per_step = examples_per_step(c, accelerator.num_processes)
        # grouped: whole windows, so a resumed run with more --max-steps regroups nothing it has used
        drawn_steps = (math.ceil(c.max_steps / LENGTH_GROUP_WINDOW_STEPS) * LENGTH_GROUP_WINDOW_STEPS
                       if c.group_by_length else c.max_steps)
        examples = examples_in_use_order(records, tokenizer, c.max_length, drawn_steps * per_step, c.seed,
                                         c.min_completion_tokens, need_completions=need_completions)
        if c.group_by_length:
            examples = group_by_length(examples, per_step, per_step * LENGTH_GROUP_WINDOW_STEPS,
                                       c.seed)[:c.max_steps * per_step]
        eval_examples = (heldout_examples(tokenizer, c.eval_dataset, c.eval_dataset_split, c.max_length)
                         if c.eval_steps else [])
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # BadInput is a ValueError too
        raise BadInput(str(e)) from None

    optimizer = torch.optim.AdamW(parameter_groups(student, c), lr=c.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * c.max_steps), c.max_steps)
    # The scheduler stays outside prepare(): accelerate would step it once per process.
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    checkpoints.keep_one_weight_copy(accelerator, student)
    teacher.to(accelerator.device)
    # FSDP shards the head: the fused loss's head swap needs it whole.
    loss = DistillationLoss(student, teacher, beta=c.beta, temperature=c.loss_temperature, normalize=c.jsd_normalize,
                            vocab_size=len(tokenizer), chunk_size=c.loss_chunk_size or None,
                            fused=c.fused_loss and accelerator.distributed_type != DistributedType.FSDP)
    run = Run(c, accelerator, teacher, student, accelerator.unwrap_model(student), tokenizer, optimizer, scheduler,
              loss, examples, eval_examples, start_step=0,
              totals={"train_s": 0.0, "tokens_generated": 0, "on_policy_steps": 0, "heldout_kl_step0": None})
    if resume_from is not None:
        state = checkpoints.load(accelerator, resume_from)
        run.start_step, run.resumed_from = state["step"], resume_from
        run.totals.update({k: state[k] for k in run.totals if k in state})
        if "on_policy_steps" not in state:  # a checkpoint from before the count was saved
            run.totals["on_policy_steps"] = round(state.get("on_policy_fraction", 0.0) * state["step"])
        log.info("resumed from %s at step %d", resume_from, run.start_step)
    out = Path(c.output_dir)
    if accelerator.is_main_process:
        if c.overwrite and out.exists() and resume_from is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(run_config_dict(c), indent=2))
    if c.log_with != "none":
        accelerator.init_trackers("qakd", config={k: v for k, v in run_config_dict(c).items() if v is not None})
    return run


# ---------------------------------------------------------------- the pieces of a step

def is_on_policy(c: TrainConfig, step: int) -> bool:
    """Drawn from (seed, step) alone: every process and a resumed run agree."""
    return random.Random(c.seed * 1_000_003 + step).random() < c.lmbda


def examples_per_step(c: TrainConfig, world: int) -> int:
    return world * c.gradient_accumulation_steps * c.per_device_train_batch_size


def step_examples(run: Run, step: int, slot: int) -> list:
    """The examples of one micro-batch (``slot``: micro-batch x process), from the run's
    examples in use order (``data.examples_in_use_order``): a pure function of (seed, step,
    slot), so a resumed run and any process layout see the same data."""
    batch_size = run.c.per_device_train_batch_size
    first = step * examples_per_step(run.c, run.accelerator.num_processes) + slot * batch_size
    return run.examples[first:first + batch_size]


def rollout(run: Run, model, prompts: list[list[int]], seed: int) -> list[list[int]]:
    """Completions of ``prompts`` sampled at ``--temperature`` (rollout.py). Under FSDP with
    several processes every process decodes until all are done (``synced_gpus``): each
    forward gathers the sharded weights from all of them."""
    from accelerate.utils import DistributedType

    from rollout import generate_completions

    accelerator, c = run.accelerator, run.c
    synced = accelerator.distributed_type == DistributedType.FSDP and accelerator.num_processes > 1
    return generate_completions(model, run.tokenizer, prompts, accelerator.device, do_sample=True,
                                temperature=c.temperature, max_new_tokens=c.max_new_tokens, seed=seed,
                                synced_gpus=synced)


def step_batches(run: Run, step: int, on_policy: bool) -> tuple[list[dict], int, float]:
    """This process's micro-batches of a step: the examples' prompts with the student's
    samples (on-policy), the teacher's (``--seq-kd``) or the dataset's completions; the
    number of tokens sampled here and the seconds it took."""
    from data import build_batch
    from quant import frozen_quant

    c, world = run.c, run.accelerator.num_processes
    batches, sampled, generation_s = [], 0, 0.0
    for micro in range(c.gradient_accumulation_steps):
        slot = micro * world + run.accelerator.process_index
        chosen = step_examples(run, step, slot)
        prompts = [e.prompt_ids for e in chosen]
        seed = c.seed + 7919 * (step * world * c.gradient_accumulation_steps + slot)
        started = time.perf_counter()
        if on_policy:
            with frozen_quant(run.student_model, dtype=getattr(torch, c.rollout_dtype)):
                completions = rollout(run, run.student_model, prompts, seed)
        elif c.seq_kd:
            completions = rollout(run, run.teacher, prompts, seed)
        else:
            completions = [e.completion_ids for e in chosen]
        generation_s += time.perf_counter() - started
        if on_policy or c.seq_kd:
            sampled += sum(len(completion) for completion in completions)
        batch = build_batch(prompts, completions, run.tokenizer.pad_token_id, c.max_length)
        batches.append({k: v.to(run.accelerator.device) for k, v in batch.items()})
    return batches, sampled, generation_s


def backward(run: Run, batches: list[dict], num_items) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of the step's micro-batches (gradients synchronised on the last);
    the loss summed over processes, and the time in the teacher's and the student's passes."""
    from accelerate.utils import DistributedType

    from quant import reused_quant

    accelerator, world = run.accelerator, run.accelerator.num_processes
    total = torch.zeros((), device=accelerator.device)
    timings = {"teacher_forward_s": 0.0, "student_forward_backward_s": 0.0}
    # The weights change only at the optimizer step: several micro-batches reuse one
    # quantization. One micro-batch gains nothing and would hold every quantized weight to
    # the end of its backward; gradient checkpointing exists not to hold them all at once;
    # FSDP gathers each layer's weight anew for every forward. Frozen layers may hold theirs
    # for the whole run (holds_quantization).
    reuse = len(batches) > 1 and not (run.c.freeze_quantized or run.c.gradient_checkpointing or
                                      accelerator.distributed_type == DistributedType.FSDP)
    with reused_quant(run.student_model) if reuse else nullcontext():
        for i, batch in enumerate(batches):
            with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(run.student):
                started = time.perf_counter()
                # DDP averages gradients over processes: normalising each process's sum by
                # count / world makes that average the gradient of the global mean.
                loss = run.loss(batch, num_items / world)
                accelerator.backward(loss)
                timings["teacher_forward_s"] += run.loss.teacher_seconds
                timings["student_forward_backward_s"] += time.perf_counter() - started - run.loss.teacher_seconds
            total += loss.detach()
    return accelerator.reduce(total, "sum") / world, timings


def holds_quantization(run: Run) -> bool:
    """--freeze-quantized: the quantized weights never change, so each layer quantizes once
    for the whole run; not under FSDP (each forward gathers the weight anew) nor gradient
    checkpointing (the held weights are the memory it exists to free)."""
    from accelerate.utils import DistributedType

    return run.c.freeze_quantized and not (run.c.gradient_checkpointing or
                                           run.accelerator.distributed_type == DistributedType.FSDP)


def clip_gradients(run: Run) -> float:
    """Clip (``--max-grad-norm 0``: only measure); the gradient norm over all processes,
    the same on each (DDP's gradients are averaged, FSDP's norm is reduced)."""
    # max_norm inf: the norm is measured, nothing is scaled
    return float(run.accelerator.clip_grad_norm_(run.student.parameters(), run.c.max_grad_norm or float("inf")))


def optimizer_step(run: Run) -> None:
    run.optimizer.step()
    run.scheduler.step()


def heldout_kl(run: Run) -> dict:
    """Held-out KL(teacher || student) per token, teacher-forced, and the fraction of its
    step-0 value closed; each process scores a share of the examples and the sums are added."""
    from heldout import KL_BATCH, heldout_kl_sums
    from quant import frozen_quant

    accelerator, model = run.accelerator, run.student_model
    world, rank = accelerator.num_processes, accelerator.process_index
    # Every process runs as many forwards as the one with the largest share (process 0's):
    # under FSDP each forward is a collective.
    forward_batches = math.ceil(math.ceil(len(run.eval_examples) / world) / KL_BATCH)
    was_training = model.training
    model.eval()
    with frozen_quant(model):
        kl_sum, tokens = heldout_kl_sums(run.teacher, model, run.eval_examples[rank::world],
                                         run.tokenizer.pad_token_id, run.c.max_length,
                                         forward_batches=forward_batches, filler=run.eval_examples[0])
    model.train(was_training)
    sums = accelerator.reduce(torch.tensor([kl_sum, tokens], dtype=torch.float64, device=accelerator.device), "sum")
    kl = (sums[0] / sums[1].clamp(min=1)).item()
    if run.totals["heldout_kl_step0"] is None:
        run.totals["heldout_kl_step0"] = kl
    start = run.totals["heldout_kl_step0"]
    return {"heldout_kl": kl, "heldout_kl_gap_closed": 1 - kl / start if start > 0 else None}


class StopSignals:
    """SIGINT / SIGTERM while training: the step finishes, a checkpoint is saved, exit 130.
    ``received(accelerator)`` is agreed by all processes (a signal may reach only some)."""

    def __enter__(self):
        self.signals = []
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame):
        self.signals.append(signum)
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)

    def received(self, accelerator) -> bool:
        return bool(accelerator.reduce(torch.tensor(len(self.signals), device=accelerator.device), "sum") > 0)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- the loop

def train(c: TrainConfig) -> int:
    from tqdm import tqdm

    import checkpoints
    from quant import frozen_quant

    run = set_up(c)
    accelerator, totals, out = run.accelerator, run.totals, Path(c.output_dir)
    metrics_file = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None

    def record(metrics: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
        if c.log_with != "none":
            accelerator.log(metrics, step=metrics["step"])

    progress = tqdm(total=c.max_steps, initial=run.start_step, disable=not accelerator.is_local_main_process,
                    desc="distill")
    step, steps_this_run, nonfinite_in_a_row = run.start_step, 0, 0
    try:
        with StopSignals() as signals, frozen_quant(run.student_model) if holds_quantization(run) else nullcontext():
            if c.eval_steps and step == 0:  # the curve starts at round-to-nearest
                record({"step": 0, "train_s": 0.0, "tokens_generated": 0, **heldout_kl(run)})
                log.info("step 0: held-out KL %.4f", totals["heldout_kl_step0"])
            while step < c.max_steps:
                started = time.perf_counter()
                on_policy = is_on_policy(c, step)
                batches, sampled, generation_s = step_batches(run, step, on_policy)
                local = torch.tensor([sum(int((b["labels"] != -100).sum()) for b in batches), sampled],
                                     device=accelerator.device)
                num_items, sampled = accelerator.reduce(local, "sum")
                loss, timings = backward(run, batches, num_items)
                # Both the same on every process (reduced); a non-finite gradient with a finite
                # loss (an overflow in the backward) would make every weight NaN.
                grad_norm = clip_gradients(run) if torch.isfinite(loss) else float("nan")
                skipped = not math.isfinite(grad_norm)
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
                if skipped:
                    log.warning("step %d: non-finite %s, step skipped", step,
                                f"gradient norm ({grad_norm})" if torch.isfinite(loss) else f"loss ({loss.item()})")
                    if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise BadInput(f"{nonfinite_in_a_row} non-finite losses or gradient norms in a row at step "
                                       f"{step}: training diverged; lower --learning-rate or check the data")
                else:
                    optimizer_step(run)
                run.optimizer.zero_grad(set_to_none=True)
                step, steps_this_run = step + 1, steps_this_run + 1
                elapsed = time.perf_counter() - started
                totals["train_s"] += elapsed
                totals["tokens_generated"] += int(sampled)
                totals["on_policy_steps"] += on_policy
                metrics = {"step": step, "loss": loss.item(), "grad_norm": grad_norm,
                           "learning_rate": run.scheduler.get_last_lr()[0],
                           **({"quantized_learning_rate": run.scheduler.get_last_lr()[2]}
                              if c.quantized_lr is not None else {}), "on_policy": on_policy,
                           "on_policy_fraction": totals["on_policy_steps"] / step,
                           "on_policy_steps": totals["on_policy_steps"],
                           "completion_tokens": int(num_items), "tokens_per_s": int(num_items) / elapsed,
                           "step_s": elapsed, "generation_s": generation_s, **timings, "train_s": totals["train_s"],
                           "tokens_generated": totals["tokens_generated"], **({"skipped": True} if skipped else {})}
                if c.eval_steps and (step % c.eval_steps == 0 or step == c.max_steps):
                    metrics.update(heldout_kl(run))
                record(metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                     on_policy=f"{metrics['on_policy_fraction']:.2f}")
                signalled = signals.received(accelerator)
                stop_now = signalled or (c.stop_after and steps_this_run >= c.stop_after)
                if (c.save_steps and step % c.save_steps == 0) or step == c.max_steps or stop_now:
                    checkpoint = checkpoints.save(accelerator, run.student, run.tokenizer, out, run_config_dict(c),
                                                  step, {**metrics, "heldout_kl_step0": totals["heldout_kl_step0"]})
                    log.info("saved %s", checkpoint)
                    if c.save_total_limit and accelerator.is_main_process:
                        for removed in checkpoints.rotate(out, c.save_total_limit, keep_also=run.resumed_from):
                            log.info("removed %s (--save-total-limit %d)", removed, c.save_total_limit)
                if signalled:
                    raise Interrupted(checkpoint)
                if stop_now:
                    break
    except Interrupted as e:
        print(f"interrupted at step {step}; checkpoint saved to {e.args[0]}; continue with the same command "
              f"and --resume", file=sys.stderr)
        return 130
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()
        if c.log_with != "none":
            accelerator.end_training()
    if c.max_steps == 0 and run.start_step == 0 and checkpoints.latest_checkpoint(out) is None:  # only the start
        checkpoint = checkpoints.save(accelerator, run.student, run.tokenizer, out, run_config_dict(c), 0,
                                      {"step": 0, "train_s": 0.0, "heldout_kl_step0": totals["heldout_kl_step0"]})
        log.info("saved the start as %s", checkpoint)
    log.info("done: step %d, on-policy fraction %.2f", step, totals["on_policy_steps"] / step if step else 0)
    if c.do_eval and step >= c.max_steps and accelerator.is_main_process:
        final = checkpoints.latest_checkpoint(out)
        accelerator.free_memory()  # it holds the prepared student and optimizer
        # The scheduler registered for checkpointing holds the optimizer, and the checkpoint
        # hooks hold the student: let go of both, or eval.py shares the device with them.
        accelerator._custom_objects.clear()
        accelerator._save_model_state_pre_hook.clear()
        accelerator._load_model_state_pre_hook.clear()
        del run  # the teacher, the student, AdamW's state
        return evaluate(final, c.eval_args)
    return 0


def evaluate(checkpoint: Path, eval_args: str) -> int:
    """eval.py on the final checkpoint, in a process of its own started once the training
    state is freed: its models get the memory (and the device) to themselves."""
    import gc
    import shlex
    import subprocess

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    command = [sys.executable, str(Path(__file__).resolve().with_name("eval.py")), str(checkpoint),
               *shlex.split(eval_args)]
    log.info("evaluating: %s", shlex.join(command))
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
