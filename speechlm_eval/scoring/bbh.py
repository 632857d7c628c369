"""VoiceBench's BBH scorer (sports_understanding, hyperbaton, navigate, web_of_lies), reproducing upstream ``bbh.py``.

The official evaluator replaces an unparsed response by an unseeded ``random.choice([0, 1])``; here that draw comes from
the caller's seeded ``rng`` so the official-compatible accuracy is reproducible, and ``fail`` reports how many items
needed it. The phrase tables live in :mod:`speechlm_eval.scoring.bbh_rules`; this module only interprets them.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from speechlm_eval.scoring.base import Score, accuracy_and_fail
from speechlm_eval.scoring.bbh_rules import (
    CHANNEL_PREFIXES,
    GOLD_LABELS,
    SPACED_OUT,
    TASK_CHAINS,
    TURN_END_MARKER,
    USER_TURN_SUFFIX,
    Rule,
)
from speechlm_eval.scoring.registry import Scorer

# What the official fallback draws from, in its order (the order matters for a seeded rng.choice).
RANDOM_FALLBACK_LABELS: tuple[int, ...] = (0, 1)


def normalize(response: str) -> str:
    """Upstream's normalisation: lower-case, drop turn markers, turn ``: ** " - , . ：`` into spaces, squeeze spaces."""
    text = response.lower()
    if text.endswith(USER_TURN_SUFFIX):
        text = text[: -len(USER_TURN_SUFFIX)].strip()
    if text.startswith(CHANNEL_PREFIXES):
        text = text[3:].strip()
    text = text.replace(TURN_END_MARKER, "")
    for mark in SPACED_OUT:
        text = text.replace(mark, " ")
    return " ".join(text.split())


def rule_matches(rule: Rule, text: str) -> bool:
    """Whether one ``(kind, pattern, label)`` rule fires on the normalised ``text``."""
    kind, pattern, _ = rule
    if kind == "equals":
        return text == pattern
    if kind == "contains":
        return pattern in text
    if kind == "regex":
        return re.search(pattern, text) is not None
    if kind == "startswith":
        return text.startswith(pattern)
    if kind == "endswith":
        return text.endswith(pattern)
    raise ValueError(f"unknown rule kind {kind!r} in {rule!r}")


def first_label(rules: Sequence[Rule], text: str) -> int | None:
    """The label of the first rule in ``rules`` that matches ``text``; ``None`` when none does."""
    for rule in rules:
        if rule_matches(rule, text):
            return rule[2]
    return None


def task_of(source_id: str) -> str:
    """The BBH task named in ``source_id``: the first of the four, in upstream's order, that is a substring of it."""
    for task in TASK_CHAINS:
        if task in source_id:
            return task
    # Upstream raises a bare NotImplementedError here, which aborts the whole subset.
    raise ValueError(f"bbh: id {source_id!r} names none of the tasks {sorted(TASK_CHAINS)}")


def extract_label(task_id: str, response: str) -> int | None:
    """The 0/1 label the official rule reads from ``response`` for the task named in ``task_id`` (a task name or an
    item's source id); ``None`` where upstream would draw ``random.choice([0, 1])``."""
    return first_label(TASK_CHAINS[task_of(task_id)], normalize(response))


def gold_label(reference: str) -> int:
    """The 0/1 label of an item's reference (``yes``/``no``/``(A)``/``(B)``, any case)."""
    try:
        return GOLD_LABELS[reference.lower()]
    except KeyError:
        raise ValueError(f"bbh: reference {reference!r} is none of {sorted(GOLD_LABELS)}") from None


def _source_id(item: Any) -> str:
    try:
        return item.meta["id"]
    except KeyError:
        raise ValueError(f"bbh: item {item.id!r} has no meta['id'] to choose its task from") from None


def score(item: Any, response: str, rng: random.Random) -> Score:
    """1.0 when the extracted (or, if unparsed, the seeded random) 0/1 label equals the gold label; else 0.0."""
    task = task_of(_source_id(item))
    gold = gold_label(item.reference)
    extracted = first_label(TASK_CHAINS[task], normalize(response))
    if extracted is not None:
        return Score(value=float(extracted == gold), parsed=True, extracted=extracted, details={"task": task})
    drawn = rng.choice(RANDOM_FALLBACK_LABELS)
    details = {"task": task, "random_label": drawn}
    return Score(value=float(drawn == gold), parsed=False, extracted=None, details=details)


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, float]:
    """``{"acc": 100 * mean(value), "fail": 100 * share of unparsed responses}``; upstream itself reports only acc."""
    return accuracy_and_fail("bbh", scores)


SCORER = Scorer("bbh", score, aggregate, primary="acc", scale=100.0)
