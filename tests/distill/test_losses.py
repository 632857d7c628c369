"""KD / CE losses against direct float64 computations: masking, garbage padding, chunking, gradients, top-k tails."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from speechlm_eval.distill.losses import (
    TopK,
    _masked_sum,
    ce_loss,
    kd_loss,
    topk_from_logits,
)

KINDS = ["forward_kl", "reverse_kl", "jsd"]
B, T, V = 3, 6, 17


def make_batch(seed: int = 0, vocab: int = V, spread: float = 3.0):
    """Student/teacher logits (B, T, V) float32, a ragged right-aligned mask, garbage at every unmasked position."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, vocab, generator=gen) * spread
    teacher = torch.randn(B, T, vocab, generator=gen) * spread
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, n in enumerate([T, 4, 1]):
        mask[row, T - n :] = True
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30])
    for i, (b, t) in enumerate((~mask).nonzero().tolist()):
        student[b, t] = garbage[i % 4]
        teacher[b, t] = garbage[(i + 1) % 4]
    return student, teacher, mask


def naive_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Explicit float64 sums, per row."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)


def naive_kd(student, teacher, mask, kind, tau, beta=0.5):
    s, t = student[mask].double() / tau, teacher[mask].double() / tau
    return tau**2 * naive_divergence(t.log_softmax(-1), s.log_softmax(-1), kind, beta).mean()


def grad_of(fn, student):
    leaf = student.detach().clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def test_forward_kl_equals_torch_kl_div_and_padding_does_not_leak():
    student, teacher, mask = make_batch()
    got = kd_loss(student, teacher, mask, temperature=1.0)
    expected = F.kl_div(
        student[mask].double().log_softmax(-1), teacher[mask].double().log_softmax(-1), log_target=True,
        reduction="batchmean",
    )
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 3, 11, 10_000])  # 11 = every masked token in one chunk
def test_value_and_gradient_match_float64_autograd_for_every_chunk_size(kind, tau, chunk_size):
    student, teacher, mask = make_batch(seed=1)
    assert int(mask.sum()) == 11
    value, grad = grad_of(lambda s: kd_loss(s, teacher, mask, kind=kind, temperature=tau, chunk_size=chunk_size),
                          student)
    ref_value, ref_grad = grad_of(lambda s: naive_kd(s, teacher, mask, kind, tau), student.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    expected = torch.where(mask.unsqueeze(-1), ref_grad, torch.zeros_like(ref_grad)).float()
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.9])
def test_jsd_with_any_beta_matches_float64(beta):
    student, teacher, mask = make_batch(seed=14)
    value, grad = grad_of(lambda s: kd_loss(s, teacher, mask, kind="jsd", beta=beta, chunk_size=4), student)
    ref_value, ref_grad = grad_of(lambda s: naive_kd(s, teacher, mask, "jsd", 2.0, beta), student.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradient_equals_unchunked(kind):
    student, teacher, mask = make_batch(seed=2)
    grads = [grad_of(partial(kd_loss, teacher=teacher, mask=mask, kind=kind, chunk_size=c), student)[1]
             for c in (1, 3, 1000)]
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-6, atol=1e-7)


