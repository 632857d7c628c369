"""Tests of the official-compatible VoiceBench BBH scorer.

Expected labels were derived by reading upstream ``src/evaluator/bbh.py`` (MatthewCYM/VoiceBench, the 846-line version
with the rules ``the correct grammatical order is a`` and ``startswith('the following sentence is plausible')``);
"line N" names the upstream line a case pins. Labels: 0 = no or (A), 1 = yes or (B), None = upstream's random fallback.
"""

from __future__ import annotations

import random
import re

import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.scoring import bbh
from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.bbh_rules import (
    HYPERBATON_RULES,
    NAVIGATE_RULES,
    SPORTS_UNDERSTANDING_RULES,
    TASK_CHAINS,
    WEB_OF_LIES_RULES,
    YES_NO_RULES,
)
from speechlm_eval.scoring.registry import get_scorer

Case = tuple[str, int | None]  # (response, expected label)

# The three cases benchmarks.md §1.5 ran through the official function.
BENCHMARKS_MD_CASES: list[tuple[str, str, int | None]] = [
    ("hyperbaton", "The answer is (B).", 1),  # line 39
    ("hyperbaton", "b", 0),  # line 35: upstream bug, a bare "b" reads as (A)
    ("web_of_lies", "Therefore, Bob must be lying", 1),  # line 568: upstream bug, "must be lying" reads as yes
]

SPORTS_REGEX_QUIRK: list[Case] = [
    # Line 814: with words between "the sentence" and "is not plausible" the regex fires and reads it as plausible...
    ('The sentence "Joao Moutinho caught the screen pass in the NFC championship" is not plausible.', 1),
    # ...while the plain phrase is caught earlier, at line 696, as not plausible.
    ("The sentence is not plausible.", 0),
]

# Normalisation (lines 21-30), seen through the chains. Each response only parses because of the step it names.
NORMALISATION_CASES: list[tuple[str, str, int | None]] = [
    ("hyperbaton", "The answer is: (A)", 0),  # ":" -> " " gives "the answer is (a)", line 37
    ("hyperbaton", "**The answer is (B)**", 1),  # "**" removed, line 39
    ("hyperbaton", "THE ANSWER IS (A)", 0),  # lower-cased, line 37
    ("hyperbaton", "the   answer\n\nis  (b)", 1),  # whitespace collapsed, line 39
    ("hyperbaton", "B: the second one", 1),  # ":" -> " " makes it start with "b ", line 447
    ("sports_understanding", 'The answer is "no"', 0),  # quotes removed: "answer is no", line 459
    ("sports_understanding", "Final-answer: yes", 1),  # "-" and ":" -> "final answer yes", line 469
    ("navigate", "In conclusion, no", 0),  # "," removed: "conclusion no", line 515
    ("web_of_lies", "Bob is lying.", 0),  # "." removed, so it ends with "is lying", line 562
    ("sports_understanding", "The answer is\uff1ayes", 1),  # full-width colon -> "answer is yes", line 461
    ("navigate", "<2>No, you end up two steps to the left", 0),  # "<2>" dropped, then starts with "no", line 667
    ("navigate", "<4>No, it isn't", None),  # only <1>..<3> are dropped: "<4>no" starts with neither no nor yes
    ("navigate", "I think no<|user|>", 0),  # trailing "<|user|>" dropped, then ends with "no", line 671
    ("web_of_lies", "I think yes<|turn_end|>", 1),  # "<|turn_end|>" removed, then ends with "yes", line 586
    ("sports_understanding", "It's not a plausible sentence", None),  # "'" is kept, so line 706 ("it s") cannot fire
    ("navigate", "We are back at the starting point!", 1),  # "!" is kept, line 647
    ("navigate", "We are back at the starting point.", None),  # "." removed, so line 647's "point!" cannot fire
    # Line 702 keeps its "." but normalisation removes every ".", so that rule can never fire.
    ("sports_understanding", "I would say that it is not a plausible sentence.", None),
]

