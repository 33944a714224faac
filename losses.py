"""The generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), with TRL's semantics.

Per token, with S and T the student's and teacher's distributions after dividing the
logits by ``temperature``:

* beta = 0: forward KL(T || S);  beta = 1: reverse KL(S || T);
* 0 < beta < 1: beta * KL(T || M) + (1 - beta) * KL(S || M), M = (1 - beta) * S + beta * T,
  with the mixture formed in log space.

KL is summed over the vocabulary; positions whose label is -100 are ignored; the result
is the mean over the remaining positions, or their sum / ``num_items_in_batch`` when given
(the token count of the whole optimizer step, so gradient accumulation and data
parallelism see one normalisation).

Near agreement the interior value shrinks like beta * (1 - beta) * KL (e.g. TRL issue
6780): beta = 0.5 gives about a quarter of the endpoints' gradient. ``normalize=True``
(``--jsd-normalize``) divides the interior by beta * (1 - beta); it is off by default so
numbers reproduce TRL's.

Memory: both functions work over chunks of ``chunk_size`` tokens (default: about 32 MiB
of float32 per [chunk, vocab] tensor) in five buffers reused by every chunk, and compute
each chunk's gradient in the forward pass (a custom autograd function), so the extra
memory beyond the inputs and their gradients is five [chunk_size, vocab] tensors (six for
the fused loss), never [tokens, vocab]. ``fused_linear_jsd_loss`` goes further and takes
hidden states and head weights: the full logits never exist. Neither supports double
backward.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn

IGNORE_INDEX = -100
# Default chunk: as many tokens as keep one [chunk, vocab] float32 tensor near 32 MiB,
# rounded up to a multiple of CHUNK_ROWS (64 tokens at Qwen3's 151,936-token vocabulary,
# 192 at SmolLM2's 49,152): matrix-product kernels work in tiles of rows, and a row count
# that fills its last tile wastes none of the fused loss's head products.
CHUNK_ELEMENTS = 2**23
CHUNK_ROWS = 32


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
        return -(-rows // CHUNK_ROWS) * CHUNK_ROWS
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    return chunk_size


def _check_hyperparameters(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(logits: torch.Tensor, temperature: float, inplace: bool = False) -> torch.Tensor:
    """log-softmax in at least float32, with -inf (banned tokens) clamped to the most
    negative finite value: exp() of it is still 0, and no inf - inf reaches a gradient.
    ``inplace`` overwrites ``logits`` when it is already float32 or wider (same values)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if not inplace:
        return torch.log_softmax(logits.to(dtype) / temperature, dim=-1).clamp(min=torch.finfo(dtype).min)
    x = logits.to(dtype)
    if temperature != 1:
        x.div_(temperature)
    return torch.log_softmax(x, dim=-1, out=x).clamp_(min=torch.finfo(dtype).min)


