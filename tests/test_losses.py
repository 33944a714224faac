"""losses.py: the generalized JSD against TRL and a float64 reference, stability, chunking, fusion."""

import math

import pytest
import torch

from losses import fused_linear_jsd_loss, generalized_jsd_loss

BETAS = [0.0, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]


def random_logits(seed, batch=3, seq=7, vocab=50, scale=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else 10 ** torch.empty(()).uniform_(-1, 1.5, generator=g).item()
    student = torch.randn(batch, seq, vocab, generator=g, dtype=dtype) * scale
    teacher = torch.randn(batch, seq, vocab, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    return student, teacher, labels


def reference_jsd(student_logits, teacher_logits, labels, beta, temperature, num_items=None):
    """float64, written from the definition in log space (no clamping, no chunks)."""
    s = torch.log_softmax(student_logits.double() / temperature, -1)
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)

    def kl(log_p, log_q):  # sum p (log p - log q), with 0 log 0 = 0
        return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)

    if beta == 0:
        per_token = kl(t, s)
    elif beta == 1:
        per_token = kl(s, t)
    else:
        m = torch.log((1 - beta) * s.exp() + beta * t.exp())
        m = torch.where(m > -math.inf, m, torch.logaddexp(s + math.log1p(-beta), t + math.log(beta)))
        per_token = beta * kl(t, m) + (1 - beta) * kl(s, m)
    mask = labels != -100
    total = per_token[mask].sum()
    return total / (num_items if num_items is not None else mask.sum())


def trl_jsd(*args, **kwargs):
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss(*args, **kwargs)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_trl_and_float64_reference(beta, temperature):
    for seed in range(3):
        student, teacher, labels = random_logits(seed + int(beta * 100) + int(temperature * 10))
        ours = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature, chunk_size=5)
        trl = trl_jsd(student, teacher, labels, beta=beta, temperature=temperature)
        ref = reference_jsd(student, teacher, labels, beta, temperature)
        torch.testing.assert_close(ours, trl, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_num_items_in_batch_normalises_by_the_global_token_count():
    student, teacher, labels = random_logits(11)
    ours = generalized_jsd_loss(student, teacher, labels, beta=0.5, num_items_in_batch=40)
    trl = trl_jsd(student, teacher, labels, beta=0.5, num_items_in_batch=40)
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, reference_jsd(student, teacher, labels, 0.5, 1.0, num_items=40), rtol=1e-6,
                               atol=0)


def test_micro_batches_with_global_count_sum_to_the_full_batch_loss():
    student, teacher, labels = random_logits(12, batch=4)
    count = (labels != -100).sum()
    full = generalized_jsd_loss(student, teacher, labels)
    parts = sum(generalized_jsd_loss(student[i:i + 1], teacher[i:i + 1], labels[i:i + 1], num_items_in_batch=count)
                for i in range(4))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck_on_a_tiny_vocabulary(beta):
    student, teacher, labels = random_logits(3, batch=2, seq=3, vocab=5, scale=2.0)
    student.requires_grad_()
    teacher.requires_grad_()

    def fn(s, t):
        return generalized_jsd_loss(s, t, labels, beta=beta, temperature=1.5, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (student, teacher))  # autograd inside each chunk
    teacher.requires_grad_(False)
    assert torch.autograd.gradcheck(fn, (student, teacher))  # the closed-form student gradient


@pytest.mark.parametrize("beta", BETAS)
def test_chunking_changes_neither_value_nor_gradient(beta):
    student, teacher, labels = random_logits(4, dtype=torch.float32)
    results = []
    for chunk_size in (1, 3, 1024):
        s = student.clone().requires_grad_()
        loss = generalized_jsd_loss(s, teacher, labels, beta=beta, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), s.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-9)


def test_gradient_matches_plain_autograd_through_trl():
    student, teacher, labels = random_logits(5)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    generalized_jsd_loss(s1, teacher, labels, beta=0.3, temperature=0.7).backward()
    trl_jsd(s2, teacher, labels, beta=0.3, temperature=0.7).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
