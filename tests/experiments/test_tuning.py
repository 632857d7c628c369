"""The tuning split: held out of distillation, disjoint from the evaluation facts, balanced, and chosen by a rule."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from speechlm_eval.data.organism_world import DEV_SUBSET, dev_facts, distill_rows, make_world, mcq_renderings
from speechlm_eval.data.suite import load_suite, parse_suite
from speechlm_eval.experiments.tuning import TRIALS, choose, tuning_data


def test_dev_facts_are_distillation_only_balanced_and_never_evaluation() -> None:
    world = make_world(1)
    dev = dev_facts(world)
    assert len(dev) == 48 and {f.split for f in dev} == {"distill_only"}
    assert Counter(f.attribute for f in dev) == {"color": 16, "home": 16, "food": 16}
    assert not {f.key for f in dev} & {f.key for f in world.eval_facts}
    assert dev == dev_facts(make_world(1))  # deterministic


def test_dev_suite_is_a_subset_of_the_organism_benchmark_and_not_its_default() -> None:
    items = load_suite(parse_suite(f"organism:{DEV_SUBSET}@seed2"))[0]
    assert len(items) == 48 and {i.subset for i in items} == {DEV_SUBSET}
    assert {(i.meta["entity"], i.meta["attribute"]) for i in items} == {f.key for f in dev_facts(make_world(2))}
    assert {i.subset for i in load_suite(parse_suite("organism"))[0]} == {"organism_mcq"}


def test_tuning_data_drops_exactly_the_dev_facts(tmp_path: Path) -> None:
    world = make_world(0)
    source = tmp_path / "distill.jsonl"
    rows = distill_rows(mcq_renderings(world.distill_facts))
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, kept = tuning_data(source, 0, tmp_path / "out" / "data.jsonl")
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == len(written) == len(rows) - 48
    dev = {f.key for f in dev_facts(world)}
    assert not {(r["entity"], r["attribute"]) for r in written} & dev
    with pytest.raises(ValueError, match="no row names a tuning fact"):
        source.write_text(json.dumps({"question": "q", "response": "A"}) + "\n")
        tuning_data(source, 0, tmp_path / "again.jsonl")


def _row(arm: str, inequivalence: float) -> dict:
    return {"arm": arm, "overrides": TRIALS.get(arm), "inequivalence": {"value": inequivalence}}


def test_choice_is_the_smallest_dev_inequivalence_per_channel_first_wins_ties() -> None:
    rows = [{"arm": "before", "overrides": None, "inequivalence": {"value": 1.0}}, _row("kd_tt", 0.0),
            _row("tt_hidden_l1_last", 30.0), _row("tt_hidden_l4_last", 20.0), _row("tt_hidden_l1_both", 20.0),
            _row("tt_prefix_l1", 10.0), _row("tt_prefix_l4", 12.0), _row("tt_self_l1", 5.0)]
    assert choose(rows) == {"st_hidden": "tt_hidden_l4_last", "st_prefix": "tt_prefix_l1", "st_self": "tt_self_l1"}


def test_committed_search_is_rendered_from_its_json_and_its_choice_follows_the_rule() -> None:
    from speechlm_eval.experiments.tuning import render_tuning

    report = Path(__file__).resolve().parents[2] / "reports" / "organism" / "experiments" / "tuning"
    summary = json.loads((report / "tuning.json").read_text())
    assert (report / "tuning.md").read_text() == render_tuning(summary)
    assert summary["suite"].startswith(f"organism:{DEV_SUBSET}@seed")
    assert {r["arm"] for r in summary["rows"]} == {"before", *TRIALS}
    assert summary["chosen"] == choose(summary["rows"])


def test_the_experiment_arms_use_the_settings_chosen_on_the_tuning_split() -> None:
    import dataclasses

    from speechlm_eval.distill.config import DistillConfig
    from speechlm_eval.experiments.organism import ALIGNMENT_ARMS

    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    report = Path(__file__).resolve().parents[2] / "reports" / "organism" / "experiments" / "tuning"
    summary = json.loads((report / "tuning.json").read_text())
    short = {"st_hidden": "hidden", "st_prefix": "prefix", "st_self": "self"}
    for channel, trial in summary["chosen"].items():
        chosen = {k: v for k, v in TRIALS[trial].items() if k != "channels"}
        for arm in (f"align_{short[channel]}", f"kd_tt_align_{short[channel]}"):
            settings = ALIGNMENT_ARMS[arm]
            assert channel in settings["channels"].split(",")
            for key, value in chosen.items():
                assert settings.get(key, defaults[key]) == value, (arm, key)