def test_no_chunk_ever_holds_more_than_chunk_size_tokens():
    student, _, mask = make_batch()
    seen: list[int] = []

    def record(chunk: torch.Tensor) -> torch.Tensor:
        seen.append(chunk.shape[0])
        return chunk.logsumexp(-1)

    total, n = _masked_sum(student.requires_grad_(True), mask, record, (), chunk_size=3)
    assert n == 11 and seen == [3, 3, 3, 2]
    torch.testing.assert_close(total, student.detach()[mask].logsumexp(-1).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_multiplies_the_softened_divergence_by_tau_squared(kind):
    student, teacher, mask = make_batch(seed=3)
    at_two = kd_loss(student, teacher, mask, kind=kind, temperature=2.0)
    softened_at_one = kd_loss(student / 2, teacher / 2, mask, kind=kind, temperature=1.0)
    torch.testing.assert_close(at_two, 4 * softened_at_one, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(at_two, kd_loss(student, teacher, mask, kind=kind, temperature=1.0))


def test_jsd_is_symmetric_at_half_and_reverse_kl_swaps_roles():
    student, teacher, mask = make_batch(seed=4)
    jsd = kd_loss(student, teacher, mask, kind="jsd", beta=0.5)
    torch.testing.assert_close(jsd, kd_loss(teacher, student, mask, kind="jsd", beta=0.5))
    assert not torch.isclose(
        kd_loss(student, teacher, mask, kind="jsd", beta=0.2), kd_loss(teacher, student, mask, kind="jsd", beta=0.2)
    )
    torch.testing.assert_close(
        kd_loss(student, teacher, mask, kind="reverse_kl"), kd_loss(teacher, student, mask, kind="forward_kl")
    )
    assert 0 < jsd < 4 * math.log(2)  # JSD(0.5) ≤ ln 2 per token, times τ² = 4


def test_identical_distributions_give_zero_loss_and_zero_gradient():
    student, _, mask = make_batch(seed=5)
    for kind in KINDS:
        shifted = student + 7.0  # the same softmax
        value, grad = grad_of(partial(kd_loss, teacher=shifted, mask=mask, kind=kind), student)
        assert abs(float(value)) < 1e-5 and grad.abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_returns_zero_with_a_zero_gradient(kind):
    student, teacher, _ = make_batch()
    student = torch.full_like(student, math.nan)  # nothing may be read
    empty = torch.zeros(B, T, dtype=torch.bool)
    value, grad = grad_of(lambda s: kd_loss(s, teacher, empty, kind=kind), student)
    assert value == 0 and (grad == 0).all()
    value, grad = grad_of(lambda s: ce_loss(s, torch.zeros(B, T, dtype=torch.long), empty), student)
    assert value == 0 and (grad == 0).all()


def test_teacher_gets_no_gradient_and_no_grad_mode_builds_no_graph():
    student, teacher, mask = make_batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, mask).backward()
    assert teacher.grad is None and student.grad is not None
    with torch.no_grad():
        assert kd_loss(student, teacher, mask).grad_fn is None


def test_bfloat16_logits_get_a_bfloat16_gradient_close_to_float64():
    student, teacher, mask = make_batch(seed=6)
    value, grad = grad_of(lambda s: kd_loss(s, teacher.bfloat16(), mask), student.bfloat16())
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref_value, ref_grad = grad_of(
        lambda s: naive_kd(s, teacher.bfloat16().double(), mask, "forward_kl", 2.0), student.bfloat16().double()
    )
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=2e-2, atol=1e-3)


# -- top-k teacher ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_full_loss(kind, tail, tau):
    student, teacher, mask = make_batch(seed=7)
    clean = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    top = topk_from_logits(clean, V)
    full_value, full_grad = grad_of(lambda s: kd_loss(s, teacher, mask, kind=kind, temperature=tau), student)
    value, grad = grad_of(lambda s: kd_loss(s, top, mask, kind=kind, temperature=tau, topk_tail=tail), student)
    torch.testing.assert_close(value, full_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-6)