# The shared yes/no chain (lines 458-520), tried before each of these three tasks' own rules.
YES_NO_CASES: list[Case] = [
    ("The answer is yes.", 1),  # line 461
    ("Answer is yes; no wait, the answer is no", 0),  # line 459 ("answer is no") precedes line 461
    ("The answer is not obvious, but yes", 0),  # line 459: "answer is no" is a prefix of "answer is not"
    ("Final answer: false", 0),  # line 487 "answer false"
    ("The answer is \\boxed{yes}", 1),  # line 497: backslash and braces survive normalisation
    ("The answer is $\\boxed{\\text{true}}$.", 1),  # line 493
]

HYPERBATON_CASES: list[Case] = [
    ("a", 0),  # line 33
    ("B.", 0),  # "." removed, then line 35's bug
    ("The correct answer is (B). So the answer is (A).", 0),  # line 37 ("the answer is (a)") precedes line 63
    ("The answer is (B) or the answer is (A)", 0),  # a is tried before b, whatever the position: line 37
    ("The correct option is B, so the answer is A", 0),  # line 165 ("answer is a") precedes line 283
    ("The answer is about order: option B is the correct one.", 0),  # line 165 fires inside "answer is about"
    ("Sentence B, in my view, seems to have a more logical order", 1),  # regex, line 439
    ("A is correct", 0),  # startswith "a ", line 445
    ("B is correct", 1),  # startswith "b ", line 447
    ("b) the second one", 1),  # startswith "b)", line 451
    ("(B)", None),  # no rule matches a bare "(b)"
    ("The answer is yes", None),  # hyperbaton does not use the yes/no chain
    ("I am not sure which one.", None),
]

WEB_OF_LIES_CASES: list[Case] = [
    ("The answer is no, Bob tells the truth", 0),  # yes/no chain (line 459) before lines 548 and 572
    ("The answer is Bob lies and Ka tells the truth", 0),  # regex line 538 precedes regex line 548
    ("The answer is that Ka tells the truth", 1),  # regex line 548
    ("Sherrie tells the lie", 0),  # endswith, line 564
    ("So Jim tells the truth.", 1),  # endswith, line 572
    ("Everyone lies", 0),  # endswith "lies", line 578
    ("No, Bob is honest, so yes", 0),  # startswith "no" (line 580) before endswith "yes" (line 586)
    ("Yes, I think no", 1),  # startswith "yes" (line 582) before endswith "no" (line 584)
    ("I believe it would be no", 0),  # endswith "no", line 584
    ("I cannot determine this.", None),
]

NAVIGATE_CASES: list[Case] = [
    ("You do not return to the starting point.", 0),  # line 597
    ("You return to the starting point? No, you are not at the starting point.", 0),  # line 599 precedes line 605
    ("So you return to the starting point", 1),  # line 605
    ("Yes. The answer is no.", 0),  # yes/no chain (line 459) before startswith "yes" (line 669)
    ("Nothing changes, you are back where you began", 0),  # startswith "no" also fires on "nothing", line 667
    ("After all the steps, I'd say yes", 1),  # endswith "yes", line 673
    ("Take 3 steps forward and turn around", None),
]

SPORTS_CASES: list[Case] = [
    ("The answer is no; making it plausible", 0),  # yes/no chain (line 459) before line 710
    ("Considering these points, the sentence is not plausible, making it plausible only in fiction", 0),  # 696 < 710
    ("Final answer: the sentence is plausible", 1),  # line 682 (the yes/no chain has no match)
    ("Is the sentence plausible? Yes, it is", 1),  # line 700: "?" survives normalisation
    ("Not really plausible", 0),  # startswith "no" also fires on "not", line 816
    ("The following sentence is plausible? I'd say no", 1),  # startswith (line 820) before endswith "no" (822)
    ("Kobe scored, so yes", 1),  # endswith "yes", line 824
    ("It depends on the context", None),
]


def _ids(cases: list[Case]) -> list[str]:
    return [response[:40] for response, _ in cases]


