"""MMAU test-mini scorer, reproducing the official ``evaluation.py``: a word-token-set match against the answer text.

Each item is an independent boolean (no letter mapping, no parsing); accuracy is micro-averaged over items and also
broken down by task, difficulty and sub-category, as the official script prints it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.constants import MMAU_DIFFICULTIES, MMAU_OUTPUT_KEY, MMAU_TASKS, MMAU_TOKEN_PATTERN
from speechlm_eval.scoring.registry import Scorer

_TOKEN_RE = re.compile(MMAU_TOKEN_PATTERN)


def _tokens(text: str) -> set[str]:
    """The set of lower-cased word tokens: order, multiplicity and punctuation are ignored."""
    return set(_TOKEN_RE.findall(text.lower()))


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """The official rule: all answer tokens in the prediction, and no token that only a *different* choice has.

    A choice whose token set equals the answer's (a duplicate or reordered copy) contributes nothing; tokens shared with
    the answer are never counted against the prediction. An empty-token prediction is wrong.
    """
    for name, value in (("answer", answer), ("prediction", prediction)):
        if not isinstance(value, str):
            raise TypeError(f"mmau string_match: {name} must be str, not {type(value).__name__} (upstream crashes)")
    prediction_tokens = _tokens(prediction)
    if not prediction_tokens:
        return False
    answer_tokens = _tokens(answer)
    # Upstream skips choices whose token set equals the answer's; their difference below is empty anyway.
    incorrect: set[str] = set()
    for choice in choices:
        incorrect |= _tokens(choice) - answer_tokens
    return answer_tokens <= prediction_tokens and prediction_tokens.isdisjoint(incorrect)


def _require_text(prediction: Any, item_id: Any) -> str:
    if not isinstance(prediction, str):
        raise ValueError(
            f"mmau item {item_id!r}: prediction must be a string, got {type(prediction).__name__}; "
            "the official evaluation.py would crash on it"
        )
    return prediction


def score(item: Any, response: str, rng: random.Random) -> Score:
    """1.0 when ``response`` matches ``item.reference`` (the answer text) given ``item.choices``; ``rng`` is unused."""
    prediction = _require_text(response, item.id)
    matched = string_match(item.reference, prediction, item.choices)
    return Score(value=float(matched), parsed=True, extracted=matched)


@dataclass(frozen=True)
class _Outcome:
    """One scored item, reduced to what the official tallies need."""

    item_id: Any
    task: Any
    difficulty: Any
    sub_category: Any  # None: not tallied by sub-category, as upstream skips a missing "sub-category"
    matched: bool


def _check_groups(outcome: _Outcome) -> None:
    # Upstream pre-initialises these groups only, so anything else is a KeyError there; fail the same way, but say why.
    if outcome.task not in MMAU_TASKS:
        raise KeyError(f"mmau item {outcome.item_id!r}: unknown task {outcome.task!r}; expected one of {MMAU_TASKS}")
    if outcome.difficulty not in MMAU_DIFFICULTIES:
        raise KeyError(
            f"mmau item {outcome.item_id!r}: unknown difficulty {outcome.difficulty!r}; "
            f"expected one of {MMAU_DIFFICULTIES}"
        )


def _percent(correct: int, total: int) -> float:
    # Upstream prints 0 for an empty group rather than dividing by zero; same operation order as upstream.
    return (correct / total) * 100 if total > 0 else 0.0


def _summarise(outcomes: Iterable[_Outcome]) -> dict[str, Any]:
    """Micro-averaged total plus per-group accuracies; groups keep upstream's (print) order."""
    tallies: dict[str, dict[Any, list[int]]] = {
        "task": {t: [0, 0] for t in MMAU_TASKS},
        "difficulty": {d: [0, 0] for d in MMAU_DIFFICULTIES},
        "sub_category": {},  # first-seen order, like upstream
    }
    correct = total = 0
    for outcome in outcomes:
        _check_groups(outcome)
        keys = {"task": outcome.task, "difficulty": outcome.difficulty, "sub_category": outcome.sub_category}
        for group, key in keys.items():
            if key is None:
                continue
            tally = tallies[group].setdefault(key, [0, 0])
            tally[0] += outcome.matched
            tally[1] += 1
        correct += outcome.matched
        total += 1
    if total == 0:
        # Upstream divides by zero here.
        raise ValueError("mmau: no scored items (the official evaluation.py crashes on this)")
    summary: dict[str, Any] = {"total_accuracy": (correct / total) * 100, "n": total}
    for group, groups in tallies.items():
        summary[group] = {key: _percent(c, n) for key, (c, n) in groups.items()}
    summary["counts"] = {group: {key: n for key, (_, n) in groups.items()} for group, groups in tallies.items()}
    return summary


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, Any]:
    """Official MMAU metrics from our items/scores.

    Returns ``{"total_accuracy": pct, "n": count, "task": {...}, "difficulty": {...}, "sub_category": {...},
    "counts": {"task": {...}, "difficulty": {...}, "sub_category": {...}}}``, percentages as unrounded floats. As in
    upstream, all three tasks and difficulties are always listed (0.0 over 0 items when absent). Group keys come from
    ``item.meta["task"]``, ``item.meta["difficulty"]`` and ``item.meta.get("sub-category")``.
    """
    if len(items) != len(scores):
        raise ValueError(f"mmau: {len(items)} items but {len(scores)} scores")
    return _summarise(
        _Outcome(
            item_id=item.id,
            task=item.meta["task"],
            difficulty=item.meta["difficulty"],
            sub_category=item.meta.get("sub-category"),
            matched=bool(s.value),
        )
        for item, s in zip(items, scores)
    )


def _official_row_outcome(row: Mapping[str, Any]) -> _Outcome:
    prediction = _require_text(row[MMAU_OUTPUT_KEY], row.get("id"))
    return _Outcome(
        item_id=row.get("id"),
        task=row["task"],
        difficulty=row["difficulty"],
        sub_category=row.get("sub-category"),
        matched=string_match(row["answer"], prediction, row["choices"]),
    )


def aggregate_official_json(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score MMAU's own JSON format (the benchmark list, each prediction under ``"model_output"``) as ``evaluation.py``.

    Rows without the ``model_output`` key are skipped (in neither numerator nor denominator), exactly as upstream.
    Returns ``(summary, per_item)``: the summary as :func:`aggregate` returns it, and a copy of each scored row with
    ``"match"`` set to 1/0 (upstream sets the same key in place; the input rows are left untouched here).
    """
    scored = [row for row in rows if MMAU_OUTPUT_KEY in row]
    outcomes = [_official_row_outcome(row) for row in scored]
    summary = _summarise(outcomes)
    per_item = [{**row, "match": int(outcome.matched)} for row, outcome in zip(scored, outcomes)]
    return summary, per_item


SCORER = Scorer("mmau", score, aggregate, primary="total_accuracy", scale=100.0)