def topk_reference(student, teacher, mask, k):
    """float64 pieces of a top-k teacher: masked rows, kept ids, teacher log-probs at τ=1 and its rest mass."""
    s, t = student[mask].double(), teacher[mask].double()
    log_p1 = t.log_softmax(-1)
    ids = log_p1.topk(k, -1).indices
    kept = torch.zeros_like(log_p1, dtype=torch.bool).scatter(-1, ids, True)
    rest = log_p1.masked_fill(kept, -math.inf).logsumexp(-1)
    return s, log_p1, ids, kept, rest


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_bucket_equals_the_full_divergence_against_the_student_tail_completed_teacher(kind, tau):
    student, teacher, mask = make_batch(seed=8)
    clean = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    top = topk_from_logits(clean, 5)

    def reference(s_full):
        s, log_p1, _, kept, rest = topk_reference(s_full, teacher, mask, 5)
        with torch.no_grad():  # the completion is a constant target
            log_q1 = s.log_softmax(-1)
            q1_tail = log_q1.masked_fill(kept, -math.inf).logsumexp(-1, keepdim=True)
            log_completed = torch.where(kept, log_p1, rest.unsqueeze(-1) + log_q1 - q1_tail)
            log_p = (log_completed / tau).log_softmax(-1)
        return tau**2 * naive_divergence(log_p, (s / tau).log_softmax(-1), kind).mean()

    value, grad = grad_of(lambda s: kd_loss(s, top, mask, kind=kind, temperature=tau, topk_tail="bucket"), student)
    ref_value, ref_grad = grad_of(reference, student.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_bucket_at_tau_one_is_the_exact_k_plus_one_class_divergence(kind):
    student, teacher, mask = make_batch(seed=9)
    clean = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    s, log_p1, ids, kept, rest = topk_reference(student, teacher, mask, 4)
    log_q = s.log_softmax(-1)
    log_p_coarse = torch.cat([log_p1.gather(-1, ids), rest.unsqueeze(-1)], -1)
    log_q_rest = log_q.masked_fill(kept, -math.inf).logsumexp(-1, keepdim=True)
    log_q_coarse = torch.cat([log_q.gather(-1, ids), log_q_rest], -1)
    expected = naive_divergence(log_p_coarse, log_q_coarse, kind).mean()
    got = kd_loss(student, topk_from_logits(clean, 4), mask, kind=kind, temperature=1.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    if kind == "forward_kl":  # coarsening can only lose divergence
        assert got < kd_loss(student, teacher, mask, kind=kind, temperature=1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_renormalize_is_the_divergence_on_the_kept_ids(kind, tau):
    student, teacher, mask = make_batch(seed=10)
    clean = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))

    def reference(s_full):
        s, log_p1, ids, _, _ = topk_reference(s_full, teacher, mask, 6)
        log_p = (log_p1.gather(-1, ids) / tau).log_softmax(-1)
        log_q = (s.gather(-1, ids) / tau).log_softmax(-1)
        return tau**2 * naive_divergence(log_p, log_q, kind).mean()

    top = topk_from_logits(clean, 6)
    value, grad = grad_of(lambda s: kd_loss(s, top, mask, kind=kind, temperature=tau, topk_tail="renormalize"),
                          student)
    ref_value, ref_grad = grad_of(reference, student.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=1e-4, atol=1e-6)
    kept = torch.zeros(B, T, V, dtype=torch.bool).scatter(-1, top.indices, True)
    assert (grad[mask.unsqueeze(-1) & ~kept] == 0).all()  # the tail is invisible to this loss


def test_topk_without_rest_mass_derives_it_from_the_logprobs():
    student, teacher, mask = make_batch(seed=11)
    clean = torch.where(mask.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    top = topk_from_logits(clean, 5)
    derived = TopK(top.logprobs, top.indices)
    for tau in (1.0, 2.0):
        torch.testing.assert_close(kd_loss(student, derived, mask, temperature=tau),
                                   kd_loss(student, top, mask, temperature=tau), rtol=1e-4, atol=1e-6)


def test_topk_refuses_a_mask_outside_its_data_and_ids_past_the_vocabulary():
    student, teacher, mask = make_batch()
    top = topk_from_logits(torch.nan_to_num(teacher, nan=0.0, posinf=0.0, neginf=0.0), 4)
    partial = TopK(top.logprobs, top.indices, top.rest_logprob, mask & (torch.arange(T) > 2))
    with pytest.raises(ValueError, match="no data"):
        kd_loss(student, partial, mask)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(student[..., : V - 1], TopK(top.logprobs, top.indices.clamp_min(V - 1)), mask)


def test_bad_options_are_refused():
    student, teacher, mask = make_batch()
    for kwargs in ({"kind": "kl"}, {"temperature": 0.0}, {"kind": "jsd", "beta": 1.0}, {"topk_tail": "drop"},
                   {"chunk_size": 0}):
        with pytest.raises(ValueError):
            kd_loss(student, teacher, mask, **kwargs)
    with pytest.raises(ValueError, match="align_logits"):
        kd_loss(student, teacher[..., :-1], mask)


# -- CE and per-token diagnostics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_ce_matches_cross_entropy_with_garbage_targets_at_padding(chunk_size):
    student, _, mask = make_batch(seed=12)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    targets[~mask] = 10**6  # out of range: would fail if read
    value, grad = grad_of(lambda s: ce_loss(s, targets, mask, chunk_size=chunk_size), student)
    ref_value, ref_grad = grad_of(lambda s: F.cross_entropy(s[mask], targets[mask]), student.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=1e-4, atol=1e-6)
    assert (grad[~mask] == 0).all()


def test_losses_on_the_same_logits_add_their_gradients_and_a_second_backward_is_refused():
    student, teacher, mask = make_batch(seed=15)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    value, grad = grad_of(lambda s: 0.5 * kd_loss(s, teacher, mask, chunk_size=2) + 2 * ce_loss(s, targets, mask), student)
    ref_value, ref_grad = grad_of(
        lambda s: 0.5 * naive_kd(s, teacher, mask, "forward_kl", 2.0) + 2 * F.cross_entropy(s[mask], targets[mask]),
        student.double(),
    )
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_grad[mask], rtol=1e-4, atol=1e-6)
    leaf = student.detach().clone().requires_grad_(True)
    loss = kd_loss(leaf, teacher, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
