"""Completions a model generates for a batch of prompts: the one path every rollout takes.

Training samples the student's (on-policy steps) or the teacher's (``--seq-kd``) completions
at ``--temperature``; the held-out evaluation takes the student's greedy ones. Both go
through ``generate_completions``: prompts left-padded into one batch, a generation config
built from scratch (``sampling``: plain sampling or greedy, nothing else from the model's
own config but its stop tokens), and each row cut after its first stop token. With
``row_seeds`` each row samples from its own generator (``RowSeededSampling``), so a row's
completion does not depend on the rows batched with it (eval.py's exposure-bias curve), as
long as the model computes each row alone (an NVFP4 W4A4 student's activation scale is the
batch's).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def stop_token_ids(model, tokenizer) -> list[int]:
    """Where a completion ends: the tokenizer's EOS and every end token of the model's
    generation config (Qwen's <|im_end|>, Gemma's <end_of_turn> where the EOS is another)."""
    ids = {tokenizer.eos_token_id} - {None}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= {configured} if isinstance(configured, int) else set(configured)
    return sorted(ids)


@contextmanager
def sampling(model, tokenizer, *, do_sample: bool, max_new_tokens: int, temperature: float = 1.0):
    """A generation config built from scratch, for ``model.generate(generation_config=...)``.

    transformers fills every field left unset from the model's own generation config, so
    within the block that config is replaced by this one: the model's repetition penalty,
    top-k / top-p / min-p, length penalties and the like never reach the samples (plain
    sampling at ``temperature``, or greedy). Kept from the model: its stop tokens
    (``stop_token_ids``); padding is the tokenizer's."""
    from transformers import GenerationConfig

    fields = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    config = GenerationConfig(**fields, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    saved = model.generation_config
    model.generation_config = config
    try:
        yield config
    finally:
        model.generation_config = saved


def left_padded_prompts(prompts: list[list[int]], pad_token_id: int):
    """Prompts batched for generation (left padding, so every row continues at the end)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p):] = torch.tensor(p)
        attention_mask[b, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def completions_from_generation(generated: torch.Tensor, prompt_width: int, stop_token_ids) -> list[list[int]]:
    """Per row, the new tokens up to and including the first stop token (any of
    ``stop_token_ids``, an id or a collection; later tokens dropped).

    Works on token positions, so a pad token equal to EOS is not a problem."""
    stops = {stop_token_ids} if isinstance(stop_token_ids, int) else set(stop_token_ids)
    completions = []
    for row in generated[:, prompt_width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        completions.append(row if end is None else row[: end + 1])
    return completions


class RowSeededSampling:
    """A logits processor that makes greedy decoding sample at ``temperature``, each row with
    its own generator: the Gumbel-max trick, argmax(logits / T + G) with G Gumbel(0, 1) noise,
    is a draw from softmax(logits / T). Row b's n-th token uses the n-th draw of
    ``seeds[b]``'s generator, whatever else is in the batch."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        exponential = torch.stack([torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g)
                                   for g in self.generators])
        return scores.float() / self.temperature - exponential.log()  # -log(Exp(1)) is Gumbel(0, 1)


def generate_completions(model, tokenizer, prompts: list[list[int]], device, *, do_sample: bool,
                         max_new_tokens: int, temperature: float = 1.0, seed: int | None = None,
                         row_seeds: list[int] | None = None, synced_gpus: bool | None = None) -> list[list[int]]:
    """``model``'s completions of ``prompts`` (token ids, up to and including a stop token),
    in evaluation mode (the mode it was in is restored). ``seed``: the torch seed set just
    before sampling. ``row_seeds`` (with ``do_sample``): one seed a prompt instead, each row
    sampled from its own generator. ``synced_gpus``: passed to ``generate`` (sharded models
    decode in step with the other processes until all are done); None leaves it to transformers."""
    from transformers import LogitsProcessorList

    if row_seeds is not None and (not do_sample or len(row_seeds) != len(prompts)):
        raise ValueError(f"row_seeds needs do_sample and one seed a prompt, got {len(row_seeds)} for {len(prompts)}")
    batch = {k: v.to(device) for k, v in left_padded_prompts(prompts, tokenizer.pad_token_id).items()}
    if seed is not None:
        torch.manual_seed(seed)
    processors = LogitsProcessorList([RowSeededSampling(row_seeds, temperature, device)] if row_seeds else [])
    was_training = model.training
    model.eval()
    # With row seeds the processor samples and generate takes the argmax of its scores.
    with torch.no_grad(), sampling(model, tokenizer, do_sample=do_sample and row_seeds is None,
                                   temperature=temperature, max_new_tokens=max_new_tokens) as config:
        generated = model.generate(**batch, generation_config=config, logits_processor=processors,
                                   synced_gpus=synced_gpus)
    model.train(was_training)
    return completions_from_generation(generated.cpu(), batch["input_ids"].shape[1], config.eos_token_id)
