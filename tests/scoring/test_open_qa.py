"""VoiceBench's judged scorers on attached judge outputs: open (float / [[n]] parsing, flattened mean, unparsed
outputs reported instead of crashing) and qa (case-insensitive exact 'yes' majority, seeded tie-break, panda opt-in)."""

from __future__ import annotations

import math
import random
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import joblib
import numpy as np
import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.scoring import open_ended, qa
from speechlm_eval.scoring.judged import MissingJudgement, attach_judgements, response_key
from speechlm_eval.scoring.open_ended import parse_rating
from speechlm_eval.scoring.qa import PEDANT_DIR_ENV, majority_vote
from speechlm_eval.scoring.registry import get_scorer

RESPONSE = "The response under judgement."


def judged(item: Item, outputs: Sequence[str], response: str = RESPONSE):
    """``item`` with ``outputs`` attached as the judge's verdict on ``response``."""
    return attach_judgements(item, [{"id": item.id, "response_sha256": response_key(response), "outputs": outputs}])


def open_item(n: int = 0) -> Item:
    return Item(id=f"alpacaeval_full/test/{n}", subset="alpacaeval_full", text="Write a haiku about rain.")


def qa_item(n: int = 0, reference: str = "Paris") -> Item:
    return Item(id=f"sd-qa/usa/{n}", subset="sd-qa", text="What is the CAPITAL of France?", reference=reference)


# --------------------------------------------------------------------------------------------------------------------
# open


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("4", 4.0),
        (" 4.5 ", 4.5),  # float() accepts surrounding whitespace and decimals
        ("7", 7.0),  # no clamping to 1-5, as upstream
        ("-1", -1.0),
        ("1e0", 1.0),
        ("Rating: [[4]]", 4.0),
        ("[[2]] but later [[5]]", 2.0),  # the first [[n]]
        ("[[4.5]]", None),  # the regex takes digits only
        ("[4]", None),
        ("four", None),
        ("Score: 4", None),
        ("", None),
    ],
)
def test_parse_rating(output: str, expected: float | None) -> None:
    assert parse_rating(output) == expected


def test_parse_rating_keeps_floats_odd_inputs() -> None:
    assert math.isnan(parse_rating("nan")) and parse_rating("inf") == math.inf


def test_open_item_score_is_the_mean_of_its_ratings() -> None:
    scored = open_ended.score(judged(open_item(), ["4", "[[5]]", "3"]), RESPONSE, random.Random(0))
    assert (scored.value, scored.parsed, scored.extracted) == (4.0, True, (4.0, 5.0, 3.0))


def test_unparsed_output_is_recorded_not_raised() -> None:
    partly = open_ended.score(judged(open_item(), ["5", "I think it is good", "4"]), RESPONSE, random.Random(0))
    assert (partly.value, partly.parsed) == (4.5, False)
    assert partly.details["unparsed_outputs"] == ["I think it is good"]
    none = open_ended.score(judged(open_item(), ["good", "fine", "ok"]), RESPONSE, random.Random(0))
    assert math.isnan(none.value) and not none.parsed and none.extracted == (None, None, None)


def test_open_aggregate_flattens_like_upstream() -> None:
    items = [open_item(0), open_item(1)]
    outputs = [["5", "garbage", "5"], ["1", "2", "3"]]
    scores = [open_ended.score(judged(it, out), RESPONSE, random.Random(0)) for it, out in zip(items, outputs)]
    result = open_ended.aggregate(items, scores)
    # Mean over the five parsed ratings (16/5), not the mean of item means ((5 + 2) / 2).
    assert result["gpt"] == float(np.mean([5.0, 5.0, 1.0, 2.0, 3.0])) == 3.2
    assert result["unparsed_outputs"] == 1 and "NotImplementedError" in result["note"]
    clean = open_ended.aggregate(items[1:], scores[1:])
    assert clean == {"gpt": 2.0}  # exactly upstream's dict when every output parses
    assert math.isnan(open_ended.aggregate([], [])["gpt"])


def test_open_is_registered() -> None:
    scorer = get_scorer("open")
    assert (scorer.primary, scorer.scale) == ("gpt", 1.0) and scorer.score is open_ended.score


def test_scoring_without_judgements_is_a_clear_error() -> None:
    with pytest.raises(MissingJudgement, match="judge the run"):
        open_ended.score(open_item(), RESPONSE, random.Random(0))
    with pytest.raises(MissingJudgement):
        qa.score(judged(qa_item(), ["yes"] * 3, response="another response"), RESPONSE, random.Random(0))


# --------------------------------------------------------------------------------------------------------------------
# qa


