"""Cross-modal alignment losses: pull what the student's language model computes from the *spoken* question towards
what it computes from the *typed* one (its own text path, a stop-gradient target), instead of only matching answers.

Output-level S→T distillation teaches spoken answers to the distillation facts; these target the mapping from the
spoken question to what the LM already knows (DiVA's cross-modal context distillation, BLSP-KD's next-token alignment
for speech vs text input, representation matching of the spoken and typed query). Each is a small function with
shapes and masking; the targets are always detached.

- ``st_hidden`` (:func:`hidden_alignment_loss`): the LM's hidden states at chosen layers, pooled over the prompt
  (its last position, or the mean of its real positions: ``models.hf_runtime.pool_prompt``), given audio vs given
  text; ``1 − cosine`` or MSE.
- ``st_prefix`` (:func:`prefix_kl`): KL(q_text ‖ q_audio) of the next-token distributions at the first response
  positions (position 0 = before any target token), the text side as teacher.
- ``st_self`` (:func:`self_distillation_kl`): the same KL over every response token: the speech LLM's own text-input
  distribution as the teacher of its speech input (no separate text LLM needed).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from speechlm_eval.divergence import divergence

AlignLoss = Literal["cosine", "mse"]
AlignPool = Literal["last", "mean"]


def hidden_alignment_loss(audio: Tensor, text: Tensor, kind: AlignLoss = "cosine") -> Tensor:
    """Mean over batch and layers of the distance between pooled hidden states ``(B, L, H)`` given audio (trained)
    and given text (detached target): ``1 − cos`` (scale-free) or the MSE per hidden unit."""
    target = text.detach().to(audio.dtype)
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(audio.float(), target.float(), dim=-1)).mean()
    if kind == "mse":
        return (audio.float() - target.float()).pow(2).mean()
    raise ValueError(f"unknown alignment loss {kind!r}; choose cosine or mse")


def _masked_mean_kl(text_logits: Tensor, audio_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """τ² · mean over masked tokens of KL(softmax(text/τ) ‖ softmax(audio/τ)); logits ``(B, T, V)``, mask ``(B, T)``.
    The text side is detached; positions outside the mask are never read."""
    rows = mask.bool()
    if not rows.any():
        return audio_logits.sum() * 0.0
    log_p = torch.log_softmax(text_logits.detach()[rows].float() / temperature, -1)
    log_q = torch.log_softmax(audio_logits[rows].float() / temperature, -1)
    return divergence(log_p, log_q, "forward_kl").mean() * temperature**2


def prefix_kl(text_logits: Tensor, audio_logits: Tensor, mask: Tensor, positions: int = 1,
              temperature: float = 1.0) -> Tensor:
    """KL over the first ``positions`` response positions of each row (continuations are right-aligned, so a row's
    first response position is its first True in ``mask``); position 0 predicts the first response token from the
    prompt alone."""
    first = mask.float().cumsum(-1)  # 1 at a row's first response token, 2 at the next, ...
    prefix = mask.bool() & (first <= positions)
    return _masked_mean_kl(text_logits, audio_logits, prefix, temperature)


def self_distillation_kl(text_logits: Tensor, audio_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q_text ‖ q_audio) over every response token (``mask``): the student's text path teaches its speech path."""
    return _masked_mean_kl(text_logits, audio_logits, mask, temperature)
