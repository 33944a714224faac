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
of float32 per [chunk, vocab] tensor) and compute each chunk's gradient in the forward
pass (a custom autograd function), so the extra memory beyond the inputs and their
gradients is a few [chunk_size, vocab] tensors, never [tokens, vocab]. ``fused_linear_jsd_loss`` goes further and takes hidden states and head
weights: the full logits never exist. Neither supports double backward.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
# Default chunk: as many tokens as keep one [chunk, vocab] float32 tensor near 32 MiB
# (55 tokens at Qwen3's 151,936-token vocabulary, 170 at SmolLM2's 49,152).
CHUNK_ELEMENTS = 2**23


def resolve_chunk_size(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    return chunk_size


def _check_hyperparameters(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0 or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax in at least float32, with -inf (banned tokens) clamped to the most
    negative finite value: exp() of it is still 0, and no inf - inf reaches a gradient."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    return log_probs.clamp(min=torch.finfo(dtype).min)


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


def _jsd_chunk(student_logits, teacher_logits, weights, beta, temperature, normalize, need_grads):
    """(weighted loss of one chunk, [d loss / d logits for each of student, teacher whose
    `need_grads` flag is set, else None])."""
    if tuple(need_grads) == (True, False):
        return _jsd_chunk_student_grad(student_logits, teacher_logits, weights, beta, temperature, normalize)
    # Gradients for the teacher too (rare: the teacher is frozen in training): autograd.
    inputs = [x.detach().requires_grad_(need) for x, need in zip((student_logits, teacher_logits), need_grads)]
    with torch.set_grad_enabled(any(need_grads)):
        loss = (jsd_per_token(*inputs, beta, temperature, normalize) * weights).sum()
    wanted = [x for x, need in zip(inputs, need_grads) if need]
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    return loss.detach(), [next(grads) if need else None for need in need_grads]


@torch.no_grad()
def _jsd_chunk_student_grad(student_logits, teacher_logits, weights, beta, temperature, normalize):
    """The same value as ``jsd_per_token`` and its gradient w.r.t. the student logits in
    closed form, working in place (a handful of [chunk, vocab] tensors instead of the
    dozen autograd keeps). With s, t the log-probabilities, S = exp(s), L per token:
    beta = 0: (S - T) / temperature;  beta = 1: S (s - t - L) / temperature;
    interior: (1 - beta) S ((s - m) - KL(S || M)) / temperature, m = log M."""
    s = _log_probs(student_logits, temperature)
    t = _log_probs(teacher_logits, temperature)
    probs = s.exp()
    if beta == 0:
        teacher_probs = t.exp()
        per_token = (teacher_probs * (t - s)).sum(-1)
        grad = probs.sub_(teacher_probs)
    elif beta == 1:
        diff = s.sub_(t)
        per_token = (probs * diff).sum(-1)
        grad = diff.sub_(per_token[:, None]).mul_(probs)
    else:
        m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        kl_teacher = (t.exp() * t.sub_(m)).sum(-1)
        s_minus_m = s.sub_(m)
        kl_student = (probs * s_minus_m).sum(-1)
        per_token = beta * kl_teacher + (1 - beta) * kl_student
        grad = s_minus_m.sub_(kl_student[:, None]).mul_(probs).mul_(1 - beta)
        if normalize:
            per_token = per_token / (beta * (1 - beta))
            grad.div_(beta * (1 - beta))
    grad.mul_((weights / temperature)[:, None])
    return (per_token * weights).sum(), [grad, None]


class _ChunkedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, beta, temperature, normalize, chunk_size):
        vocab = student_logits.shape[-1]
        flat = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        need_grads = ctx.needs_input_grad[:2]
        grads = [torch.zeros_like(x) if need else None for x, need in zip(flat, need_grads)]
        total = torch.zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32),
                            device=student_logits.device)
        for rows in _counted_chunks(weights, chunk_size):
            loss, chunk_grads = _jsd_chunk(flat[0][rows], flat[1][rows], weights[rows], beta, temperature,
                                           normalize, need_grads)
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
        for rows in _counted_chunks(weights, chunk_size):
            h_s = student_hidden[rows]
            student_logits = h_s @ student_head.T
            teacher_logits = teacher_hidden[rows] @ teacher_head.T
            loss, (logits_grad, _) = _jsd_chunk(student_logits, teacher_logits, weights[rows], beta, temperature,
                                                normalize, (need_hidden_grad or need_weight_grad, False))
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
