"""Scorers by name: a benchmark subset names its scorer, users add their own with :func:`register_scorer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from speechlm_eval.scoring.base import Score, ScorerFn

# (items, scores) -> the official metric dict, e.g. {"acc": 71.2, "fail": 3.1}
AggregateFn = Callable[[Sequence[Any], Sequence[Score]], dict[str, float]]


@dataclass(frozen=True)
class Scorer:
    """A named scoring rule.

    Attributes:
        name: registry key (``"mcq"``, ``"bbh"``, ``"harm"``, ``"mmau"``, ...).
        score: per-item rule ``(item, response, rng) -> Score``.
        aggregate: subset-level official metrics from per-item scores, keys as the official scorer names them.
        primary: the key of ``aggregate``'s result that is the subset's headline metric.
        scale: multiply the mean of ``Score.value`` by this to get ``primary`` (100 for percentages, 1 otherwise).
    """

    name: str
    score: ScorerFn
    aggregate: AggregateFn
    primary: str
    scale: float = 100.0


_SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    """Add (or replace) a scorer under ``scorer.name``."""
    _SCORERS[scorer.name] = scorer
    return scorer


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; ``KeyError`` with the known names otherwise."""
    try:
        return _SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown scorer {name!r}; registered: {sorted(_SCORERS)}") from None


def scorer_names() -> list[str]:
    return sorted(_SCORERS)