def test_benchmarks_md_cases() -> None:
    for task, response, expected in BENCHMARKS_MD_CASES:
        assert bbh.extract_label(task, response) == expected, (task, response)


@pytest.mark.parametrize(("response", "expected"), SPORTS_REGEX_QUIRK, ids=_ids(SPORTS_REGEX_QUIRK))
def test_sports_regex_quirk(response: str, expected: int) -> None:
    assert bbh.extract_label("sports_understanding", response) == expected


@pytest.mark.parametrize(("task", "response", "expected"), NORMALISATION_CASES)
def test_normalisation_through_chains(task: str, response: str, expected: int | None) -> None:
    assert bbh.extract_label(task, response) == expected


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("A: b **c** \"d\" e-f g,h i.j k\uff1al", "a b c d e f g h i j k l"),
        ("  Many \t spaces\n\nhere  ", "many spaces here"),
        ("a<|user|>b", "a<|user|>b"),  # only a trailing "<|user|>" is dropped
        ("Yes <|USER|>", "yes"),  # lower-cased before the suffix check
        ("<1>  x", "x"),
        ("x <1>", "x <1>"),  # the channel tag is dropped only at the start
        ("<1>yes<|user|>", "yes"),  # suffix first, then prefix
        (" <1>x<|user|>", "x"),  # dropping the suffix strips, which exposes the prefix
        (" <1>x", "<1>x"),  # without a suffix nothing is stripped before the prefix check
        ("<|turn_end|><1>x", "<1>x"),  # the prefix check runs before "<|turn_end|>" is removed
        ("a<|turn_end|>b", "ab"),  # removed, not replaced by a space
        ("a***b", "a *b"),  # "**" is replaced; a lone "*" stays
        ("it's (a)! [b]? \\c", "it's (a)! [b]? \\c"),  # apostrophes, brackets, "!", "?" and backslashes stay
    ],
)
def test_normalize(raw: str, normalised: str) -> None:
    assert bbh.normalize(raw) == normalised


@pytest.mark.parametrize("task", ["sports_understanding", "navigate", "web_of_lies"])
@pytest.mark.parametrize(("response", "expected"), YES_NO_CASES, ids=_ids(YES_NO_CASES))
def test_shared_yes_no_chain(task: str, response: str, expected: int) -> None:
    assert bbh.extract_label(task, response) == expected


@pytest.mark.parametrize(("response", "expected"), HYPERBATON_CASES, ids=_ids(HYPERBATON_CASES))
def test_hyperbaton(response: str, expected: int | None) -> None:
    assert bbh.extract_label("hyperbaton", response) == expected


@pytest.mark.parametrize(("response", "expected"), WEB_OF_LIES_CASES, ids=_ids(WEB_OF_LIES_CASES))
def test_web_of_lies(response: str, expected: int | None) -> None:
    assert bbh.extract_label("web_of_lies", response) == expected


@pytest.mark.parametrize(("response", "expected"), NAVIGATE_CASES, ids=_ids(NAVIGATE_CASES))
def test_navigate(response: str, expected: int | None) -> None:
    assert bbh.extract_label("navigate", response) == expected


@pytest.mark.parametrize(("response", "expected"), SPORTS_CASES, ids=_ids(SPORTS_CASES))
def test_sports_understanding(response: str, expected: int | None) -> None:
    assert bbh.extract_label("sports_understanding", response) == expected


def test_rule_tables_are_complete_and_well_formed() -> None:
    # Rule counts of each upstream chain (lines 32-456, 458-520, 522-591, 593-678, 680-829): a lost or extra row fails.
    assert [len(t) for t in (HYPERBATON_RULES, YES_NO_RULES, WEB_OF_LIES_RULES, NAVIGATE_RULES)] == [210, 30, 31, 39]
    assert len(SPORTS_UNDERSTANDING_RULES) == 71
    assert list(TASK_CHAINS) == ["sports_understanding", "hyperbaton", "navigate", "web_of_lies"]
    for chain in TASK_CHAINS.values():
        for kind, pattern, label in chain:
            assert kind in {"equals", "contains", "regex", "startswith", "endswith"}
            assert label in (0, 1)
            if kind == "regex":
                re.compile(pattern)


