"""Distillation losses (KL / reverse KL / JSD, CE) over response tokens, chunked so a 152k vocabulary stays cheap.

Every loss reads logits ``(batch, time, vocab)`` in any dtype plus a ``mask (batch, time)`` of the response tokens, and
works on the masked tokens only, ``chunk_size`` of them at a time, upcast to float32 one chunk at a time (the
torchtune chunked-KD idea). Padding positions are never read, so garbage (NaN, inf) there cannot leak.

Memory: a plain autograd loss keeps several ``n_tokens × vocab`` float32 tensors (log-softmaxes, products) alive from
the forward to the backward pass; at Qwen's vocabulary that, not the model, is the peak. Here the gradient with
respect to the student's logits is computed chunk by chunk *during the forward pass* (autograd on one chunk, then
freed) and written into a buffer shaped and typed like the logits; the backward pass scales it in place and hands it
to autograd as the gradient. So float32 temporaries exist for one chunk at a time (about 7 ``(chunk_size, vocab)``
float32 blocks at the peak, measured by ``benchmarks/bench_distill.py``; the plain whole-batch loss holds about 4
``(n_tokens, vocab)`` blocks, so chunking wins once a batch has more than about 2·chunk_size response tokens), and the
gradient equals the unchunked one. The teacher is a constant: no gradient flows into it. One backward per forward.

Notation (our reading of the paper, Wang et al. 2025, arXiv 2509.14930): ``p`` = teacher, ``q`` = student, both softened by the
temperature τ (``softmax(logits / τ)``); the loss is ``τ² · mean over response tokens of D(p, q)`` where ``D`` is

- ``forward_kl``: KL(p ‖ q), the paper's default (mass-covering);
- ``reverse_kl``: KL(q ‖ p) (mode-seeking);
- ``jsd``: β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with m = β·p + (1−β)·q (the generalised JSD of Agarwal et al., GKD);
  symmetric at β = 0.5.

Sparse (top-k) teacher: a :class:`TopK` holds the teacher's k largest log-probabilities at τ = 1 and their ids (what
:mod:`speechlm_eval.distill.teacher_cache` stores). The mass outside those ids is handled explicitly by ``topk_tail``:

- ``"bucket"`` (default, :data:`DEFAULT_TOPK_TAIL`): k+1 classes, the kept ids plus one "rest" class. The student's
  rest is its exact mass outside the k ids at τ; the teacher's rest at τ = 1 is the exact ``1 − Σ top-k`` (stored by
  the cache as ``rest_logprob``). At τ ≠ 1 the teacher's tempered rest depends on how that mass is spread over the
  other ids, which the cache does not keep; we assume it is spread like the *student's own* tail (the student is
  initialised from the teacher's backbone, so its tail is the best estimate at hand) and hold that estimate fixed (no
  gradient through it). The bucket loss then equals, in value and gradient, the full-vocabulary divergence against
  the teacher completed with that tail; at τ = 1 it is exactly the divergence of the (k+1)-class coarsening, a lower
  bound on the full KL missing only ``rest · KL(teacher tail ‖ student tail)``. It keeps the student's tail mass tied
  to the teacher's, and equals the full loss when k = V.
- ``"renormalize"``: both distributions are restricted to the kept ids and renormalised (a divergence on the
  k-simplex; re-tempering is exact there: ``log p_τ = log p / τ − logsumexp(log p / τ)`` over the kept ids). The tail
  is dropped on both sides, so the student's mass outside the k ids gets no gradient at all and can drift.

Why ``"bucket"`` is the default (``benchmarks/bench_distill.py``, k = 64, 151,665 ids, synthetic peaked teachers):
its gradient w.r.t. the student's logits stays within cosine 0.9999 (τ = 1) / 0.988 (τ = 2) of the full-teacher
gradient, against 0.998 / 0.82 for ``"renormalize"``. Caveat for τ > 1: tempering moves mass into the long tail (at
τ = 2, 40–70% of a teacher's tempered mass lay outside its top 64 although those held 96–99.9% at τ = 1), and no
top-k cache knows how that mass is spread, so the top-k *loss value* at τ = 2 is biased low (−46% to −62% with
``"bucket"``) even though its gradient is nearly right; compare loss values only between runs that use the same
teacher representation. At τ = 1 the bucket loss was within 0.2% (top-64 holding 99.9%) to 6% (95.8%) of the full one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from speechlm_eval.divergence import DEFAULT_CHUNK_SIZE, Divergence, check_divergence, divergence

TopKTail = Literal["bucket", "renormalize", "sampled"]
DEFAULT_TOPK_TAIL: TopKTail = "bucket"
# Only used when a TopK carries no rest_logprob: the rest mass 1 − Σ exp(top-k), rounded, can come out ≤ 0.
REST_FLOOR = 1e-8


@dataclass(frozen=True)
class TopK:
    """A sparse teacher: its top-k log-probabilities at temperature 1 and their vocabulary ids.

    Attributes:
        logprobs: ``(batch, time, k)`` float, log p(id) under the teacher's full softmax at τ = 1.
        indices: ``(batch, time, k)`` long, the ids.
        rest_logprob: ``(batch, time)`` float, log of the teacher's mass outside the k ids at τ = 1 (exact when
            computed from full logits; ``None`` = derived from ``logprobs``, less precise after float16 rounding).
        mask: ``(batch, time)`` bool, the positions that hold teacher data (``None`` = all); ``kd_loss`` refuses a
            loss mask that reaches outside it.
        tail_indices: ``(batch, time, m)``: m ids drawn (with replacement) from the teacher's *tempered* tail p̃ (its
            distribution at ``tail_temperature`` restricted to the ids outside the top k) — what
            ``topk_tail="sampled"`` estimates the within-tail divergence from (``None``: not sampled).
        tail_logprobs: ``(batch, time, m)``: the teacher's log-probs at τ = 1 of the sampled ids.
        tail_stats: ``(batch, time, 2)`` float32, exact at ``tail_temperature``: log Z_τ (the normaliser of p^(1/τ)
            over the whole vocabulary) and log of the tempered tail mass P_T.
        tail_temperature: the τ the tail samples and statistics are for (the run's temperature).
    """

    logprobs: Tensor
    indices: Tensor
    rest_logprob: Tensor | None = None
    mask: Tensor | None = None
    tail_indices: Tensor | None = None
    tail_logprobs: Tensor | None = None
    tail_stats: Tensor | None = None
    tail_temperature: float | None = None

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    @property
    def tail_samples(self) -> int:
        return 0 if self.tail_indices is None else self.tail_indices.shape[-1]


def topk_from_logits(logits: Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE, *, tail_samples: int = 0,
                     tail_temperature: float = 1.0, generator: torch.Generator | None = None) -> TopK:
    """The top-k teacher of full logits ``(..., V)``: log-softmax in float32, k largest, exact rest mass, and
    (``tail_samples`` = m > 0) the exact tempered-tail statistics at ``tail_temperature`` plus m ids drawn from the
    tempered tail (see :class:`TopK`).

    Returns a :class:`TopK` with ``logprobs``/``indices`` ``(..., k)`` (float32 / long), ``rest_logprob`` ``(...)``
    and, when sampled, ``tail_indices``/``tail_logprobs`` ``(..., m)`` and ``tail_stats`` ``(..., 2)``; rows are processed
    ``chunk_size`` at a time so only ``chunk_size × V`` float32 values exist at once. ``generator`` makes the draws
    reproducible.
    """
    vocab = logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in 1..{vocab} (the vocabulary), got {k}")
    sample = tail_samples > 0 and k < vocab
    tau = float(tail_temperature)
    flat = logits.detach().reshape(-1, vocab)
    logprobs = flat.new_empty((flat.shape[0], k), dtype=torch.float32)
    indices = torch.empty((flat.shape[0], k), dtype=torch.long, device=flat.device)
    rest = flat.new_empty((flat.shape[0],), dtype=torch.float32)
    tail_ids = torch.empty((flat.shape[0], tail_samples), dtype=torch.long, device=flat.device) if sample else None
    tail_lp = flat.new_empty((flat.shape[0], tail_samples), dtype=torch.float32) if sample else None
    stats = flat.new_empty((flat.shape[0], 2), dtype=torch.float32) if sample else None
    for start in range(0, flat.shape[0], chunk_size):
        rows = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        top, ids = rows.topk(k, dim=-1)
        logprobs[start : start + chunk_size], indices[start : start + chunk_size] = top, ids
        rest[start : start + chunk_size] = rows.scatter(-1, ids, -math.inf).logsumexp(-1)
        if sample:
            tempered = rows / tau  # log p^(1/τ), unnormalised
            log_z = tempered.logsumexp(-1)
            tail = tempered.scatter(-1, ids, -math.inf)
            log_mass = tail.logsumexp(-1)
            stats[start : start + chunk_size] = torch.stack([log_z, log_mass - log_z], -1)
            weights = (tail - log_mass.unsqueeze(-1)).exp().nan_to_num(0.0)  # p̃ on the tail, 0 on the top k
            weights[weights.sum(-1) == 0] = 1.0  # a tail without mass: any ids, they carry weight 0
            drawn = torch.multinomial(weights, tail_samples, replacement=True, generator=generator)
            tail_ids[start : start + chunk_size] = drawn
            tail_lp[start : start + chunk_size] = rows.gather(-1, drawn)
    lead = logits.shape[:-1]
    out = TopK(logprobs.reshape(*lead, k), indices.reshape(*lead, k), rest.reshape(lead))
    if not sample:
        return out
    return dataclasses.replace(out, tail_indices=tail_ids.reshape(*lead, tail_samples),
                               tail_logprobs=tail_lp.reshape(*lead, tail_samples), tail_stats=stats.reshape(*lead, 2),
                               tail_temperature=tau)


# ----------------------------------------------------------------------------------------------------------------
# Divergences between two normalised log-distributions over the last dim: (n, C), (n, C) -> (n,)


# ----------------------------------------------------------------------------------------------------------------
# Teacher/student pairs of tempered log-distributions for one chunk of tokens (student chunk s: (c, V) float32)


def _full_pair(s: Tensor, t: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Full teacher logits ``t (c, V)``: both softened over the whole vocabulary."""
    return torch.log_softmax(t.float() / tau, -1), torch.log_softmax(s / tau, -1)


def _renormalize_pair(s: Tensor, logprobs: Tensor, indices: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Top-k teacher, tail dropped: both restricted to the kept ids ``(c, k)`` and renormalised at τ."""
    return torch.log_softmax(logprobs.float() / tau, -1), torch.log_softmax(s.gather(-1, indices) / tau, -1)


def _bucket_pair(
    s: Tensor, logprobs: Tensor, indices: Tensor, rest: Tensor | None, tau: float
) -> tuple[Tensor, Tensor]:
    """Top-k teacher plus one "rest" class: ``(c, k+1)`` log-distributions (see the module docstring)."""
    logprobs = logprobs.float()
    log_q = torch.log_softmax(s / tau, -1)
    log_q_rest = log_q.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    log_q = torch.cat([log_q.gather(-1, indices), log_q_rest], -1)
    with torch.no_grad():
        if rest is None:
            log_rest = torch.log((1 - logprobs.exp().sum(-1)).clamp_min(REST_FLOOR))
        else:
            log_rest = rest.float()
        if tau != 1:
            # Teacher tail shaped like the student's: p_j = rest · q1_j / q1_rest for j outside the k ids (q1 = τ=1
            # student). Its tempered unnormalised mass is
            # Σ_j p_j^(1/τ) = exp((log rest − lse_tail(s)) / τ + lse_tail(s / τ)).
            tail_logits = s.detach().scatter(-1, indices, -math.inf)
            lse_1, lse_tau = tail_logits.logsumexp(-1), (tail_logits / tau).logsumexp(-1)
            log_rest = torch.where(
                torch.isfinite(lse_1), (log_rest - lse_1) / tau + lse_tau, torch.full_like(log_rest, -math.inf)
            )
        log_p = torch.log_softmax(torch.cat([logprobs / tau, log_rest.unsqueeze(-1)], -1), -1)
    return log_p, log_q


def _sampled_forward_kl(s: Tensor, logprobs: Tensor, indices: Tensor, stats: Tensor, tail_lp: Tensor,
                        tail_ids: Tensor, tau: float) -> Tensor:
    """KL(p_τ ‖ q_τ) per token from a top-k teacher with tail samples: ``(c,)`` for a student chunk ``s (c, V)``,
    top-k ``(c, k)``, ``stats (c, 2)`` and tail samples ``(c, m)`` (see :class:`TopK`).

    The full KL splits exactly into the (k+1)-class divergence between [p_τ(top k), P_T] and [q_τ(top k), Q_T] plus
    P_T · KL(p̃ ‖ q̃), the divergence *within* the tail (p̃, q̃: the tempered distributions restricted to the tail and
    renormalised). The first part is exact here: the cache holds log Z_τ and P_T computed from the teacher's full row,
    so no assumption about how the tail mass is spread is needed. The second is estimated from the m ids drawn from
    p̃: KL(p̃ ‖ q̃) ≈ mean_j [log p̃(i_j) − log q̃(i_j)] (unbiased; the difference of the two log-probs varies far less
    than either alone: sparse-logit sampling, Anshumann et al. 2025). It is added to the value only: a gradient
    through m point masses standing for a spread-out tail is noisy, so the gradient is the (k+1)-class part's, whose
    direction is within cosine 0.99 of the full one at τ = 2 (``benchmarks/bench_distill.py``).
    """
    log_z, log_mass = stats.float().unbind(-1)
    log_p = torch.cat([logprobs.float() / tau - log_z.unsqueeze(-1), log_mass.unsqueeze(-1)], -1)
    log_q_full = torch.log_softmax(s / tau, -1)
    log_q_tail = log_q_full.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    log_q = torch.cat([log_q_full.gather(-1, indices), log_q_tail], -1)
    coarse = divergence(log_p, log_q, "forward_kl")
    with torch.no_grad():
        log_p_tilde = tail_lp.float() / tau - (log_z + log_mass).unsqueeze(-1)
        log_q_tilde = log_q_full.gather(-1, tail_ids) - log_q_tail
        within = log_mass.exp() * (log_p_tilde - log_q_tilde).mean(-1)
        within = torch.where(torch.isfinite(within), within, torch.zeros_like(within))
    return coarse + within


# ----------------------------------------------------------------------------------------------------------------
# The chunk engine: a sum over masked tokens of a per-token function of the student's logits


class _ChunkedTokenSum(torch.autograd.Function):
    """Σ over masked tokens of ``token_fn(student_chunk_fp32, *chunk_args) -> (c,)``; gradient built in forward."""

    @staticmethod
    def forward(ctx, logits, rows, chunk_size, need_grad, token_fn, *token_args):  # type: ignore[override]
        ctx.n_none = 4 + len(token_args)
        grad = torch.zeros_like(logits) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, rows.shape[0], chunk_size):
            b, t = rows[start : start + chunk_size].unbind(-1)
            chunk = logits[b, t].float()  # (c, V): the only full-vocabulary float32 copy of the student
            args = [a[b, t] for a in token_args]
            if need_grad:
                with torch.enable_grad():
                    chunk.requires_grad_(True)
                    value = token_fn(chunk, *args).sum()
                    (chunk_grad,) = torch.autograd.grad(value, chunk)
                grad[b, t] = chunk_grad.to(grad.dtype)
                del chunk_grad
            else:
                value = token_fn(chunk, *args).sum()
            total += value.detach()
            del chunk, args, value
        # A plain attribute, not save_for_backward: backward hands this very tensor to autograd, which can then adopt
        # it as ``.grad`` without a copy (a saved tensor would be cloned); the price is one backward per forward.
        ctx.grad = grad
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("a chunked distillation loss can be backpropagated once per forward (no retain_graph)")
        return (grad.mul_(grad_output.to(grad.dtype)),) + (None,) * ctx.n_none


def _masked_sum(
    logits: Tensor, mask: Tensor, token_fn: Callable[..., Tensor], token_args: tuple[Tensor, ...], chunk_size: int
) -> tuple[Tensor, int]:
    """(Σ over masked tokens of ``token_fn``, number of masked tokens); differentiable w.r.t. ``logits`` only.

    ``logits`` ``(B, T, V)``, ``mask`` ``(B, T)`` bool, each of ``token_args`` ``(B, T, ...)`` (read at masked
    positions only, never differentiated).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"expected logits (B, T, V) and mask (B, T); got {tuple(logits.shape)}, {tuple(mask.shape)}")
    rows = mask.bool().nonzero()  # (n, 2) (batch, time), row-major: the order of logits[mask]
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    detached = tuple(a.detach() for a in token_args)
    total = _ChunkedTokenSum.apply(logits, rows, chunk_size, need_grad, token_fn, *detached)
    return total, rows.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Public losses


def _check_options(kind: str, temperature: float, beta: float, topk_tail: str) -> None:
    check_divergence(kind, temperature, beta)
    if topk_tail not in get_args(TopKTail):
        raise ValueError(f"unknown topk_tail {topk_tail!r}; choose one of {get_args(TopKTail)}")


def _teacher_token_fn(
    teacher: Tensor | TopK, vocab: int, kind: Divergence, tau: float, beta: float, topk_tail: TopKTail
) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """The per-token divergence function and the teacher tensors it reads, for a full or a top-k teacher."""
    if isinstance(teacher, Tensor):
        if teacher.shape[-1] != vocab:
            raise ValueError(
                f"teacher has {teacher.shape[-1]} logits per token, student {vocab}: cut both to the shared real "
                "vocabulary first (speechlm_eval.distill.vocab.align_logits)"
            )
        return (lambda s, t: divergence(*_full_pair(s, t, tau), kind, beta)), (teacher,)
    if topk_tail == "sampled":
        if teacher.tail_indices is None or teacher.tail_stats is None or teacher.tail_logprobs is None:
            raise ValueError("topk_tail='sampled' needs a TopK with tail samples "
                             "(topk_from_logits(..., tail_samples=m), or a cache built with tail samples)")
        if kind != "forward_kl":
            raise ValueError(f"topk_tail='sampled' estimates forward KL only, not {kind}; use topk_tail='bucket'")
        if teacher.tail_temperature is None or abs(teacher.tail_temperature - tau) > 1e-12:
            raise ValueError(f"the tail samples are for τ = {teacher.tail_temperature}, the loss asks τ = {tau}")
        return (lambda s, lp, ids, st, tlp, tids: _sampled_forward_kl(s, lp, ids, st, tlp, tids, tau)), (
            teacher.logprobs, teacher.indices, teacher.tail_stats, teacher.tail_logprobs, teacher.tail_indices)
    if teacher.k >= vocab or topk_tail == "renormalize":
        # k = V: every id is kept, the renormalised top-k is the full distribution (no tail to bucket).
        return (lambda s, lp, ids: divergence(*_renormalize_pair(s, lp, ids, tau), kind, beta)), (
            teacher.logprobs,
            teacher.indices,
        )
    if teacher.rest_logprob is None:
        return (lambda s, lp, ids: divergence(*_bucket_pair(s, lp, ids, None, tau), kind, beta)), (
            teacher.logprobs,
            teacher.indices,
        )
    return (lambda s, lp, ids, rest: divergence(*_bucket_pair(s, lp, ids, rest, tau), kind, beta)), (
        teacher.logprobs,
        teacher.indices,
        teacher.rest_logprob,
    )


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    mask: Tensor,
    *,
    kind: Divergence = "forward_kl",
    temperature: float = 2.0,
    beta: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    topk_tail: TopKTail = DEFAULT_TOPK_TAIL,
) -> Tensor:
    """τ² · mean over masked tokens of D(teacher_τ, student_τ); a float32 scalar, differentiable w.r.t. the student.

    Args:
        student_logits: ``(B, T, V)``, any float dtype; the gradient comes back in this dtype.
        teacher: full logits ``(B, T, V)`` (a constant: detached), or a :class:`TopK` ``(B, T, k)`` sparse teacher.
        mask: ``(B, T)`` bool, the response tokens; other positions are never read.
        kind: ``forward_kl`` = KL(teacher ‖ student) (paper default), ``reverse_kl`` = KL(student ‖ teacher),
            ``jsd`` = β·KL(teacher ‖ m) + (1−β)·KL(student ‖ m), m = β·teacher + (1−β)·student.
        temperature: τ; both distributions are ``softmax(logits / τ)`` and the mean is multiplied by τ².
        beta: the JSD mixing weight, in (0, 1).
        chunk_size: masked tokens upcast to float32 at a time.
        topk_tail: how a :class:`TopK` teacher's mass outside its k ids is handled (module docstring).

    Returns 0 (with a zero gradient) when the mask is empty.
    """
    _check_options(kind, temperature, beta, topk_tail)
    if isinstance(teacher, TopK):
        if teacher.mask is not None and bool((mask.bool() & ~teacher.mask.bool()).any()):
            raise ValueError("the loss mask covers positions the top-k teacher has no data for (teacher.mask)")
        if teacher.indices.shape[:2] != student_logits.shape[:2]:
            raise ValueError(
                f"top-k teacher is {tuple(teacher.indices.shape)}, student {tuple(student_logits.shape)}: "
                "batch and time must agree"
            )
        if mask.any() and int(teacher.indices[mask.bool()].max()) >= student_logits.shape[-1]:
            raise ValueError(f"top-k teacher ids reach past the student's vocabulary ({student_logits.shape[-1]})")
    token_fn, args = _teacher_token_fn(teacher, student_logits.shape[-1], kind, temperature, beta, topk_tail)
    total, n = _masked_sum(student_logits, mask, token_fn, args, chunk_size)
    return total * (temperature**2 / max(n, 1))


def ce_loss(student_logits: Tensor, targets: Tensor, mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Mean token cross-entropy over masked tokens; float32 scalar (0 with a zero gradient for an empty mask).

    ``student_logits`` ``(B, T, V)``, ``targets`` ``(B, T)`` long (the token each position predicts, as returned by
    ``continuation_logits``), ``mask`` ``(B, T)`` bool.
    """

    def token_ce(s: Tensor, target: Tensor) -> Tensor:
        return torch.logsumexp(s, -1) - s.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    total, n = _masked_sum(student_logits, mask, token_ce, (targets.long(),), chunk_size)
    return total / max(n, 1)
