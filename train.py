"""On-policy distillation of a 4-bit student from its full-precision teacher.

    uv run accelerate launch train.py --lmbda 1 --quant-type int4 --output_dir run
    uv run accelerate launch train.py --config configs/smollm2_int4_onpolicy.toml --max-steps 20

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
import functools
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

log = logging.getLogger("train")

CHECKPOINT_PREFIX = "checkpoint-"
MAX_NONFINITE_IN_A_ROW = 3
# Fields that may change between a run and its resumption (a moved directory is the same run).
RESUMABLE_CHANGES = {"max_steps", "save_steps", "stop_after", "resume", "overwrite", "do_eval", "log_with",
                     "config", "eval_args", "eval_steps", "gradient_checkpointing", "output_dir"}


@dataclass
class TrainConfig:
    model: str | None = None  # teacher weights (the student starts from them): hub id, dir, .gguf; default embedded
    student_model: str | None = None  # a different starting point for the student (same tokenizer)
    dataset: str | None = None  # hub name or local .json/.jsonl/.parquet; default: the embedded set
    dataset_split: str = "train"
    lmbda: float = 0.5  # probability that a step is on-policy (student generations)
    beta: float = 0.5  # generalized JSD interpolation: 0 forward KL, 1 reverse KL
    temperature: float = 0.9  # sampling temperature of the rollouts
    loss_temperature: float = 1.0  # temperature of the distributions the loss compares
    jsd_normalize: bool = False  # divide the interior JSD by beta * (1 - beta)
    seq_kd: bool = False  # off-policy steps use teacher samples instead of dataset completions
    quant_type: str = "mxfp4"  # mxfp4 | int4 | int4_sym | none
    group_size: int | None = None  # int4: default 128 where it divides, else 64 or 32
    scale_rule: str = "floor"  # mxfp4: floor (OCP spec) | rceil (NVIDIA) | mse (least-error exponent per block)
    learning_rate: float = 5e-6
    max_steps: int = 100
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    max_new_tokens: int = 128
    min_completion_tokens: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 42
    output_dir: str | None = None  # default: dump/<quant>_lmbda<l>_beta<b>_lr<lr>
    save_steps: int = 0  # checkpoint every N steps (0: only at the end)
    stop_after: int = 0  # run at most N steps in this invocation, then checkpoint (0: no limit)
    resume: bool = False
    overwrite: bool = False
    eval_steps: int = 0  # held-out KL(teacher || student) at step 0 and every N steps (0: off)
    eval_dataset: str | None = None  # for --eval-steps; default: the embedded held-out set
    eval_dataset_split: str = "test"
    do_eval: bool = False
    eval_args: str = ""  # extra eval.py flags for --do-eval, e.g. "--limit 100 --tasks arc_easy"
    teacher_dtype: str = "float32"
    gradient_checkpointing: bool = False  # student: recompute activations in the backward (same gradients)
    log_with: str = "none"  # none | tensorboard | wandb
    fused_loss: bool = True  # never materialise [tokens, vocab] logits when the model allows
    loss_chunk_size: int = 0  # tokens per loss chunk; 0: about 32 MiB per [chunk, vocab] tensor
    config: str | None = None


QUANT_CHOICES = ("mxfp4", "int4", "int4_sym", "none")
ALIASES = {"learning_rate": ["--lr"], "per_device_train_batch_size": ["--batch-size", "--batch_size"]}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise Abort(f"{message} (see train.py --help)")


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
        kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
        choices = QUANT_CHOICES if f.name == "quant_type" else None
        parser.add_argument(*flags, dest=f.name, type=kind, choices=choices, help=f"(default: {default})")
    return parser


def parse_config(argv=None) -> TrainConfig:
    """Defaults, then the TOML file named by --config, then the command line."""
    cli = vars(build_parser().parse_args(argv))
    values = {}
    if cli.get("config"):
        path = Path(cli["config"])
        if not path.exists():
            raise Abort(f"config file {path} does not exist")
        try:
            with open(path, "rb") as f:
                values = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except tomllib.TOMLDecodeError as e:
            raise Abort(f"config file {path} is not valid TOML ({e})") from None
        unknown = set(values) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise Abort(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    values.update(cli)
    config = TrainConfig(**values)
    validate(config)
    return config


class Abort(Exception):
    """Bad input or a run that cannot go on: reported as one line, non-zero exit."""


def validate(c: TrainConfig) -> None:
    from quant import SCALE_RULES

    for name in ("lmbda", "beta"):
        value = getattr(c, name)
        if not 0.0 <= value <= 1.0:
            raise Abort(f"--{name} must be in [0, 1], got {value}")
    if c.quant_type not in QUANT_CHOICES:
        raise Abort(f"--quant-type must be one of {', '.join(QUANT_CHOICES)}, got {c.quant_type!r}")
    if c.scale_rule not in SCALE_RULES:
        raise Abort(f"--scale-rule must be one of {', '.join(SCALE_RULES)}, got {c.scale_rule!r}")
    for name in ("temperature", "loss_temperature", "learning_rate"):
        if not getattr(c, name) > 0:
            raise Abort(f"--{name.replace('_', '-')} must be > 0, got {getattr(c, name)}")
    for name in ("save_steps", "stop_after", "eval_steps"):
        if getattr(c, name) < 0:
            raise Abort(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                 "max_new_tokens", "min_completion_tokens"):
        if getattr(c, name) < 1:
            raise Abort(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    if c.teacher_dtype not in ("float32", "bfloat16", "float16"):
        raise Abort(f"--teacher-dtype must be float32, bfloat16 or float16, got {c.teacher_dtype!r}")
    if c.log_with not in ("none", "tensorboard", "wandb"):
        raise Abort(f"--log-with must be none, tensorboard or wandb, got {c.log_with!r}")
    if c.log_with != "none" and importlib.util.find_spec(c.log_with) is None:
        raise Abort(f"--log-with {c.log_with} needs the {c.log_with} package, which is not installed: "
                    f"uv pip install {c.log_with} (or log nothing; metrics.jsonl is always written)")
    if c.max_grad_norm < 0:
        raise Abort(f"--max-grad-norm must be >= 0 (0: no clipping), got {c.max_grad_norm}")
    if not 0 <= c.warmup_ratio < 1:
        raise Abort(f"--warmup-ratio must be in [0, 1), got {c.warmup_ratio}")


def default_output_dir(c: TrainConfig) -> str:
    return f"dump/{c.quant_type}_lmbda{c.lmbda:g}_beta{c.beta:g}_lr{c.learning_rate:g}"


def run_config_dict(c: TrainConfig) -> dict:
    return dataclasses.asdict(c)


def config_differences(saved: dict, c: TrainConfig) -> list[str]:
    """The settings in which ``c`` differs from a saved run configuration, beyond those a
    resumed run may change."""
    defaults = run_config_dict(TrainConfig())  # a setting added since the run was saved has its default
    return sorted(k for k, v in run_config_dict(c).items()
                  if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v)


# ---------------------------------------------------------------- output directory and checkpoints

def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return max(steps)[1] if steps else None


def check_output_dir(c: TrainConfig) -> Path | None:
    """Refuse to clobber a run: returns the checkpoint to resume from, if any."""
    out = Path(c.output_dir)
    saved = out / "run_config.json"
    if not out.exists() or not any(out.iterdir()):
        if c.resume:
            log.warning("--resume: %s holds no run yet, starting from scratch", out)
        return None
    if c.overwrite:
        return None
    if not c.resume:
        raise Abort(f"output directory {out} already holds a run; pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another --output_dir")
    if saved.exists():
        differ = config_differences(json.loads(saved.read_text()), c)
        if differ:
            raise Abort(f"--resume: {out} was run with a different configuration ({', '.join(differ)}); "
                              f"use the same settings or another --output_dir")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    return checkpoint


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    """The Hugging Face layout weights of a checkpoint (one file or shards) into ``model``,
    exactly; only weights tied to another (lm_head to the embedding) may be absent."""
    from safetensors.torch import load_file

    index = checkpoint / "model.safetensors.index.json"
    files = (sorted({checkpoint / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.exists() else [checkpoint / "model.safetensors"])
    state = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise Abort(f"{checkpoint}: its weights do not fit this model (missing {sorted(result.missing_keys)[:3]}, "
                    f"unexpected {sorted(result.unexpected_keys)[:3]})")


def save_checkpoint(accelerator, student, tokenizer, c: TrainConfig, step: int, metrics: dict) -> Path:
    """Write checkpoint-<step> atomically: built in a temporary directory, then renamed."""
    out = Path(c.output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    staging = out / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "accelerate_state"))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(student)
        unwrapped.save_pretrained(staging, state_dict=accelerator.get_state_dict(student),
                                  safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "run_config.json").write_text(json.dumps(run_config_dict(c), indent=2))
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- models

def load_teacher_and_student(c: TrainConfig):
    """The frozen teacher, the trainable float32 student (fake-quantized), the tokenizer."""
    import copy

    from models import disable_dropout, load_model
    from quant import quantize_model, quantize_model_from_settings

    dtype = getattr(torch, c.teacher_dtype)
    teacher, tokenizer = load_model(c.model, dtype=dtype)
    teacher.eval().requires_grad_(False)
    if c.student_model or dtype != torch.float32:
        student, student_tokenizer = load_model(c.student_model or c.model, dtype=torch.float32)
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise Abort(f"teacher {c.model or 'embedded'} and student {c.student_model} use different "
                        f"tokenizers; distillation needs the same vocabulary")
    else:
        student = copy.deepcopy(teacher)
    disable_dropout(teacher)
    disable_dropout(student)
    if c.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise Abort(f"--gradient-checkpointing: {type(student).__name__} does not support gradient checkpointing")
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.requires_grad_(True).train()
    saved_settings = getattr(student.config, "fake_quant", None)
    if saved_settings:  # a saved student: rebuild exactly the quantization it was trained with
        quantize_model_from_settings(student, saved_settings)
        log.info("student keeps its saved quantization (%s)", saved_settings["quant_type"])
    elif c.quant_type != "none":
        count = quantize_model(student, c.quant_type, c.group_size, scale_rule=c.scale_rule)
        log.info("student: %d linear layers fake-quantized to %s", count, c.quant_type)
    return teacher, student, tokenizer


# ---------------------------------------------------------------- the loop

class Interrupted(Exception):
    pass


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        c = parse_config(argv)
        c.output_dir = c.output_dir or default_output_dir(c)
        return train(c)
    except Abort as e:  # bad input: one line, nothing written (a bug keeps its traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(c: TrainConfig) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from data import (build_batch, completions_from_generation, left_padded_prompts, load_records,
                      prepare_examples)
    from eval import heldout_examples, heldout_kl_sums
    from models import sampling
    from losses import (fused_linear_jsd_loss, generalized_jsd_loss, hidden_states_instead_of_logits,
                        supports_fused_loss)
    from quant import frozen_quant

    resume_from = check_output_dir(c)
    accelerator = Accelerator(log_with=None if c.log_with == "none" else c.log_with, project_dir=c.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(c.seed)

    try:  # models and data the run cannot use are input errors; anything later is a bug
        teacher, student, tokenizer = load_teacher_and_student(c)
        need_completions = c.lmbda < 1 and not c.seq_kd
        examples = prepare_examples(load_records(c.dataset, c.dataset_split), tokenizer, c.max_length,
                                    c.min_completion_tokens, need_completions=need_completions)
        eval_examples = (heldout_examples(tokenizer, c.eval_dataset, c.eval_dataset_split, c.max_length)
                         if c.eval_steps else [])
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise Abort(str(e)) from None

    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=c.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(c.warmup_ratio * c.max_steps), c.max_steps)
    # The scheduler stays outside prepare(): accelerate would step it once per process.
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.distributed_type != DistributedType.FSDP:
        # One copy of the weights per checkpoint: its Hugging Face layout safetensors, which
        # resume reads back; accelerate's state keeps the optimizer, scheduler and RNGs.
        # (FSDP keeps its own sharded copy as well.)
        accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())

        def load_student_weights(models, directory):
            load_checkpoint_weights(accelerator.unwrap_model(student), Path(directory).parent)
            models.clear()

        accelerator.register_load_state_pre_hook(load_student_weights)
    teacher.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(student)
    fused = (c.fused_loss and accelerator.distributed_type != DistributedType.FSDP
             and supports_fused_loss(unwrapped) and supports_fused_loss(teacher))

    start_step = 0
    # Totals that the learning curves are plotted against; they carry over a resumption.
    totals = {"train_s": 0.0, "tokens_generated": 0, "heldout_kl_step0": None}
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "accelerate_state"))
        state = json.loads((resume_from / "trainer_state.json").read_text())
        start_step = state["step"]
        totals.update({k: state[k] for k in totals if k in state})
        log.info("resumed from %s at step %d", resume_from, start_step)
    out = Path(c.output_dir)
    if accelerator.is_main_process:
        if c.overwrite and out.exists() and resume_from is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(run_config_dict(c), indent=2))
    if c.log_with != "none":
        accelerator.init_trackers("qakd", config={k: v for k, v in run_config_dict(c).items() if v is not None})

    slots_per_step = world * c.gradient_accumulation_steps
    prompts_per_step = slots_per_step * c.per_device_train_batch_size

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        return torch.randperm(len(examples), generator=torch.Generator().manual_seed(c.seed * 100_003 + epoch)).tolist()

    def step_examples(step: int, slot: int) -> list:
        """The examples of one micro-batch: a pure function of (seed, step, slot), so a
        resumed run and any process layout see the same data."""
        out_ = []
        for i in range(c.per_device_train_batch_size):
            index = step * prompts_per_step + slot * c.per_device_train_batch_size + i
            epoch, position = divmod(index, len(examples))
            out_.append(examples[epoch_order(epoch)[position]])
        return out_

    def generate(model, prompts, seed):
        batch = {k: v.to(accelerator.device) for k, v in left_padded_prompts(prompts, tokenizer.pad_token_id).items()}
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        with torch.no_grad(), sampling(model, tokenizer, do_sample=True, temperature=c.temperature,
                                       max_new_tokens=c.max_new_tokens) as config:
            generated = model.generate(**batch, generation_config=config)
        model.train(was_training)
        return completions_from_generation(generated.cpu(), batch["input_ids"].shape[1], config.eos_token_id)

    def loss_sum(batch, num_items):
        """Student forward + loss on one micro-batch (teacher forward inside), timed."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        t0 = time.perf_counter()
        if fused:
            with torch.no_grad(), hidden_states_instead_of_logits(teacher) as teacher_head:
                teacher_hidden = teacher(**inputs, use_cache=False).logits
            t1 = time.perf_counter()
            with hidden_states_instead_of_logits(unwrapped) as student_head:
                student_hidden = student(**inputs, use_cache=False).logits
            loss = fused_linear_jsd_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels,
                                         beta=c.beta, temperature=c.loss_temperature, num_items_in_batch=num_items,
                                         normalize=c.jsd_normalize, vocab_size=len(tokenizer),
                                         chunk_size=c.loss_chunk_size or None)
        else:
            with torch.no_grad():
                teacher_logits = teacher(**inputs, use_cache=False).logits
            t1 = time.perf_counter()
            student_logits = student(**inputs, use_cache=False).logits
            loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=c.beta,
                                        temperature=c.loss_temperature, num_items_in_batch=num_items,
                                        normalize=c.jsd_normalize, vocab_size=len(tokenizer),
                                        chunk_size=c.loss_chunk_size or None)
        return loss, t1 - t0

    def heldout_eval() -> dict:
        """Held-out KL(teacher || student) per token, teacher-forced; each process scores a
        share of the examples and the sums are added."""
        was_training = unwrapped.training
        unwrapped.eval()
        with frozen_quant(unwrapped):
            kl_sum, tokens = heldout_kl_sums(teacher, unwrapped, eval_examples[rank::world], tokenizer.pad_token_id,
                                             c.max_length)
        unwrapped.train(was_training)
        sums = accelerator.reduce(torch.tensor([kl_sum, tokens], dtype=torch.float64, device=accelerator.device),
                                  "sum")
        kl = (sums[0] / sums[1].clamp(min=1)).item()
        if totals["heldout_kl_step0"] is None:
            totals["heldout_kl_step0"] = kl
        start_kl = totals["heldout_kl_step0"]
        return {"heldout_kl": kl, "heldout_kl_gap_closed": 1 - kl / start_kl if start_kl > 0 else None}

    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics_file = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    progress = tqdm(total=c.max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="distill")
    on_policy_steps, nonfinite_in_a_row, last_metrics = 0, 0, {}
    steps_this_run = 0
    step = start_step
    if c.eval_steps and start_step == 0:  # the curve starts at round-to-nearest
        step0 = {"step": 0, "train_s": 0.0, "tokens_generated": 0, **heldout_eval()}
        log.info("step 0: held-out KL %.4f", step0["heldout_kl"])
        if metrics_file:
            metrics_file.write(json.dumps(step0) + "\n")
            metrics_file.flush()
    try:
        while step < c.max_steps:
            step_start = time.perf_counter()
            timings = {"generation_s": 0.0, "teacher_forward_s": 0.0, "student_forward_backward_s": 0.0}
            on_policy = random.Random(c.seed * 1_000_003 + step).random() < c.lmbda
            on_policy_steps += on_policy
            micro_batches, local_generated = [], 0
            for micro in range(c.gradient_accumulation_steps):
                slot = micro * world + rank
                chosen = step_examples(step, slot)
                prompts = [e.prompt_ids for e in chosen]
                t0 = time.perf_counter()
                if on_policy:
                    with frozen_quant(unwrapped):
                        completions = generate(unwrapped, prompts, c.seed + 7919 * (step * slots_per_step + slot))
                elif c.seq_kd:
                    completions = generate(teacher, prompts, c.seed + 7919 * (step * slots_per_step + slot))
                else:
                    completions = [e.completion_ids for e in chosen]
                if on_policy or c.seq_kd:
                    local_generated += sum(len(completion) for completion in completions)
                timings["generation_s"] += time.perf_counter() - t0
                batch = build_batch(prompts, completions, tokenizer.pad_token_id, c.max_length)
                micro_batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
            local_tokens = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
            counts = accelerator.reduce(torch.tensor([local_tokens, local_generated], device=accelerator.device),
                                        "sum")
            num_items, generated_tokens = counts[0], int(counts[1])
            total_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(micro_batches):
                sync = i == len(micro_batches) - 1
                with nullcontext() if sync else accelerator.no_sync(student):
                    t0 = time.perf_counter()
                    # DDP averages gradients over processes: normalising each process's sum by
                    # count / world makes that average the gradient of the global mean.
                    loss, teacher_s = loss_sum(batch, num_items / world)
                    accelerator.backward(loss)
                    timings["teacher_forward_s"] += teacher_s
                    timings["student_forward_backward_s"] += time.perf_counter() - t0 - teacher_s
                total_loss += loss.detach()
            total_loss = accelerator.reduce(total_loss, "sum") / world
            skipped = not torch.isfinite(total_loss)  # the same on every process: reduced
            if skipped:
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss (%s), step skipped", step, total_loss.item())
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise Abort(f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: training "
                                       f"diverged; lower --learning-rate or check the data")
                grad_norm = float("nan")
            else:
                nonfinite_in_a_row = 0
                # max_norm inf: the norm is measured, nothing is scaled
                grad_norm = accelerator.clip_grad_norm_(student.parameters(), c.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            elapsed = time.perf_counter() - step_start
            totals["train_s"] += elapsed
            totals["tokens_generated"] += generated_tokens
            last_metrics = {"step": step, "loss": total_loss.item(), "grad_norm": float(grad_norm),
                            "learning_rate": scheduler.get_last_lr()[0], "on_policy": on_policy,
                            "on_policy_fraction": on_policy_steps / steps_this_run,
                            "completion_tokens": int(num_items), "tokens_per_s": int(num_items) / elapsed,
                            "step_s": elapsed, **timings, "train_s": totals["train_s"],
                            "tokens_generated": totals["tokens_generated"], **({"skipped": True} if skipped else {})}
            if c.eval_steps and (step % c.eval_steps == 0 or step == c.max_steps):
                last_metrics.update(heldout_eval())
            if metrics_file:
                metrics_file.write(json.dumps(last_metrics) + "\n")
                metrics_file.flush()
            if c.log_with != "none":
                accelerator.log(last_metrics, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", tok_s=f"{last_metrics['tokens_per_s']:.0f}",
                                 on_policy=f"{last_metrics['on_policy_fraction']:.2f}")
            # A signal reaches one process (or some): all of them finish this step and save together.
            signalled = accelerator.reduce(torch.tensor(len(interrupted), device=accelerator.device), "sum") > 0
            stop_now = bool(signalled) or (c.stop_after and steps_this_run >= c.stop_after)
            if (c.save_steps and step % c.save_steps == 0) or step == c.max_steps or stop_now:
                checkpoint = save_checkpoint(accelerator, student, tokenizer, c, step,
                                             {**last_metrics, "heldout_kl_step0": totals["heldout_kl_step0"]})
                log.info("saved %s", checkpoint)
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
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if c.log_with != "none":
            accelerator.end_training()
    log.info("done: step %d, on-policy fraction %.2f", step,
             on_policy_steps / steps_this_run if steps_this_run else 0.0)
    if c.do_eval and step >= c.max_steps and accelerator.is_main_process:
        import shlex

        import eval as evaluation

        return evaluation.main([str(latest_checkpoint(out)), *shlex.split(c.eval_args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