def jsd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                  temperature: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """The generalized JSD of each position, shape ``logits.shape[:-1]`` (no masking)."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    jsd = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return jsd / (beta * (1 - beta)) if normalize else jsd


def _align(student_logits, teacher_logits, vocab_size):
    """Truncate both to ``vocab_size`` (padded vocabularies), else insist on equal shapes."""
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} differ; if one vocabulary is padded (Qwen pads its "
                         f"embedding), pass vocab_size=<the tokenizer's vocabulary size> to truncate both")
    return student_logits, teacher_logits


def _token_weights(labels, shape, num_items_in_batch, like: torch.Tensor):
    """Per-position weight: 1 / normaliser where counted, 0 where ignored (flattened)."""
    if labels is None:
        mask = torch.ones(shape, dtype=torch.bool, device=like.device)
    else:
        if tuple(labels.shape) != tuple(shape):
            raise ValueError(f"labels {list(labels.shape)} do not match the logits' positions {list(shape)}")
        mask = labels.to(like.device) != IGNORE_INDEX
    mask = mask.reshape(-1).to(torch.promote_types(like.dtype, torch.float32))
    if num_items_in_batch is None:
        denominator = mask.sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=like.device, dtype=mask.dtype)
        denominator = torch.where(denominator > 0, denominator, 1.0)  # no tokens anywhere: loss 0
    return mask / denominator


def _jsd_chunk(student_logits, teacher_logits, weights, beta, temperature, normalize, need_grads, workspace):
    """(weighted loss of one chunk, [d loss / d logits for each of student, teacher whose
    `need_grads` flag is set, else None]). The logits are chunk copies the caller owns and
    may be overwritten. With a ``workspace`` (three more buffers of their size; only when
    the student alone needs a gradient) the closed form runs."""
    if workspace is not None:
        return _jsd_chunk_student_grad(student_logits, teacher_logits, weights, beta, temperature, normalize,
                                       workspace)
    # Gradients for the teacher too (rare: the teacher is frozen in training): autograd.
    inputs = [x.detach().requires_grad_(need) for x, need in zip((student_logits, teacher_logits), need_grads)]
    with torch.set_grad_enabled(any(need_grads)):
        loss = (jsd_per_token(*inputs, beta, temperature, normalize) * weights).sum()
    wanted = [x for x, need in zip(inputs, need_grads) if need]
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    return loss.detach(), [next(grads) if need else None for need in need_grads]


@torch.no_grad()
def _jsd_chunk_student_grad(student_logits, teacher_logits, weights, beta, temperature, normalize, workspace):
    """The same value as ``jsd_per_token`` and its gradient w.r.t. the student logits in
    closed form, overwriting both inputs and working only in ``workspace`` (no [chunk,
    vocab] allocation). With s, t the log-probabilities, S = exp(s), L per token:
    beta = 0: (S - T) / temperature;  beta = 1: S (s - t - L) / temperature;
    interior: (1 - beta) S ((s - m) - KL(S || M)) / temperature, m = log M."""
    s = _log_probs(student_logits, temperature, inplace=True)
    t = _log_probs(teacher_logits, temperature, inplace=True)
    probs, m, scratch = (buffer[: s.shape[0]] for buffer in workspace)
    if beta == 0:
        teacher_probs = torch.exp(t, out=probs)
        per_token = t.sub_(s).mul_(teacher_probs).sum(-1)
        grad = s.exp_().sub_(teacher_probs)
    elif beta == 1:
        torch.exp(s, out=probs)
        diff = s.sub_(t)
        per_token = torch.mul(probs, diff, out=t).sum(-1)
        grad = diff.sub_(per_token[:, None]).mul_(probs)
    else:
        torch.exp(s, out=probs)
        torch.add(s, math.log1p(-beta), out=m)
        torch.logaddexp(m, torch.add(t, math.log(beta), out=scratch), out=m)
        teacher_probs = torch.exp(t, out=scratch)
        kl_teacher = teacher_probs.mul_(t.sub_(m)).sum(-1)
        s_minus_m = s.sub_(m)
        kl_student = torch.mul(probs, s_minus_m, out=scratch).sum(-1)
        per_token = beta * kl_teacher + (1 - beta) * kl_student
        grad = s_minus_m.sub_(kl_student[:, None]).mul_(probs).mul_(1 - beta)
        if normalize:
            per_token = per_token / (beta * (1 - beta))
            grad.div_(beta * (1 - beta))
    grad.mul_((weights / temperature)[:, None])
    return (per_token * weights).sum(), [grad, None]


def _chunk_buffers(dtypes, rows: int, vocab: int, device) -> list[torch.Tensor]:
    """One [rows, vocab] buffer per dtype, which every chunk of a call reuses: a fresh
    tensor per chunk costs page faults and fragments the host allocator, whose peak can
    then hold several chunks' worth instead of one."""
    return [torch.empty(rows, vocab, dtype=dtype, device=device) for dtype in dtypes]


def _workspace(need_grads, rows: int, vocab: int, dtype, device):
    """The three buffers of ``_jsd_chunk_student_grad`` when only the student needs a
    gradient (the closed form); None for the autograd path, which needs none."""
    return _chunk_buffers([dtype] * 3, rows, vocab, device) if tuple(need_grads) == (True, False) else None


class _ChunkedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, beta, temperature, normalize, chunk_size):
        vocab = student_logits.shape[-1]
        flat = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        need_grads = ctx.needs_input_grad[:2]
        grads = [torch.zeros_like(x) if need else None for x, need in zip(flat, need_grads)]
        total = torch.zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32),
                            device=student_logits.device)
        chunks = _counted_chunks(weights, chunk_size)
        rows_per_chunk = max((len(rows) for rows in chunks), default=0)
        chunk_inputs = _chunk_buffers([x.dtype for x in flat], rows_per_chunk, vocab, total.device)
        workspace = _workspace(need_grads, rows_per_chunk, vocab, total.dtype, total.device)
        for rows in chunks:
            student_chunk, teacher_chunk = (torch.index_select(x, 0, rows, out=buffer[: len(rows)])
                                            for x, buffer in zip(flat, chunk_inputs))
            loss, chunk_grads = _jsd_chunk(student_chunk, teacher_chunk, weights[rows], beta, temperature,
                                           normalize, need_grads, workspace)
            total += loss
            for grad, chunk_grad in zip(grads, chunk_grads):
                if grad is not None:
                    grad[rows] = chunk_grad.to(grad.dtype)
        ctx.save_for_backward(*grads)
        ctx.shapes = student_logits.shape, teacher_logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = [None if g is None else g.reshape(shape) for g, shape in zip(_scaled(ctx, grad_output), ctx.shapes)]
        return *grads, None, None, None, None, None