@pytest.mark.parametrize(
    ("outputs", "correct"),
    [
        (["Yes", "yes", "No"], True),
        (["YES", "No", "no"], False),
        (["Yes.", "Yes.", "yes"], False),  # "yes." wins the vote and is not exactly "yes"
        (["Yes", "Yes.", "Yes."], False),
        (["yes\nBecause...", "yes\nBecause...", "Yes"], False),
        (["Yes", "Yes", "Yes"], True),
        (["no", "nope", "incorrect"], False),  # a tie without "yes" cannot be correct whatever the order
    ],
)
def test_qa_vote(outputs: list[str], correct: bool) -> None:
    scored = qa.score(judged(qa_item(), outputs), RESPONSE, random.Random(0))
    assert scored.value == float(correct) and scored.parsed
    assert scored.details["votes"] == [o.lower() for o in outputs]


def test_qa_tie_is_a_seeded_draw_flagged_unparsed() -> None:
    outputs = ["Yes", "No", "Maybe"]
    winners = {majority_vote(outputs, random.Random(seed))[0] for seed in range(30)}
    assert winners == {"yes", "no", "maybe"}  # every tied output can win: the draw is not rigged
    for seed in range(5):  # the same seed always gives the same result
        first = qa.score(judged(qa_item(), outputs), RESPONSE, random.Random(seed))
        again = qa.score(judged(qa_item(), outputs), RESPONSE, random.Random(seed))
        assert first == again and not first.parsed
        assert first.value == float(first.extracted == "yes")
    assert majority_vote(["no", "nope", "x"], random.Random(0))[1] is False  # the draw cannot change the outcome


def test_qa_aggregate_without_pedant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEDANT_DIR_ENV, raising=False)
    items = [qa_item(i) for i in range(4)]
    outputs = [["Yes"] * 3, ["No"] * 3, ["yes", "yes", "no"], ["Yes.", "no", "no"]]
    scores = [qa.score(judged(it, out), RESPONSE, random.Random(0)) for it, out in zip(items, outputs)]
    result = qa.aggregate(items, scores)
    assert result["gpt"] == 50.0 and "panda" not in result
    assert PEDANT_DIR_ENV in result["panda_note"] and "0.2.17" in result["panda_note"]
    assert (get_scorer("qa").primary, get_scorer("qa").scale) == ("gpt", 100.0)


def test_qa_panda_needs_qa_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(PEDANT_DIR_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "qa_metrics", None)  # importing it raises ImportError, as when not installed
    qa._load_pedant.cache_clear()
    try:
        scores = [qa.score(judged(qa_item(), ["yes"] * 3), RESPONSE, random.Random(0))]
        result = qa.aggregate([qa_item()], scores)
        assert "panda" not in result and "cannot be imported" in result["panda_note"]
    finally:
        qa._load_pedant.cache_clear()


# A stand-in for the optional qa_metrics package (not installed here): same import path and PEDANT.evaluate call
# shape, a toy rule instead of the classifier. Its __init__ raises: ours must never run it (it downloads pickles).
STAND_IN_PEDANT = '''
class PEDANT:
    def __init__(self):
        raise RuntimeError("PEDANT.__init__ would download classifier files")

    def evaluate(self, reference, candidate, question):
        self.model["calls"].append((reference, candidate, question))
        return reference[0] in candidate and self.tokenizer["question_word"] in question
'''


def test_qa_panda_with_user_supplied_classifier_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "site" / "qa_metrics"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pedant.py").write_text(textwrap.dedent(STAND_IN_PEDANT))
    files = tmp_path / "classifier"
    files.mkdir()
    joblib.dump({"calls": []}, files / "lr_classifier.pkl")
    joblib.dump({"question_word": "capital"}, files / "tf-idf_vectorizer.pkl")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("qa_metrics", "qa_metrics.pedant"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv(PEDANT_DIR_ENV, str(files))
    qa._load_pedant.cache_clear()
    try:
        items = [qa_item(0, "Paris"), qa_item(1, "PARIS"), qa_item(2, "Lyon")]
        responses = ["It is Paris.", "paris, of course", "It is Paris."]
        scores = [qa.score(judged(it, ["yes"] * 3, r), r, random.Random(0)) for it, r in zip(items, responses)]
        assert [s.details["panda"] for s in scores] == [True, True, False]  # all three strings lower-cased first
        evaluate, _ = qa.pedant_status()
        assert evaluate.__self__.model["calls"][0] == (["paris"], "it is paris.", "what is the capital of france?")
        result = qa.aggregate(items, scores)
        assert list(result)[:2] == ["panda", "gpt"]
        assert result["panda"] == pytest.approx(200 / 3) and result["gpt"] == 100.0
        assert "qa_metrics unknown" in result["panda_note"]  # the stand-in has no 0.2.17 metadata

        (files / "tf-idf_vectorizer.pkl").unlink()
        monkeypatch.setenv(PEDANT_DIR_ENV, str(files) + "/")  # another value: looked up afresh
        assert qa.pedant_status()[0] is None and "not found" in qa.pedant_status()[1]
    finally:
        qa._load_pedant.cache_clear()
