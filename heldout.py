"""Held-out metrics of a student against its teacher, on prompts with reference completions.

* ``heldout_kl_sums``: KL(teacher || student) summed over the reference completions' tokens,
  teacher-forced. train.py's learning curve (``--eval-steps``, each process a share) and
  eval.py's ``--embedded`` row both use it.
* ``embedded_eval``: eval.py's ``--embedded`` metrics: that KL per token, and the teacher's
  NLL per token of the student's greedy completions (rollout.py).
* ``exposure_curve``: the same two measures on the student's own *sampled* continuations,
  by position in the continuation (exposure bias: errors that compound in the student's
  own text), per prompt, for eval.py's ``--embedded`` rows.

The default set is the embedded held-out split (data.py).
"""

from __future__ import annotations

import math
import statistics

import torch

EMBEDDED_BATCH = 64  # prompts decoded together: each token reads every weight, so a larger batch costs little more
EMBEDDED_VERSION = 2  # in the row cache's key: version 1 generated in batches of 8 (other padding, other ties)
EMBEDDED_MAX_LENGTH = 512
KL_BATCH = 4  # sequences per forward of the held-out KL: sorted by length, small batches pad little
KL_ROWS = 256  # completion positions per KL chunk: [rows, vocab] stays cache-sized
EXPOSURE_VERSION = 1  # in the row cache's key of the exposure-bias curve
SAMPLE_TEMPERATURE = 1.0  # the student's own distribution, unchanged