def _scaled(ctx, grad_output):
    """The gradients saved by the forward times the upstream gradient. For the usual
    ``loss.backward()`` (upstream 1) they are returned as they are: a scaled copy would
    double the peak memory."""
    saved = ctx.saved_tensors
    if bool(grad_output == 1):
        return list(saved)
    return [None if g is None else g * grad_output for g in saved]


def _counted_chunks(weights: torch.Tensor, chunk_size: int):
    """Index tensors of up to ``chunk_size`` counted positions (ignored ones are skipped)."""
    counted = weights.nonzero().squeeze(-1)
    return counted.split(chunk_size)


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None,
                         beta: float = 0.5, temperature: float = 1.0, num_items_in_batch=None,
                         normalize: bool = False, vocab_size: int | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Generalized JSD over [..., vocab] logits, masked by ``labels == -100``; a scalar.

    ``vocab_size`` truncates both logits (a padded vocabulary); ``chunk_size`` (tokens per
    chunk, default automatic) bounds the working memory and changes no value. A batch with no counted
    position returns 0 with zero gradient.
    """
    _check_hyperparameters(beta, temperature)
    student_logits, teacher_logits = _align(student_logits, teacher_logits, vocab_size)
    chunk_size = resolve_chunk_size(chunk_size, student_logits.shape[-1])
    weights = _token_weights(labels, student_logits.shape[:-1], num_items_in_batch, student_logits)
    return _ChunkedJSD.apply(student_logits, teacher_logits, weights, beta, temperature, normalize, chunk_size)


def _project(hidden, head, product_buffer, out):
    """``hidden @ head.T`` into ``out``, computed as ``head @ hidden.T`` (in the storage of
    ``product_buffer``, a chunk buffer) and copied back transposed: with the vocabulary as
    the product's rows a CPU GEMM at chunk sizes is the faster shape, and the transposed copy
    is small beside the product."""
    product = product_buffer.view(-1)[: head.shape[0] * hidden.shape[0]].view(head.shape[0], hidden.shape[0])
    torch.mm(head, hidden.T, out=product)
    return out.copy_(product.T)


class _FusedLinearJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, weights, beta,
                temperature, normalize, chunk_size, vocab_size):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden_grad = torch.zeros_like(student_hidden) if need_hidden_grad else None
        weight_grad = torch.zeros_like(student_weight) if need_weight_grad else None
        student_head = student_weight[:vocab_size]
        teacher_head = teacher_weight[:vocab_size]
        total = torch.zeros((), dtype=torch.promote_types(student_hidden.dtype, torch.float32),
                            device=student_hidden.device)
        chunks = _counted_chunks(weights, chunk_size)
        rows_per_chunk = max((len(rows) for rows in chunks), default=0)
        need_grads = (need_hidden_grad or need_weight_grad, False)
        vocab = student_head.shape[0]
        chunk_logits = _chunk_buffers([student_hidden.dtype, teacher_hidden.dtype], rows_per_chunk, vocab,
                                      total.device)
        workspace = _workspace(need_grads, rows_per_chunk, vocab, total.dtype, total.device)
        product_dtypes = {student_hidden.dtype, teacher_hidden.dtype}
        products = dict(zip(product_dtypes, _chunk_buffers(product_dtypes, rows_per_chunk, vocab, total.device)))
        for rows in chunks:
            h_s = student_hidden[rows]
            student_logits = _project(h_s, student_head, products[h_s.dtype], chunk_logits[0][: len(rows)])
            h_t = teacher_hidden[rows]
            teacher_logits = _project(h_t, teacher_head, products[h_t.dtype], chunk_logits[1][: len(rows)])
            loss, (logits_grad, _) = _jsd_chunk(student_logits, teacher_logits, weights[rows], beta, temperature,
                                                normalize, need_grads, workspace)
            total += loss
            if logits_grad is None:
                continue
            logits_grad = logits_grad.to(h_s.dtype)
            if need_hidden_grad:
                hidden_grad[rows] = logits_grad @ student_head
            if need_weight_grad:  # in place: a [vocab, hidden] temporary per chunk would cost its size again
                weight_grad[: student_head.shape[0]].addmm_(logits_grad.T, h_s)
        ctx.save_for_backward(hidden_grad, weight_grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        hidden_grad, weight_grad = _scaled(ctx, grad_output)
        return hidden_grad, weight_grad, None, None, None, None, None, None, None, None


def fused_linear_jsd_loss(student_hidden: torch.Tensor, student_lm_head_weight: torch.Tensor,
                          teacher_hidden: torch.Tensor, teacher_lm_head_weight: torch.Tensor, labels=None,
                          beta: float = 0.5, temperature: float = 1.0, num_items_in_batch=None,
                          normalize: bool = False, vocab_size: int | None = None,
                          chunk_size: int | None = None) -> torch.Tensor:
    """``generalized_jsd_loss`` of ``hidden @ lm_head_weight.T`` without materialising the logits.

    Hidden states are [..., hidden] (the final-norm output the head sees); the heads are
    [vocab, hidden] without bias, and may differ in hidden size. Gradients reach the
    student's hidden states and head weight; the teacher is treated as constant.
    """
    _check_hyperparameters(beta, temperature)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {list(student_hidden.shape)} and teacher hidden "
                         f"{list(teacher_hidden.shape)} cover different positions")
    student_vocab, teacher_vocab = student_lm_head_weight.shape[0], teacher_lm_head_weight.shape[0]
    if vocab_size is None and student_vocab != teacher_vocab:
        raise ValueError(f"student head {list(student_lm_head_weight.shape)} and teacher head "
                         f"{list(teacher_lm_head_weight.shape)} have different vocabularies; if one is "
                         f"padded, pass vocab_size=<the tokenizer's vocabulary size> to truncate both")
    vocab_size = min(student_vocab, teacher_vocab, vocab_size or student_vocab)
    chunk_size = resolve_chunk_size(chunk_size, vocab_size)
    positions = student_hidden.shape[:-1]
    weights = _token_weights(labels, positions, num_items_in_batch, student_hidden)
    return _FusedLinearJSD.apply(student_hidden.reshape(-1, student_hidden.shape[-1]), student_lm_head_weight,
                                 teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(),
                                 teacher_lm_head_weight.detach(), weights, beta, temperature, normalize,
                                 chunk_size, vocab_size)


# ---------------------------------------------------------------- heads

@contextmanager
def hidden_states_instead_of_logits(model):
    """Within the block the model's forward returns its final hidden states as `logits`
    (the head is swapped for Identity), and yields the head weight: the fused loss then
    never builds [tokens, vocab] logits. Goes through the wrapper's forward, so DDP
    gradient synchronisation is untouched."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head.weight
    finally:
        model.set_output_embeddings(head)


