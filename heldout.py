"""Held-out metrics of a student against its teacher, on prompts with reference completions.

* ``heldout_kl_sums``: KL(teacher || student) summed over the reference completions' tokens,
  teacher-forced. train.py's learning curve (``--eval-steps``, each process a share) and
  eval.py's ``--embedded`` row both use it.
* ``embedded_eval``: eval.py's ``--embedded`` metrics: that KL per token, and the teacher's
  NLL per token of the student's greedy completions (rollout.py).

The default set is the embedded held-out split (data.py).
"""

from __future__ import annotations

import torch

EMBEDDED_BATCH = 64  # prompts decoded together: each token reads every weight, so a larger batch costs little more
EMBEDDED_VERSION = 2  # in the row cache's key: version 1 generated in batches of 8 (other padding, other ties)
EMBEDDED_MAX_LENGTH = 512
KL_BATCH = 4  # sequences per forward of the held-out KL: sorted by length, small batches pad little
KL_ROWS = 256  # completion positions per KL chunk: [rows, vocab] stays cache-sized


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


def _kl_sums_of_batch(teacher, student, chunk, pad_token_id: int, max_length: int, device) -> tuple[float, int]:
    from data import build_batch
    from losses import IGNORE_INDEX, jsd_per_token

    forced = build_batch([e.prompt_ids for e in chunk], [e.completion_ids for e in chunk], pad_token_id, max_length)
    mask = (forced["labels"] != IGNORE_INDEX).to(device)
    inputs = {k: forced[k].to(device) for k in ("input_ids", "attention_mask")}
    student_logits, teacher_logits = completion_logits(student, inputs, mask), completion_logits(teacher, inputs, mask)
    kl_sum = 0.0
    for row in range(0, student_logits.shape[0], KL_ROWS):
        kl = jsd_per_token(student_logits[row:row + KL_ROWS], teacher_logits[row:row + KL_ROWS], beta=0.0)
        kl_sum += kl.double().sum().item()
    return kl_sum, int(mask.sum())


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
