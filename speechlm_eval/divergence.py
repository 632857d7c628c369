"""Divergences between next-token distributions (KL, reverse KL, generalised JSD), shared by the judge-free
diagnostics of an evaluation and the distillation losses: one definition, one set of numerical choices.

Notation: ``p`` is the reference (the teacher, or the text-input side), ``q`` the other (the student, or the
speech-input side); both are normalised log-probabilities over the last dimension.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DEFAULT_CHUNK_SIZE = 128  # tokens upcast to float32 at a time: bounds memory at a 152k vocabulary


def xlogy_diff(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a · (log a − log b) over the last dim, with 0 · log 0 = 0 (ids where a has no mass contribute nothing)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def divergence(log_p: Tensor, log_q: Tensor, kind: Divergence, beta: float = 0.5) -> Tensor:
    """D(p, q) per row for normalised log-probabilities ``(n, C)`` → ``(n,)``.

    ``forward_kl`` = KL(p ‖ q); ``reverse_kl`` = KL(q ‖ p); ``jsd`` = β·KL(p ‖ m) + (1−β)·KL(q ‖ m) with
    m = β·p + (1−β)·q (the generalised JSD of GKD, symmetric at β = 0.5).
    """
    if kind == "forward_kl":
        return xlogy_diff(log_p, log_q)
    if kind == "reverse_kl":
        return xlogy_diff(log_q, log_p)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * xlogy_diff(log_p, log_m) + (1 - beta) * xlogy_diff(log_q, log_m)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {get_args(Divergence)}")


def check_divergence(kind: str, temperature: float, beta: float) -> None:
    """``ValueError`` for an unknown divergence, a non-positive temperature or a JSD β outside (0, 1)."""
    if kind not in get_args(Divergence):
        raise ValueError(f"unknown divergence {kind!r}; choose one of {get_args(Divergence)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")


@torch.no_grad()
def per_token_divergence(
    p_logits: Tensor,
    q_logits: Tensor,
    mask: Tensor,
    *,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """D(p, q) at each masked token, without gradient: ``(n_masked,)`` float32, in ``p_logits[mask]`` order.

    ``p_logits``/``q_logits`` ``(B, T, V)`` in any dtype (e.g. text LLM vs speech LLM, or one model given text vs
    speech), ``mask`` ``(B, T)``; both are softened by ``temperature`` and upcast ``chunk_size`` tokens at a time.
    Unmasked positions are never read.
    """
    check_divergence(kind, temperature, beta)
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p and q logits differ in shape: {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    rows = mask.bool().nonzero()
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=p_logits.device)
    for start in range(0, rows.shape[0], chunk_size):
        b, t = rows[start : start + chunk_size].unbind(-1)
        log_p = torch.log_softmax(p_logits[b, t].float() / temperature, -1)
        log_q = torch.log_softmax(q_logits[b, t].float() / temperature, -1)
        out[start : start + chunk_size] = divergence(log_p, log_q, kind, beta)
    return out


def token_kl(p_logits: Tensor, q_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(p ‖ q) at τ = 1 per masked token: ``(n_masked,)``; logits ``(B, T, V)``, mask ``(B, T)``."""
    return per_token_divergence(p_logits, q_logits, mask, kind="forward_kl")


def token_jsd(p_logits: Tensor, q_logits: Tensor, mask: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD(β) of p and q at τ = 1 per masked token: ``(n_masked,)`` (symmetric at β = 0.5)."""
    return per_token_divergence(p_logits, q_logits, mask, kind="jsd", beta=beta)