def supports_fused_loss(model) -> bool:
    head = model.get_output_embeddings()
    config = model.config
    return (isinstance(head, nn.Linear) and head.bias is None
            and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logit_scale", None))


# ---------------------------------------------------------------- the training loss

class DistillationLoss:
    """What train.py minimises on one batch: the teacher's forward (no gradients), the
    student's, and the generalized JSD over the batch's completion tokens (``labels`` not
    -100), summed and divided by ``num_items`` (the step's token count).

    When ``fused`` and both models allow it (a bias-free linear head, no softcapping or logit
    scale), the models return hidden states and the fused loss projects them chunk by chunk
    through their heads, so [tokens, vocab] logits never exist; otherwise the models' logits
    go to ``generalized_jsd_loss``. Both give the same loss and gradients. ``student`` is the
    module to call (a DDP wrapper keeps its gradient synchronisation); the head swap acts on
    the model inside it. ``teacher_seconds``: the last call's teacher forward time.
    """

    def __init__(self, student, teacher, *, beta: float, temperature: float = 1.0, normalize: bool = False,
                 vocab_size: int | None = None, chunk_size: int | None = None, fused: bool = True):
        from accelerate.utils import extract_model_from_parallel

        _check_hyperparameters(beta, temperature)
        self.student, self.teacher = student, teacher
        self.student_model = extract_model_from_parallel(student)
        self.fused = fused and supports_fused_loss(self.student_model) and supports_fused_loss(teacher)
        self.settings = {"beta": beta, "temperature": temperature, "normalize": normalize, "vocab_size": vocab_size,
                         "chunk_size": chunk_size}
        self.teacher_seconds = 0.0

    def __call__(self, batch: dict, num_items) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        started = time.perf_counter()
        if not self.fused:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            self.teacher_seconds = time.perf_counter() - started
            return generalized_jsd_loss(self.student(**inputs).logits, teacher_logits, batch["labels"],
                                        num_items_in_batch=num_items, **self.settings)
        with torch.no_grad(), hidden_states_instead_of_logits(self.teacher) as teacher_head:
            teacher_hidden = self.teacher(**inputs).logits
        self.teacher_seconds = time.perf_counter() - started
        with hidden_states_instead_of_logits(self.student_model) as student_head:
            student_hidden = self.student(**inputs).logits
        return fused_linear_jsd_loss(student_hidden, student_head, teacher_hidden, teacher_head, batch["labels"],
                                     num_items_in_batch=num_items, **self.settings)