def completion_logits(model, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """The logits at the masked positions only, [positions, vocab]: the head runs on those
    hidden states alone (prompt and padding positions never reach it)."""
    from torch.distributed.tensor import DTensor

    from losses import hidden_states_instead_of_logits, supports_fused_loss

    # A head with softcapping or a scale, or one sharded by FSDP (only the model's own forward
    # gathers it): the model's own logits.
    if not supports_fused_loss(model) or isinstance(model.get_output_embeddings().weight, DTensor):
        return model(**inputs).logits[mask]
    with hidden_states_instead_of_logits(model) as head:
        hidden = model(**inputs).logits[mask]
    return torch.nn.functional.linear(hidden, head)


def _per_token_scores(teacher, student, chunk, pad_token_id: int, max_length: int, device,
                      nll: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Teacher-forced on the examples' completions: KL(teacher || student) at every completion
    token (float32, the examples' tokens one after the other), with ``nll`` the teacher's NLL
    of each token, and each example's token count. The teacher as its own student runs once."""
    from data import build_batch
    from losses import IGNORE_INDEX, jsd_per_token

    forced = build_batch([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk], pad_token_id, max_length)
    mask = (forced["labels"] != IGNORE_INDEX).to(device)
    inputs = {k: forced[k].to(device) for k in ("input_ids", "attention_mask")}
    student_logits = completion_logits(student, inputs, mask)
    teacher_logits = student_logits if student is teacher else completion_logits(teacher, inputs, mask)
    kl = torch.cat([jsd_per_token(student_logits[row:row + KL_ROWS], teacher_logits[row:row + KL_ROWS], beta=0.0)
                    for row in range(0, student_logits.shape[0], KL_ROWS)])
    teacher_nll = torch.nn.functional.cross_entropy(teacher_logits.float(), forced["labels"].to(device)[mask],
                                                    reduction="none") if nll else None
    return kl, teacher_nll, mask.sum(1).tolist()


def _kl_sums_of_batch(teacher, student, chunk, pad_token_id: int, max_length: int, device) -> tuple[float, int]:
    kl, _, lengths = _per_token_scores(teacher, student, chunk, pad_token_id, max_length, device)
    return sum(part.double().sum().item() for part in kl.split(KL_ROWS)), sum(lengths)


@torch.no_grad()
def heldout_kl_sums(teacher, student, examples, pad_token_id: int, max_length: int = EMBEDDED_MAX_LENGTH,
                    batch_size: int = KL_BATCH, forward_batches: int | None = None, filler=None) -> tuple[float, int]:
    """(sum over completion tokens of KL(teacher || student), token count), teacher-forced on
    the examples' reference completions. Sums, so that processes can add theirs.

    ``forward_batches``: run exactly that many forwards, those beyond the examples' own on
    ``filler`` (an example) with their result discarded. Under FSDP each forward all-gathers
    the student's shards, so every process must run as many as the others."""
    device = next(student.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e.prompt_ids) + len(e.completion_ids))  # less padding
    chunks = [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]
    padding = 0 if forward_batches is None else forward_batches - len(chunks)
    if padding < 0 or (padding and filler is None):
        raise ValueError(f"{len(chunks)} batches of held-out examples cannot make {forward_batches} forwards")
    kl_sum, tokens = 0.0, 0
    for chunk in chunks:
        batch_kl, batch_tokens = _kl_sums_of_batch(teacher, student, chunk, pad_token_id, max_length, device)
        kl_sum, tokens = kl_sum + batch_kl, tokens + batch_tokens
    for _ in range(padding):  # weight 0: only the forward's collectives count
        _kl_sums_of_batch(teacher, student, [filler], pad_token_id, max_length, device)
    return kl_sum, tokens


def heldout_examples(tokenizer, dataset: str | None = None, split: str = "heldout",
                     max_length: int = EMBEDDED_MAX_LENGTH, limit: int | None = None):
    """The held-out prompts and reference completions (default: the embedded held-out set)."""
    from data import load_records, prepare_examples

    return prepare_examples(load_records(dataset, split), tokenizer, max_length=max_length)[:limit]


@torch.no_grad()
def embedded_eval(teacher, student, tokenizer, max_new_tokens: int = 64, limit: int | None = None,
                  batch_size: int = EMBEDDED_BATCH) -> dict:
    """KL(teacher || student) per completion token on teacher-forced held-out responses, and
    the teacher's NLL per token of the student's greedy completions. For the teacher itself
    the KL is 0 and the NLL is the floor of that metric (its own greedy completions)."""
    from data import build_batch
    from losses import IGNORE_INDEX
    from quant import frozen_quant
    from rollout import generate_completions

    examples = heldout_examples(tokenizer, limit=limit)
    device = next(student.parameters()).device
    by_prompt_length = sorted(examples, key=lambda e: len(e.prompt_ids))  # batches with little left padding
    with frozen_quant(student):  # quantize once, not once per generated token
        kl_sum, tokens_kl = heldout_kl_sums(teacher, student, examples, tokenizer.pad_token_id)
        nll_sum = tokens_nll = 0.0
        for start in range(0, len(by_prompt_length), batch_size):
            prompts = [e.prompt_ids for e in by_prompt_length[start:start + batch_size]]
            completions = generate_completions(student, tokenizer, prompts, device, do_sample=False,
                                               max_new_tokens=max_new_tokens)
            scored = build_batch(prompts, completions, tokenizer.pad_token_id, EMBEDDED_MAX_LENGTH + max_new_tokens)
            mask = (scored["labels"] != IGNORE_INDEX).to(device)
            logits = completion_logits(teacher, {k: scored[k].to(device) for k in ("input_ids", "attention_mask")},
                                       mask)
            nll_sum += torch.nn.functional.cross_entropy(logits.float(), scored["labels"].to(device)[mask],
                                                         reduction="sum").item()
            tokens_nll += int(mask.sum())
    return {"heldout_kl": kl_sum / max(tokens_kl, 1), "teacher_nll_of_student": nll_sum / max(tokens_nll, 1)}


def position_buckets(max_new_tokens: int) -> list[tuple[int, int]]:
    """(first, last) positions in a continuation (1: its first token) of the buckets that
    ``max_new_tokens`` reaches: 1-32, 33-64, then doubling (65-128, 129-256, 257-512, ...)."""
    buckets, first, last = [], 1, 32
    while first <= max_new_tokens:
        buckets.append((first, last))
        first, last = last + 1, 2 * last
    return buckets


def sample_seed(prompt_index: int, sample_index: int) -> int:
    """The seed of one sampled continuation: a function of the prompt's place in the held-out
    set and the sample's number alone, so every row (and a ``--limit`` run) draws with the
    same seeds."""
    return 1_000_003 * prompt_index + sample_index


def _draw_batches(draws: list, batch_size: int) -> list[list]:
    """``draws`` in consecutive batches of equal size (at most ``batch_size``): 76 draws at 64
    make two batches of 38, not 64 and 12 decoding as many steps."""
    count = -(-len(draws) // batch_size)
    size = -(-len(draws) // count) if draws else 1
    return [draws[start:start + size] for start in range(0, len(draws), size)]


@torch.no_grad()
def exposure_curve(teacher, student, tokenizer, max_new_tokens: int = 64, samples_per_prompt: int = 2,
                   limit: int | None = None, batch_size: int = EMBEDDED_BATCH,
                   temperature: float = SAMPLE_TEMPERATURE) -> dict:
    """The exposure-bias curve: the student samples ``samples_per_prompt`` continuations of
    each held-out prompt (up to ``max_new_tokens``, each from its own seed, ``sample_seed``),
    and each is scored teacher-forced: KL(teacher || student) at each token, as the held-out
    KL, and the teacher's NLL of the sampled token. Both by position bucket
    (``position_buckets``; a continuation's tokens up to and including its stop token).

    Per bucket: each prompt's mean over its samples' tokens there, the mean of those over the
    prompts that reach the bucket with a bootstrap 95% CI over prompts (report.bootstrap_ci),
    the token and prompt counts, and ``sample_sd``: the spread between one prompt's samples
    (root mean over prompts of the variance of its samples' means). For the teacher itself
    the KL is 0 and the NLL is the floor: the teacher's NLL of its own samples."""
    from data import Example
    from quant import frozen_quant
    from report import bootstrap_ci
    from rollout import generate_completions

    examples = heldout_examples(tokenizer, limit=limit)
    device = next(student.parameters()).device
    buckets = position_buckets(max_new_tokens)
    bucket_of = torch.tensor([b for b, (first, last) in enumerate(buckets) for _ in range(first, last + 1)])
    draws = sorted(((p, s) for p in range(len(examples)) for s in range(samples_per_prompt)),
                   key=lambda draw: len(examples[draw[0]].prompt_ids))  # batches with little left padding
    sums = torch.zeros(2, len(examples), samples_per_prompt, len(buckets), dtype=torch.float64)  # KL, NLL
    counts = torch.zeros(len(examples), samples_per_prompt, len(buckets), dtype=torch.float64)
    with frozen_quant(student):  # quantize once, not once per generated token
        samples = []
        for batch in _draw_batches(draws, batch_size):
            completions = generate_completions(student, tokenizer, [examples[p].prompt_ids for p, _ in batch], device,
                                               do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                                               row_seeds=[sample_seed(p, s) for p, s in batch])
            samples += [(draw, Example(examples[draw[0]].prompt_ids, c)) for draw, c in zip(batch, completions)]
        samples.sort(key=lambda sample: len(sample[1].prompt_ids) + len(sample[1].completion_ids))  # less padding
        for start in range(0, len(samples), KL_BATCH):
            chunk = samples[start:start + KL_BATCH]
            kl, nll, lengths = _per_token_scores(teacher, student, [e for _, e in chunk], tokenizer.pad_token_id,
                                                 EMBEDDED_MAX_LENGTH + max_new_tokens, device, nll=True)
            for ((p, s), _), kl_tokens, nll_tokens in zip(chunk, kl.split(lengths), nll.split(lengths)):
                where = bucket_of[:len(kl_tokens)]
                sums[0, p, s].index_add_(0, where, kl_tokens.double().cpu())
                sums[1, p, s].index_add_(0, where, nll_tokens.double().cpu())
                counts[p, s].index_add_(0, where, torch.ones(len(where), dtype=torch.float64))

    def summary(metric: torch.Tensor) -> dict:
        curve = {}
        for b, (first, last) in enumerate(buckets):
            per_prompt, variances = [], []
            for p in range(len(examples)):
                tokens = counts[p, :, b]
                per_prompt.append((metric[p, :, b].sum() / tokens.sum()).item() if tokens.sum() else None)
                sample_means = (metric[p, :, b][tokens > 0] / tokens[tokens > 0]).tolist()
                if len(sample_means) >= 2:
                    variances.append(statistics.variance(sample_means))
            values = [v for v in per_prompt if v is not None]
            low, high = bootstrap_ci(values) if values else (None, None)
            curve[f"{first}-{last}"] = {
                "mean": statistics.fmean(values) if values else None, "ci_low": low, "ci_high": high,
                "tokens": int(counts[:, :, b].sum()), "prompts": len(values),
                "sample_sd": math.sqrt(statistics.fmean(variances)) if variances else None, "per_prompt": per_prompt}
        return curve

    return {"max_new_tokens": max_new_tokens, "samples_per_prompt": samples_per_prompt, "temperature": temperature,
            "prompts": len(examples), "tokens": int(counts.sum()), "kl": summary(sums[0]),
            "teacher_nll": summary(sums[1])}