def test_huge_logits_give_finite_loss_and_gradient(beta):
    student, teacher, labels = random_logits(6, scale=1e4, dtype=torch.float32)
    s = student.clone().requires_grad_()
    loss = generalized_jsd_loss(s, teacher, labels, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), reference_jsd(student, teacher, labels, beta, 1.0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_banned_tokens_at_minus_infinity_are_finite_and_exact(beta):
    student, teacher, labels = random_logits(7)
    banned = torch.zeros(student.shape[-1], dtype=torch.bool)
    banned[[0, 3, 17]] = True
    student[..., banned] = -math.inf
    teacher[..., banned] = -math.inf
    s = student.clone().requires_grad_()
    loss = generalized_jsd_loss(s, teacher, labels, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert (s.grad[..., banned] == 0).all()
    torch.testing.assert_close(loss, reference_jsd(student, teacher, labels, beta, 1.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fn", ["logits", "fused"])
def test_no_counted_position_gives_zero_with_zero_gradient(fn):
    student, teacher, labels = random_logits(8, dtype=torch.float32)
    labels[:] = -100
    if fn == "logits":
        s = student.clone().requires_grad_()
        loss = generalized_jsd_loss(s, teacher, labels)
    else:
        s = torch.randn(3, 7, 16, requires_grad=True)
        loss = fused_linear_jsd_loss(s, torch.randn(50, 16), torch.randn(3, 7, 16), torch.randn(50, 16), labels)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()
    empty = generalized_jsd_loss(torch.zeros(0, 50, requires_grad=True), torch.zeros(0, 50))
    assert empty.item() == 0.0


def test_normalize_divides_the_interior_by_beta_times_one_minus_beta():
    student, teacher, labels = random_logits(9)
    plain = generalized_jsd_loss(student, teacher, labels, beta=0.25)
    normalized = generalized_jsd_loss(student, teacher, labels, beta=0.25, normalize=True)
    torch.testing.assert_close(normalized, plain / (0.25 * 0.75), rtol=1e-12, atol=0)
    # Near agreement the normalized interior approaches the endpoints' scale.
    near = teacher + 1e-3 * torch.randn_like(teacher)
    forward_kl = generalized_jsd_loss(near, teacher, labels, beta=0.0)
    interior = generalized_jsd_loss(near, teacher, labels, beta=0.5, normalize=True)
    assert abs(interior / forward_kl - 1) < 0.01


def test_padded_vocabulary_is_an_error_unless_truncated():
    student, teacher, labels = random_logits(10)
    padded = torch.cat([student, torch.randn(3, 7, 14, dtype=student.dtype)], -1)
    with pytest.raises(ValueError, match=r"\[3, 7, 64\].*\[3, 7, 50\].*vocab_size"):
        generalized_jsd_loss(padded, teacher, labels)
    torch.testing.assert_close(generalized_jsd_loss(padded, teacher, labels, vocab_size=50),
                               generalized_jsd_loss(student, teacher, labels), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [({"beta": -0.1}, "beta must be in"), ({"beta": 1.5}, "beta must be in"),
                                             ({"temperature": 0.0}, "temperature must be > 0"),
                                             ({"chunk_size": 0}, "chunk_size")])
def test_bad_hyperparameters_are_rejected(kwargs, message):
    student, teacher, labels = random_logits(1)
    with pytest.raises(ValueError, match=message):
        generalized_jsd_loss(student, teacher, labels, **kwargs)
    hidden = torch.randn(3, 7, 8)
    with pytest.raises(ValueError, match=message):
        fused_linear_jsd_loss(hidden, torch.randn(50, 8), hidden, torch.randn(50, 8), labels, **kwargs)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_linear_matches_materialised_logits_in_value_and_gradients(beta):
    g = torch.Generator().manual_seed(13)
    hidden_s = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head_s = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    hidden_t = torch.randn(2, 9, 24, generator=g, dtype=torch.float64)  # teacher may be wider
    head_t = torch.randn(44, 24, generator=g, dtype=torch.float64)  # and its vocabulary padded
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :4] = -100
    fused = fused_linear_jsd_loss(hidden_s, head_s, hidden_t, head_t, labels, beta=beta, temperature=1.3,
                                  vocab_size=40, chunk_size=4)
    fused.backward()
    grads = hidden_s.grad.clone(), head_s.grad.clone()
    hidden_s.grad = head_s.grad = None
    reference = trl_jsd(hidden_s @ head_s.T, (hidden_t @ head_t.T)[..., :40], labels, beta=beta, temperature=1.3)
    reference.backward()
    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=0)
    torch.testing.assert_close(grads[0], hidden_s.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], head_s.grad, rtol=1e-9, atol=1e-12)


def test_fused_linear_vocabulary_mismatch_is_an_error():
    hidden = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\[40, 8\].*\[44, 8\].*vocab_size"):
        fused_linear_jsd_loss(hidden, torch.randn(40, 8), hidden, torch.randn(44, 8))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("normalize", [False, True])
def test_closed_form_student_gradient_equals_autograd(beta, normalize):
    student, teacher, labels = random_logits(14)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    closed = generalized_jsd_loss(s1, teacher, labels, beta=beta, temperature=0.8, normalize=normalize)
    autograd = generalized_jsd_loss(s2, teacher.clone().requires_grad_(), labels, beta=beta, temperature=0.8,
                                    normalize=normalize)
    closed.backward()
    autograd.backward()
    torch.testing.assert_close(closed, autograd, rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_losses_leave_their_inputs_untouched(beta):
    student, teacher, labels = random_logits(15, dtype=torch.float32)
    before = student.clone(), teacher.clone()
    generalized_jsd_loss(student.requires_grad_(), teacher, labels, beta=beta, temperature=0.7).backward()
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])
    hidden_s, head_s = torch.randn(2, 5, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    hidden_t, head_t = torch.randn(2, 5, 8), torch.randn(50, 8)
    before = [x.detach().clone() for x in (hidden_s, head_s, hidden_t, head_t)]
    fused_linear_jsd_loss(hidden_s, head_s, hidden_t, head_t, beta=beta, temperature=0.7).backward()
    for x, y in zip((hidden_s, head_s, hidden_t, head_t), before):
        assert torch.equal(x.detach(), y)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_float32_matches_trl_at_a_large_vocabulary(beta):
    """In float32 (what training uses) the in-place chunk arithmetic agrees with TRL's
    out-of-place functions: value to 1e-5 relative, gradient to 1e-5 of its largest entry."""
    student, teacher, labels = random_logits(16, batch=2, seq=40, vocab=20_000, scale=3.0, dtype=torch.float32)
    ours_input, trl_input = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = generalized_jsd_loss(ours_input, teacher, labels, beta=beta, chunk_size=7)
    reference = trl_jsd(trl_input, teacher, labels, beta=beta)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)
    scale = trl_input.grad.abs().max().item()  # float32 cancellation: tolerance relative to the largest entry
    torch.testing.assert_close(ours_input.grad, trl_input.grad, rtol=1e-4, atol=1e-5 * scale)


def test_bfloat16_student_with_float32_teacher_is_computed_in_float32():
    student, teacher, labels = random_logits(17, dtype=torch.float32, scale=2.0)
    student = student.bfloat16()
    ours_input, reference_input = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = generalized_jsd_loss(ours_input, teacher, labels, beta=0.5, chunk_size=4)
    reference = reference_jsd(reference_input.double(), teacher, labels, 0.5, 1.0)
    ours.backward()
    reference.backward()
    assert ours.dtype == torch.float32 and ours_input.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours_input.grad.double(), reference_input.grad.double(), rtol=2e-2, atol=1e-4)
    hidden_s = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    head_s = torch.randn(50, 8, dtype=torch.bfloat16, requires_grad=True)
    hidden_t, head_t = torch.randn(2, 5, 8), torch.randn(50, 8)
    fused = fused_linear_jsd_loss(hidden_s, head_s, hidden_t, head_t, beta=0.5, chunk_size=3)
    materialised = reference_jsd((hidden_s @ head_s.T).double(), hidden_t @ head_t.T, torch.zeros(2, 5), 0.5, 1.0)
    torch.testing.assert_close(fused.double(), materialised, rtol=2e-2, atol=0)  # bf16 head products may round apart
