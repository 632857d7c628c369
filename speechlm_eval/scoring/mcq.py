"""VoiceBench's multiple-choice scorer (openbookqa, mmsu), reproducing the official ``mcq.py`` letter extraction.

The official evaluator replaces an unparsed response by an unseeded ``random.choice(['A','B','C','D'])``; here that draw
comes from the caller's seeded ``rng`` so the official-compatible accuracy is reproducible, and ``fail`` reports how
many items needed it.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from speechlm_eval.scoring.base import Score, accuracy_and_fail
from speechlm_eval.scoring.constants import (
    MCQ_LEADING_PUNCTUATION,
    MCQ_LETTERS,
    MCQ_PLACEHOLDER,
    MCQ_SPECIAL_CASES_A,
    MCQ_TEMPLATES,
    MCQ_TURN_PREFIXES,
)
from speechlm_eval.scoring.registry import Scorer

# What the official fallback draws from, in its order (the order matters for a seeded rng.choice).
RANDOM_FALLBACK_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# Every (filled template, letter) pair in the order the official double loop tries them: template-major, a..d inside.
_FILLED_TEMPLATES: tuple[tuple[str, str], ...] = tuple(
    (template.replace(MCQ_PLACEHOLDER, letter), letter) for template in MCQ_TEMPLATES for letter in MCQ_LETTERS
)


def _normalise(response: str) -> str:
    """Lower-case; drop a ``<1>``/``<2>``/``<3>`` prefix and only then strip (no strip without a prefix)."""
    text = response.lower()
    if text.startswith(MCQ_TURN_PREFIXES):
        text = text[3:].strip()
    return text


def _match_template(text: str) -> str | None:
    for needle, letter in _FILLED_TEMPLATES:
        if needle in text:
            return letter.upper()
    return None


def _match_bare_letter(text: str) -> str | None:
    """The whole response is a letter, or starts with a letter followed by ``.``, ``,``, ``:`` or ``)``."""
    for letter in MCQ_LETTERS:
        if text == letter or text.startswith(tuple(letter + p for p in MCQ_LEADING_PUNCTUATION)):
            return letter.upper()
    return None


def _match_special_case(text: str) -> str | None:
    return "A" if any(case in text for case in MCQ_SPECIAL_CASES_A) else None


def extract_answer(response: str) -> str | None:
    """The letter (``"A"``..``"D"``) the official rule reads from ``response``; ``None`` where it draws at random."""
    text = _normalise(response)
    return _match_template(text) or _match_bare_letter(text) or _match_special_case(text)


def score(item: Any, response: str, rng: random.Random) -> Score:
    """1.0 when the extracted (or, if unparsed, the seeded random) letter equals ``item.reference``; else 0.0."""
    extracted = extract_answer(response)
    if extracted is not None:
        return Score(value=float(extracted == item.reference), parsed=True, extracted=extracted)
    drawn = rng.choice(RANDOM_FALLBACK_LETTERS)
    return Score(value=float(drawn == item.reference), parsed=False, extracted=None, details={"random_letter": drawn})


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, float]:
    """``{"acc": 100 * mean(value), "fail": 100 * share of unparsed responses}``, named as upstream names them."""
    return accuracy_and_fail("mcq", scores)


SCORER = Scorer("mcq", score, aggregate, primary="acc", scale=100.0)