def test_unknown_rule_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown rule kind"):
        bbh.rule_matches(("fuzzy", "x", 1), "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source_id", "task"),
    [
        ("bbh_hyperbaton_17", "hyperbaton"),
        ("web_of_lies/3", "web_of_lies"),
        # An id naming several tasks goes to the first in upstream's order (lines 10-17).
        ("navigate_sports_understanding", "sports_understanding"),
        ("web_of_lies_navigate", "navigate"),
    ],
)
def test_task_dispatch(source_id: str, task: str) -> None:
    assert bbh.task_of(source_id) == task


def test_unknown_task_id_names_the_id() -> None:
    with pytest.raises(ValueError, match="causal_judgement_4"):
        bbh.extract_label("causal_judgement_4", "yes")


def _item(reference: str, source_id: str = "hyperbaton_5") -> Item:
    return Item(id="bbh/test/5", subset="bbh", text="Which sentence?", reference=reference, meta={"id": source_id})


@pytest.mark.parametrize(
    ("reference", "response", "value"),
    [("(B)", "The answer is (B).", 1.0), ("(a)", "The answer is (B).", 0.0), ("(A)", "b", 1.0)],
)
def test_score_parsed(reference: str, response: str, value: float) -> None:
    result = bbh.score(_item(reference), response, random.Random(0))
    assert result == Score(value=value, parsed=True, extracted=bbh.extract_label("hyperbaton", response),
                           details={"task": "hyperbaton"})


@pytest.mark.parametrize(("reference", "label"), [("yes", 1), ("No", 0), ("(a)", 0), ("(B)", 1)])
def test_gold_labels(reference: str, label: int) -> None:
    assert bbh.gold_label(reference) == label
    # The gold label decides correctness: a response reading as that label scores 1.
    response = {0: "no", 1: "yes"}[label]
    assert bbh.score(_item(reference, "navigate_2"), response, random.Random(0)).value == 1.0


def test_unknown_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="maybe"):
        bbh.gold_label("maybe")


def test_score_unparsed_uses_the_seeded_draw() -> None:
    values = set()
    for seed in range(20):
        result = bbh.score(_item("(B)"), "I am not sure which one.", random.Random(seed))
        drawn = random.Random(seed).choice([0, 1])  # the same draw upstream makes, here seeded
        assert (result.parsed, result.extracted) == (False, None)
        assert result.value == float(drawn == 1)
        assert result.details["random_label"] == drawn
        values.add(result.value)
    assert values == {0.0, 1.0}  # the outcome really comes from the rng


def test_score_needs_a_source_id_naming_a_task() -> None:
    no_meta = Item(id="bbh/test/1", subset="bbh", text="q", reference="yes")
    with pytest.raises(ValueError, match="bbh/test/1"):
        bbh.score(no_meta, "yes", random.Random(0))
    with pytest.raises(ValueError, match="date_understanding_1"):
        bbh.score(_item("yes", "date_understanding_1"), "yes", random.Random(0))


def test_aggregate() -> None:
    scores = [
        Score(1.0, parsed=True, extracted=1),
        Score(0.0, parsed=True, extracted=0),
        Score(1.0, parsed=False),
        Score(0.0, parsed=False),
        Score(1.0, parsed=True, extracted=0),
    ]
    assert bbh.aggregate([None] * 5, scores) == {"acc": pytest.approx(60.0), "fail": pytest.approx(40.0)}
    with pytest.raises(ValueError):
        bbh.aggregate([], [])


def test_registered() -> None:
    scorer = get_scorer("bbh")
    assert (scorer.score, scorer.aggregate, scorer.primary, scorer.scale) == (bbh.score, bbh.aggregate, "acc", 100)
