"""Scorers by name: a benchmark subset names its scorer; a scorer is one file plus one row in :data:`SCORERS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from speechlm_eval.registry import Registry
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
        judged: the rule reads an LLM judge's outputs for the response (VoiceBench's open-ended subsets and sd-qa),
            attached to the item by :func:`speechlm_eval.scoring.judged.attach_judgements`.
        graded: the per-item value is a grade (a 1-5 judge mean), not a right/wrong outcome.
    """

    name: str
    score: ScorerFn
    aggregate: AggregateFn
    primary: str
    scale: float = 100.0
    judged: bool = False
    graded: bool = False


# A scorer is one file defining ``SCORER`` plus one row here; each is imported when first asked for.
SCORERS: Registry[Scorer] = Registry(
    "scorer",
    {
        "bbh": "speechlm_eval.scoring.bbh:SCORER",
        "harm": "speechlm_eval.scoring.harm:SCORER",
        "ifeval": "speechlm_eval.scoring.ifeval:SCORER",
        "mcq": "speechlm_eval.scoring.mcq:SCORER",
        "mmau": "speechlm_eval.scoring.mmau:SCORER",
        "open": "speechlm_eval.scoring.open_ended:SCORER",
        "qa": "speechlm_eval.scoring.qa:SCORER",
    },
)


def register_scorer(scorer: Scorer) -> Scorer:
    """Add (or replace) a scorer object at run time (a plug-in may instead add a ``"module:SCORER"`` row)."""
    SCORERS.register(scorer.name, scorer, replace=True)
    return scorer


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; ``KeyError`` with the known names otherwise."""
    return SCORERS.get(name)


def is_judged(name: str) -> bool:
    """Whether the scorer ``name`` needs an LLM judge's outputs (False for a scorer that is not registered)."""
    return name in SCORERS and SCORERS.get(name).judged
