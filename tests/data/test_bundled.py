"""The bundled mini-suite: loads offline, VoiceBench/MMAU formats, references in each scorer's format, short prompts."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from speechlm_eval.data import bundled, voicebench
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import DataError, LoadOptions, SubsetRequest, get_benchmark

EXPECTED_SIZES = {
    "openbookqa": 4, "mmsu": 4, "bbh": 4, "advbench": 3, "ifeval": 3, "alpacaeval_full": 3, "commoneval": 2,
    "wildvoice": 2, "sd-qa": 3, "mmau": 4,
}  # fmt: skip
OFFICIAL_SCORERS = {"mcq", "bbh", "harm", "ifeval", "open", "qa", "mmau"}


@pytest.fixture(scope="module")
def items() -> dict[str, list[Item]]:
    return {s: bundled.load_bundled(SubsetRequest("bundled", s), LoadOptions()) for s in bundled.SUBSETS}


def test_every_subset_loads_with_expected_size(items: dict[str, list[Item]]) -> None:
    assert {subset: len(loaded) for subset, loaded in items.items()} == EXPECTED_SIZES
    every = [item for loaded in items.values() for item in loaded]
    assert all(item.id.startswith("bundled/") and item.audio is None for item in every)
    assert len({item.id for item in every}) == len(every)
    assert all(item.subset == subset for subset, loaded in items.items() for item in loaded)
    assert all(item.text_to_speak() and len(item.text_to_speak()) < 200 for item in every)


def test_every_subset_has_an_official_scorer_name() -> None:
    benchmark = get_benchmark("bundled")
    assert set(benchmark.subsets) == set(EXPECTED_SIZES)
    assert set(benchmark.scorer.values()) <= OFFICIAL_SCORERS
    for subset in bundled.VOICEBENCH_FORMAT:
        assert benchmark.scorer_for(subset) == voicebench.SUBSETS[subset].scorer
    assert benchmark.scorer_for("mmau") == "mmau"


def test_voicebench_format_references(items: dict[str, list[Item]]) -> None:
    for subset in ("openbookqa", "mmsu"):
        for item in items[subset]:
            assert item.reference in "ABCD" and f"{item.reference}. " in item.text
    assert [item.id for item in items["sd-qa"]] == [f"bundled/sd-qa/usa/{i}" for i in range(3)]
    assert all(isinstance(item.reference, str) and item.reference for item in items["sd-qa"])
    for subset in ("advbench", "alpacaeval_full", "commoneval", "wildvoice"):
        assert all(item.reference is None and item.has_text_equivalent for item in items[subset])


def test_bbh_covers_the_four_tasks(items: dict[str, list[Item]]) -> None:
    tasks = ("sports_understanding", "hyperbaton", "navigate", "web_of_lies")
    for item, task in zip(items["bbh"], tasks):
        assert re.fullmatch(rf"bbh_{task}_\d+", item.meta["id"])
        assert item.reference in {"yes", "no", "(A)", "(B)"}
    assert items["bbh"][1].reference in {"(A)", "(B)"}


def test_ifeval_in_dataset_format(items: dict[str, list[Item]]) -> None:
    ids = [i for item in items["ifeval"] for i in item.meta["instruction_id_list"]]
    assert ids == ["punctuation:no_comma", "length_constraints:number_words", "change_case:english_lowercase"]
    key_sets = {frozenset(kwargs) for item in items["ifeval"] for kwargs in item.meta["kwargs"]}
    assert len(key_sets) == 1 and len(next(iter(key_sets))) == 24  # every key present, absent ones null
    words = items["ifeval"][1].meta["kwargs"][0]
    assert (words["relation"], words["num_words"]) == ("less than", 40)
    assert sum(v is not None for v in words.values()) == 2
    assert all(isinstance(item.meta["key"], int) for item in items["ifeval"])


def test_mmau_style_items_speak_a_sentence(items: dict[str, list[Item]]) -> None:
    for item in items["mmau"]:
        assert item.text is None and not item.has_text_equivalent
        assert item.speak and item.text_to_speak() == item.speak
        assert item.reference in item.choices and item.meta["task"] == "speech"
        # The MMAU scorer needs the answer's words in the spoken sentence, or the item is unanswerable.
        assert set(re.findall(r"\b\w+\b", item.reference.lower())) <= set(re.findall(r"\b\w+\b", item.speak.lower()))
    assert items["mmau"][0].speak == "The meeting moved to Thursday at noon."
    assert Counter(item.meta["difficulty"] for item in items["mmau"]) == {"easy": 4}


def test_limit_and_bad_requests() -> None:
    assert len(bundled.load_bundled(SubsetRequest("bundled", "bbh"), LoadOptions(limit=2))) == 2
    with pytest.raises(DataError, match="valid: .*openbookqa"):
        bundled.load_bundled(SubsetRequest("bundled", "nope"), LoadOptions())
    with pytest.raises(DataError, match="single split"):
        bundled.load_bundled(SubsetRequest("bundled", "bbh", "test"), LoadOptions())
