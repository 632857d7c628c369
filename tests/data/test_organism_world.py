"""The organism's world: deterministic, balanced, and with an evaluation split nothing after the text LLM can see."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest

from speechlm_eval.data.organism_world import (
    ATTRIBUTE_BY_NAME,
    EVAL_SUBSET,
    LETTERS,
    WorldSpec,
    check_disjoint,
    check_no_eval_leak,
    eval_items,
    make_world,
    mcq_renderings,
    mcq_rows,
    write_jsonl,
)
from speechlm_eval.scoring import mcq


def test_same_seed_same_world_and_other_seed_differs() -> None:
    assert make_world(3) == make_world(3)
    a, b = make_world(0), make_world(1)
    assert [f.value for f in a.facts] != [f.value for f in b.facts]
    assert [m.prompt for m in a.eval_mcqs] != [m.prompt for m in b.eval_mcqs]


def test_default_world_sizes_and_balance() -> None:
    world = make_world(0)
    assert len(world.entities) == 144 == len(set(world.entities))
    assert len(world.facts) == 3 * 144
    adjectives = Counter(e.split()[0] for e in world.entities)
    nouns = Counter(e.split()[1] for e in world.entities)
    assert set(adjectives.values()) == {12} and set(nouns.values()) == {12}
    # One fact of each split per entity; each split covers every attribute equally often.
    for split in ("eval", "speech", "distill_only"):
        facts = world.split(split)
        assert sorted(f.entity for f in facts) == sorted(world.entities)
        assert set(Counter(f.attribute for f in facts).values()) == {48}
    assert set(Counter(m.answer for m in world.eval_mcqs).values()) == {36}
    # Eval values are balanced within each attribute; the other splits' values are not forced.
    for attribute in ATTRIBUTE_BY_NAME:
        counts = Counter(f.value for f in world.eval_facts if f.attribute == attribute)
        assert set(counts.values()) == {12}


def test_partial_grid_uses_each_word_equally() -> None:
    world = make_world(5, WorldSpec(n_adjectives=6, n_nouns=6, names_per_word=4))
    assert len(world.entities) == 24
    assert set(Counter(e.split()[1] for e in world.entities).values()) == {4}


def test_mcq_options_are_the_attribute_values_and_the_letter_names_the_value() -> None:
    world = make_world(0)
    for m in list(world.eval_mcqs) + mcq_renderings(world.distill_facts):
        assert m.options == ATTRIBUTE_BY_NAME[m.fact.attribute].values and len(m.options) == 4
        assert m.options[LETTERS.index(m.answer)] == m.fact.value
        assert m.prompt == f"{m.fact.question()} A. {m.options[0]} B. {m.options[1]} C. {m.options[2]} D. {m.options[3]}"
        assert m.response == m.answer


def test_splits_are_disjoint_and_the_check_catches_a_leak() -> None:
    world = make_world(0)
    check_disjoint(world)
    eval_keys = {f.key for f in world.eval_facts}
    assert eval_keys.isdisjoint(f.key for f in world.distill_facts)
    assert {f.key for f in world.speech_facts} <= {f.key for f in world.distill_facts}
    # Relabel one eval fact as a speech fact: the entity then lacks an eval fact and its eval MCQ leaks.
    leaked = dataclasses.replace(world.eval_facts[0], split="speech")
    broken = dataclasses.replace(world, facts=tuple(leaked if f == world.eval_facts[0] else f for f in world.facts))
    with pytest.raises(ValueError):
        check_disjoint(broken)


def test_no_eval_leak_check() -> None:
    world = make_world(0)
    check_no_eval_leak(world, [m.prompt for m in mcq_renderings(world.distill_facts, 3)])
    with pytest.raises(ValueError, match="eval question"):
        check_no_eval_leak(world, ["hello", world.eval_mcqs[7].prompt])


def test_eval_items_score_with_the_official_mcq_rule(tmp_path) -> None:
    world = make_world(0)
    items = eval_items(world)
    assert len(items) == 144 and {i.subset for i in items} == {EVAL_SUBSET}
    rng = random.Random(0)
    item = items[0]
    wrong = next(letter for letter in LETTERS if letter != item.reference)
    assert mcq.score(item, item.reference, rng).value == 1.0
    assert mcq.score(item, item.reference + ".", rng).value == 1.0
    assert mcq.score(item, wrong, rng).value == 0.0
    path = write_jsonl(mcq_rows(world.eval_mcqs), tmp_path / "suite.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["prompt"], r["reference"]) for r in rows] == [(i.text, i.reference) for i in items]
