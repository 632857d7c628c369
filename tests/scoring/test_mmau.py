"""MMAU scorer: evaluation.py's token-set rule (benchmarks.md §2.2 table), aggregation, numbers on the real file."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.scoring import mmau
from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.registry import get_scorer

MAN = ["Man", "Woman", "Child", "Robot"]
THE_MAN = ["The man", "The woman", "A child", "A robot"]
TWENTY_TWO = ["twenty-two", "seven", "eight", "eight"]


@pytest.mark.parametrize(
    ("answer", "choices", "prediction", "expected"),
    [
        ("Man", MAN, "man.", True),
        ("Man", MAN, "The speaker is a man", True),
        ("Man", MAN, "(A) Man", True),
        ("Man", MAN, "A", False),
        ("Man", MAN, "Man, not Woman", False),
        ("Man", MAN, "", False),
        ("The man", THE_MAN, "man", False),  # missing "the"
        ("The man", THE_MAN, "A man", False),  # "a" comes from "A child"
        ("twenty-two", TWENTY_TWO, "twenty two", True),
        ("twenty-two", TWENTY_TWO, "22", False),
    ],
)
def test_benchmarks_md_examples(answer: str, choices: list[str], prediction: str, expected: bool) -> None:
    assert mmau.string_match(answer, prediction, choices) is expected


def test_token_set_details() -> None:
    # A permuted copy of the answer adds no "incorrect" words, so predicting it scores as correct.
    choices = ["first: neutral, second: frustration", "first: frustration, second: neutral", "neutral"]
    assert mmau.string_match(choices[0], choices[1], choices)
    # Punctuation-only prediction has no tokens.
    assert not mmau.string_match("Man", "...!", MAN)
    # Words shared with the answer are not held against the prediction ("the" is in the answer here).
    assert mmau.string_match("The man", "the MAN, clearly", THE_MAN)
    # Unicode word characters count.
    assert mmau.string_match("Café", "café", ["Café", "Bar"])


def test_non_string_prediction_fails_loudly() -> None:
    with pytest.raises(TypeError):
        mmau.string_match("Man", None, MAN)  # type: ignore[arg-type]
    item = _item("id-123", "Man", MAN)
    with pytest.raises(ValueError, match="id-123"):
        mmau.score(item, None, random.Random(0))  # type: ignore[arg-type]


def _item(item_id: str, answer: str, choices: list[str], task: str = "sound", difficulty: str = "easy",
          sub_category: str | None = "S1") -> Item:  # fmt: skip
    meta: dict[str, Any] = {"task": task, "difficulty": difficulty}
    if sub_category is not None:
        meta["sub-category"] = sub_category
    return Item(id=item_id, subset="mmau", text=None, audio_instruction="q", choices=tuple(choices), reference=answer,
                meta=meta)  # fmt: skip


def test_score() -> None:
    item = _item("x", "Man", MAN)
    assert mmau.score(item, "a man", random.Random(0)) == Score(value=1.0, parsed=True, extracted=True)
    assert mmau.score(item, "a woman", random.Random(0)) == Score(value=0.0, parsed=True, extracted=False)


def test_aggregate_is_micro_averaged_with_groups() -> None:
    items = [
        _item("1", "Man", MAN, "sound", "easy", "S1"),
        _item("2", "Man", MAN, "sound", "hard", "S1"),
        _item("3", "Man", MAN, "music", "easy", "M1"),
        _item("4", "Man", MAN, "music", "medium", None),  # no sub-category: not tallied there
        _item("5", "Man", MAN, "music", "medium", "M1"),
    ]
    preds = ["man", "woman", "man", "man", "robot"]
    scores = [mmau.score(item, p, random.Random(0)) for item, p in zip(items, preds)]
    out = mmau.aggregate(items, scores)
    assert out["total_accuracy"] == pytest.approx(60.0)  # 3/5, not the task mean (50 + 66.7) / 2
    assert out["n"] == 5
    assert out["task"] == {"sound": pytest.approx(50.0), "music": pytest.approx(200 / 3), "speech": 0.0}
    assert out["difficulty"] == {"easy": pytest.approx(100.0), "hard": 0.0, "medium": pytest.approx(50.0)}
    assert out["sub_category"] == {"S1": pytest.approx(50.0), "M1": pytest.approx(50.0)}
    assert out["counts"] == {
        "task": {"sound": 2, "music": 3, "speech": 0},
        "difficulty": {"easy": 2, "hard": 1, "medium": 2},
        "sub_category": {"S1": 2, "M1": 2},
    }


@pytest.mark.parametrize(
    ("task", "difficulty", "bad"), [("speeches", "easy", "task"), ("speech", "Easy", "difficulty")]
)
def test_aggregate_unknown_group_raises_keyerror(task: str, difficulty: str, bad: str) -> None:
    item = _item("odd-1", "Man", MAN, task, difficulty)
    with pytest.raises(KeyError, match=f"odd-1.*{bad}"):
        mmau.aggregate([item], [mmau.score(item, "man", random.Random(0))])


def test_aggregate_empty_raises() -> None:
    with pytest.raises(ValueError):
        mmau.aggregate([], [])


def _row(row_id: str, **extra: Any) -> dict[str, Any]:
    row = {"id": row_id, "answer": "Man", "choices": MAN, "task": "speech", "difficulty": "hard", "sub-category": "C"}
    return {**row, **extra}


def test_official_json_skips_rows_without_model_output() -> None:
    rows = [_row("1", model_output="man"), _row("2"), _row("3", model_output="woman"), _row("4", model_output="")]
    summary, per_item = mmau.aggregate_official_json(rows)
    assert summary["n"] == 3
    assert summary["total_accuracy"] == pytest.approx(100 / 3)
    assert [(r["id"], r["match"]) for r in per_item] == [("1", 1), ("3", 0), ("4", 0)]
    assert all("match" not in r for r in rows)  # input left untouched


def test_official_json_errors() -> None:
    with pytest.raises(ValueError, match="'2'"):
        mmau.aggregate_official_json([_row("1", model_output="man"), _row("2", model_output=None)])
    with pytest.raises(KeyError, match="'9'"):
        mmau.aggregate_official_json([_row("9", model_output="man", task="noise")])
    with pytest.raises(ValueError):
        mmau.aggregate_official_json([_row("1")])  # nothing to score: upstream divides by zero


def test_registered() -> None:
    scorer = get_scorer("mmau")
    assert (scorer.score, scorer.aggregate, scorer.primary, scorer.scale) == (
        mmau.score, mmau.aggregate, "total_accuracy", 100,
    )  # fmt: skip


# --- the real test-mini file (HEAD version, numbers measured upstream: benchmarks.md §2.2) ----------------------------

MMAU_JSON = Path(os.environ.get("SPEECHLM_EVAL_MMAU_JSON", "/work/shared/data/mmau-test-mini.json"))
MMAU_SHA256 = "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c"
LETTERS = "ABCDEFGH"


@pytest.fixture(scope="module")
def mmau_rows() -> list[dict[str, Any]]:
    if not MMAU_JSON.exists():
        pytest.skip(f"MMAU test-mini JSON not found at {MMAU_JSON}")
    raw = MMAU_JSON.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == MMAU_SHA256, "the expected numbers hold for the HEAD file only"
    return json.loads(raw)


def _letter(row: dict[str, Any]) -> str:
    return LETTERS[row["choices"].index(row["answer"])]


FORMATS: dict[str, tuple[Callable[[dict[str, Any]], str], int]] = {
    "raw answer": (lambda r: r["answer"], 1000),
    "Answer: <text>": (lambda r: f"Answer: {r['answer']}", 1000),
    "(A) <text>": (lambda r: f"({_letter(r)}) {r['answer']}", 967),
    "A. <text>": (lambda r: f"{_letter(r)}. {r['answer']}", 967),
    "The answer is <text>.": (lambda r: f"The answer is {r['answer']}.", 907),
    "letter only": (_letter, 2),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_real_file_prediction_formats(mmau_rows: list[dict[str, Any]], fmt: str) -> None:
    make, expected_correct = FORMATS[fmt]
    summary, per_item = mmau.aggregate_official_json([{**r, "model_output": make(r)} for r in mmau_rows])
    assert summary["n"] == 1000
    assert sum(r["match"] for r in per_item) == expected_correct
    assert summary["total_accuracy"] == pytest.approx(expected_correct / 10)


def test_real_file_group_counts(mmau_rows: list[dict[str, Any]]) -> None:
    summary, _ = mmau.aggregate_official_json([{**r, "model_output": r["answer"]} for r in mmau_rows])
    assert summary["counts"]["task"] == {"sound": 333, "music": 334, "speech": 333}
    assert summary["counts"]["difficulty"] == {"easy": 224, "hard": 236, "medium": 540}
    assert len(summary["counts"]["sub_category"]) == 27
    assert summary["counts"]["sub_category"]["Phonemic Stress Pattern Analysis"] == 53
    assert summary["counts"]["sub_category"]["Lyrical Reasoning"] == 10
    assert sum(summary["counts"]["sub_category"].values()) == 1000


def test_real_file_wrong_choices_that_score(mmau_rows: list[dict[str, Any]]) -> None:
    # 12 (item, wrong choice) pairs in 9 items score as correct; a uniformly random choice expects 26.15%.
    pairs = [
        (r["id"], c) for r in mmau_rows for c in r["choices"]
        if c != r["answer"] and mmau.string_match(r["answer"], c, r["choices"])
    ]  # fmt: skip
    assert (len(pairs), len({item_id for item_id, _ in pairs})) == (12, 9)
    expected_random = sum(
        sum(mmau.string_match(r["answer"], c, r["choices"]) for c in r["choices"]) / len(r["choices"])
        for r in mmau_rows
    ) / len(mmau_rows)
    assert round(100 * expected_random, 2) == 26.15


def test_real_file_item_path_agrees_with_official_json(mmau_rows: list[dict[str, Any]]) -> None:
    items = [
        Item(id=r["id"], subset="mmau", text=None, audio_instruction=r["question"], choices=tuple(r["choices"]),
             reference=r["answer"], meta={k: r[k] for k in ("task", "difficulty", "sub-category")})
        for r in mmau_rows
    ]  # fmt: skip
    preds = [f"The answer is {r['answer']}." for r in mmau_rows]
    scores = [mmau.score(item, p, random.Random(0)) for item, p in zip(items, preds)]
    official, _ = mmau.aggregate_official_json([{**r, "model_output": p} for r, p in zip(mmau_rows, preds)])
    assert mmau.aggregate(items, scores) == official
