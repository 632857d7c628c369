"""Suite specs and load_suite: parsing, validation messages, provenance, limits, duplicate ids, the registry."""

from __future__ import annotations

import json

import pytest

from speechlm_eval.data import voicebench
from speechlm_eval.data.registry import DataError, SubsetRequest, benchmark_names, scorer_for_subset
from speechlm_eval.data.suite import load_suite, parse_suite


def _labels(spec: str) -> list[str]:
    return [request.label() for request in parse_suite(spec)]


def test_parse_explicit_subsets_and_split() -> None:
    assert parse_suite("voicebench:mmsu,openbookqa,bbh") == [
        SubsetRequest("voicebench", "mmsu"), SubsetRequest("voicebench", "openbookqa"),
        SubsetRequest("voicebench", "bbh"),
    ]  # fmt: skip
    assert parse_suite("voicebench:sd-qa@usa") == [SubsetRequest("voicebench", "sd-qa", "usa")]
    assert _labels("voicebench:sd-qa@all") == ["voicebench:sd-qa@all"]


def test_parse_bare_names() -> None:
    assert _labels("voicebench") == [f"voicebench:{s}" for s in voicebench.LEADERBOARD_SUBSETS]
    assert _labels("mmau") == ["mmau:mmau"]
    assert len(parse_suite("bundled")) == 10
    assert _labels("bundled:openbookqa,mmau") == ["bundled:openbookqa", "bundled:mmau"]
    assert _labels("bundled:bbh; mmau") == ["bundled:bbh", "mmau:mmau"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nope", "unknown benchmark 'nope'.*bundled, mmau, organism, voicebench"),
        ("voicebench:nope", "no subset 'nope'; valid: alpacaeval_full"),
        ("bundled:mmau,nope", "no subset 'nope'"),
        ("voicebench:sd-qa@mars", "no split 'mars'; valid: aus"),
        ("bundled:bbh@test", "takes no explicit split"),
        ("voicebench:mtbench", "not supported"),
        ("voicebench:", "bad subset"),
        ("voicebench:sd-qa@", "bad subset"),
        ("  ", "empty suite"),
    ],
)
def test_parse_errors_list_valid_names(spec: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        parse_suite(spec)


def test_load_suite_bundled_with_sources() -> None:
    items, sources = load_suite(parse_suite("bundled:openbookqa,sd-qa,mmau"), limit=2)
    assert [item.id for item in items] == [
        "bundled/openbookqa/test/0", "bundled/openbookqa/test/1", "bundled/sd-qa/usa/0", "bundled/sd-qa/usa/1",
        "bundled/mmau-speech-1", "bundled/mmau-speech-2",
    ]  # fmt: skip
    assert json.loads(json.dumps(sources)) == sources
    assert [(s["benchmark"], s["subset"], s["n"], s["scorer"]) for s in sources] == [
        ("bundled", "openbookqa", 2, "mcq"), ("bundled", "sd-qa", 2, "qa"), ("bundled", "mmau", 2, "mmau"),
    ]  # fmt: skip
    assert sources[1]["n_by_split"] == {"usa": 2} and len(sources[0]["sha256"]) == 64


def test_duplicate_item_ids_rejected() -> None:
    with pytest.raises(DataError, match="loaded twice"):
        load_suite(parse_suite("bundled:bbh,bbh"))


def test_bad_limit_rejected() -> None:
    with pytest.raises(DataError, match="limit"):
        load_suite(parse_suite("bundled:bbh"), limit=0)


def test_registry() -> None:
    assert benchmark_names() == ["bundled", "mmau", "organism", "voicebench"]
    assert scorer_for_subset("organism_mcq") == "mcq"
    assert scorer_for_subset("openbookqa") == "mcq" and scorer_for_subset("mmau") == "mmau"
    assert scorer_for_subset("sd-qa") == "qa" and scorer_for_subset("advbench") == "harm"
    with pytest.raises(DataError, match="unknown"):
        scorer_for_subset("nope")
