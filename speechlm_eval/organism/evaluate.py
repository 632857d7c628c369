"""Measure the organism through the project's own adapters (the exact prompts and decoding of ``speechlm-eval gap``).

Accuracy uses the official ``mcq`` scorer (an unparsed reply gets its seeded random letter, as in ``gap``); hearing is
measured with the perception probe's instruction, as ``diagnostics`` asks it.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from speechlm_eval.data.item import Item
from speechlm_eval.diagnostics import PROBE_INSTRUCTION, normalise_for_wer, word_error_rate
from speechlm_eval.models.base import GenerationConfig, Prompt, SpeechLM
from speechlm_eval.scoring import mcq


def generate_all(model: SpeechLM, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy replies to ``prompts`` in batches, order preserved."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(g.text for g in model.generate(prompts[start : start + batch_size], config))
    return out


def mcq_scores(items: Sequence[Item], replies: Sequence[str], seed: int = 0) -> tuple[np.ndarray, int]:
    """Per-item 0/1 scores of ``replies`` under the official mcq rule, shape ``(n,)``, and the unparsed count."""
    rng = random.Random(seed)
    scores = [mcq.score(item, reply, rng) for item, reply in zip(items, replies)]
    return np.array([s.value for s in scores], dtype=np.float64), sum(not s.parsed for s in scores)


def typed_scores(model: SpeechLM, items: Sequence[Item], max_new_tokens: int = 6) -> tuple[np.ndarray, list[str]]:
    """The text arm: each item's ``text`` as the whole user turn. Returns (scores ``(n,)``, replies)."""
    replies = generate_all(model, [Prompt(text=item.text) for item in items], max_new_tokens)
    return mcq_scores(items, replies)[0], replies


def spoken_scores(
    model: SpeechLM, items: Sequence[Item], clips: Sequence[np.ndarray], max_new_tokens: int = 6
) -> tuple[np.ndarray, list[str]]:
    """The speech arm (VoiceBench format: the audio alone is the user turn). Returns (scores ``(n,)``, replies)."""
    replies = generate_all(model, [Prompt(audio=clip) for clip in clips], max_new_tokens, batch_size=16)
    return mcq_scores(items, replies)[0], replies


def transcribe(model: SpeechLM, clips: Sequence[np.ndarray], max_new_tokens: int = 48) -> list[str]:
    """The perception probe: audio then :data:`PROBE_INSTRUCTION` in one turn, greedy."""
    prompts = [Prompt(audio=clip, text=PROBE_INSTRUCTION) for clip in clips]
    return generate_all(model, prompts, max_new_tokens, batch_size=16)


def entity_heard(transcript: str, entity: str) -> bool:
    """True when the normalised transcript names ``entity`` ("the <adjective> <noun>")."""
    return f" the {entity} " in f" {normalise_for_wer(transcript)} "


def hearing_summary(transcripts: Sequence[str], texts: Sequence[str], entities: Sequence[str]) -> dict[str, float]:
    """Entity accuracy, exact-transcript rate and mean WER (fractions) of the probe's transcripts."""
    heard = [entity_heard(t, e) for t, e in zip(transcripts, entities)]
    exact = [normalise_for_wer(t) == normalise_for_wer(x) for t, x in zip(transcripts, texts)]
    wers = [word_error_rate(x, t) for t, x in zip(transcripts, texts)]
    n = max(1, len(heard))
    return {"entity_accuracy": sum(heard) / n, "exact": sum(exact) / n, "wer": float(np.mean(wers)) if wers else 0.0}
