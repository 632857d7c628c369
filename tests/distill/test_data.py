"""Distillation data: loading (bundled, jsonl, parquet) with clear field errors, the speakable filter, the TTS window
drop, teacher targets, and the leakage check against evaluation items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.distill.data import (
    FILTER_DEFAULTS,
    FILTER_REASONS,
    DistillDataError,
    DistillExample,
    LeakageError,
    check_no_leakage,
    filter_speakable,
    load_distill_data,
    normalize_text,
    synthesize_questions,
    teacher_targets,
    text_prompt,
    unspeakable_reason,
)


def example(question: str, response: str = "A short answer.", id: str = "x.1") -> DistillExample:
    return DistillExample(id=id, system_prompt="", question=question, response=response)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"id": f"flan.{i}", "system_prompt": "" if i % 2 else "You are helpful.", "question": f"Question number {i}?",
     "response": f"Answer {i}."}
    for i in range(10)
]


# -- loading ----------------------------------------------------------------------------------------------------------


def test_bundled_set_has_open_orca_fields_and_unique_prefixed_ids():
    examples = load_distill_data("bundled")
    assert len(examples) >= 35
    assert len({e.id for e in examples}) == len(examples)
    assert {e.id.split(".")[0] for e in examples} <= {"flan", "niv", "cot", "t0"}
    assert all(e.question and e.response and e.audio is None for e in examples)


def test_jsonl_and_parquet_load_the_same_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    from_jsonl, from_parquet = load_distill_data(jsonl), load_distill_data(str(parquet))
    assert [e.to_row() for e in from_jsonl] == [e.to_row() for e in from_parquet] == ROWS


def test_max_examples_is_a_seeded_subset_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a, b, c = (load_distill_data(path, max_examples=4, seed=s) for s in (1, 1, 2))
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    position = {r["id"]: i for i, r in enumerate(ROWS)}
    assert [position[e.id] for e in a] == sorted(position[e.id] for e in a)
    assert len(load_distill_data(path, max_examples=100)) == len(ROWS)


def test_a_dataset_directory_streams_through_datasets_like_a_hub_id(tmp_path):
    # The hub path (``datasets.load_dataset(id, split="train", streaming=True)``) exercised offline on a local dataset.
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    everything = load_distill_data(str(tmp_path))
    assert sorted(e.id for e in everything) == sorted(r["id"] for r in ROWS)
    first, again = (load_distill_data(str(tmp_path), max_examples=3, seed=7) for _ in range(2))
    assert len(first) == 3 and [e.id for e in first] == [e.id for e in again]
    write_jsonl(tmp_path / "train.jsonl", [{k: v for k, v in r.items() if k != "question"} for r in ROWS])
    with pytest.raises(DistillDataError, match="question"):
        load_distill_data(str(tmp_path))


@pytest.mark.parametrize("field", ["id", "system_prompt", "question", "response"])
def test_missing_field_error_names_file_row_and_field(tmp_path, field):
    rows = [dict(r) for r in ROWS[:3]]
    del rows[1][field]
    path = write_jsonl(tmp_path / "broken.jsonl", rows)
    with pytest.raises(DistillDataError, match=rf"broken\.jsonl: row 2: missing field '{field}'"):
        load_distill_data(path)


def test_missing_parquet_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "response"} for r in ROWS]), path)
    with pytest.raises(DistillDataError, match=r"d\.parquet: missing field\(s\) \['response'\]"):
        load_distill_data(path)


def test_bad_rows_and_repeated_ids_are_refused(tmp_path):
    bad_type = write_jsonl(tmp_path / "t.jsonl", [{**ROWS[0], "question": 3}])
    with pytest.raises(DistillDataError, match="row 1: field 'question' must be a string"):
        load_distill_data(bad_type)
    (tmp_path / "j.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DistillDataError, match="row 2: not valid JSON"):
        load_distill_data(tmp_path / "j.jsonl")
    repeated = write_jsonl(tmp_path / "r.jsonl", [ROWS[0], ROWS[0]])
    with pytest.raises(DistillDataError, match="repeated id"):
        load_distill_data(repeated)
    with pytest.raises(DistillDataError, match="does not exist"):
        load_distill_data(tmp_path / "absent.jsonl")


def test_null_system_prompt_means_the_default_system_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**ROWS[0], "system_prompt": None}])
    (loaded,) = load_distill_data(path)
    assert loaded.system_prompt == "" and text_prompt(loaded).system is None


# -- the speakable filter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question, response, reason",
    [
        ("What does this print?\n```python\nprint(1)\n```", "It prints 1.", "code"),
        ("Fix the bug: def add(a, b): return a - b", "Use a plus sign.", "code"),
        ("Name a fruit.", "def fruit():\n    return 'apple'", "code"),
        ('Convert to JSON: {"name": "Ann", "age": 30}', "Done.", "code"),
        ("Which is larger?\n| a | b |\n|---|---|\n| 1 | 2 |", "b is larger.", "table"),
        ("Summarize https://example.com/a.html please.", "I cannot open links.", "not_speakable"),
        ("Solve $x^2 = 4$ for x.", "x is 2 or -2.", "not_speakable"),
        ("Compute 3*4+2^2-8/2=?", "Twelve.", "not_speakable"),
        ("この文を英語に翻訳してください。", "Please translate this sentence.", "not_speakable"),
        (" ".join(["word"] * 61) + "?", "Yes.", "too_long"),
        ("Why?", " ".join(["word"] * 401), "too_long"),
        ("What is the capital of Italy?", "Rome is the capital of Italy.", None),
        ("Is the statement true or false? Bats are mammals.", "True: bats are mammals.", None),
    ],
)
def test_unspeakable_reason(question, response, reason):
    assert unspeakable_reason(example(question, response)) == reason


def test_filter_counts_every_reason_and_thresholds_are_configurable():
    examples = load_distill_data("bundled")
    kept, counts = filter_speakable(examples)
    assert set(counts) == {"total", "kept", *FILTER_REASONS}
    assert counts["total"] == len(examples) and counts["kept"] == len(kept)
    assert counts["kept"] + sum(counts[r] for r in FILTER_REASONS) == counts["total"]
    assert all(counts[r] >= 1 for r in FILTER_REASONS)  # the bundled set carries an example of each
    assert all(unspeakable_reason(e) is None for e in kept)
    kept_short, counts_short = filter_speakable(examples, max_words=6)
    assert counts_short["too_long"] > counts["too_long"]
    assert all(len(e.question.split()) <= 6 for e in kept_short)
    with pytest.raises(TypeError, match="unknown filter threshold"):
        filter_speakable(examples, max_wrds=3)
    assert FILTER_DEFAULTS["max_words"] == 60


# -- speech and targets -----------------------------------------------------------------------------------------------


def test_tts_window_drops_and_counts_clips_longer_than_the_student_window():
    from speechlm_eval.speech import CachedTTS, get_tts

    tts = CachedTTS(get_tts("espeak-ng", voice="en-us", rate=160))
    short = example("What is the largest planet?", id="a")
    long = example(" ".join(["the quick brown fox jumps over the lazy dog"] * 4), id="b")
    kept, counts = synthesize_questions([short, long], tts, max_seconds=5.0)
    assert [e.id for e in kept] == ["a"] and counts == {"audio_too_long": 1}
    assert kept[0].audio is not None and kept[0].audio.dtype == np.float32 and len(kept[0].audio) < 5 * 16_000
    everything, counts = synthesize_questions([short, long], tts, max_seconds=None, keep_audio=False)
    assert [e.id for e in everything] == ["a", "b"] and counts == {"audio_too_long": 0}
    assert everything[1].audio is None


def test_teacher_targets_are_the_teachers_own_greedy_replies(tiny_pair):
    from speechlm_eval.models.base import GenerationConfig
    from speechlm_eval.models.registry import load_model

    teacher = load_model(str(tiny_pair[1]))
    examples = [example("Is the sky blue?", id="a"), example("Name a large animal.", id="b")]
    targeted, counts = teacher_targets(examples, teacher, max_new_tokens=6, batch_size=1)
    expected = teacher.generate([text_prompt(e) for e in examples], GenerationConfig(max_new_tokens=6))
    assert [e.response for e in targeted] == [g.text for g in expected if g.text.strip()]
    assert counts["empty_target"] == sum(not g.text.strip() for g in expected)
    assert [e.question for e in targeted] == [e.question for e in examples][: len(targeted)]


# -- leakage ----------------------------------------------------------------------------------------------------------


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalize_text("  What is the  capital of FRANCE?!") == normalize_text("what is the capital of france")
    assert normalize_text("Tom's  dog.") == "tom s dog"


def test_leakage_is_refused_naming_the_overlapping_ids():
    items = [Item(id="sd-qa/usa/7", subset="sd-qa", text="What is the capital of France?"),
             Item(id="mmau-1", subset="mmau", text=None, speak="The meeting moved to Thursday.")]
    clean = [example("What is the capital of Spain?", id="flan.1")]
    check_no_leakage(clean, items)
    leaked = clean + [example("what is the CAPITAL of   france", id="flan.2"),
                      example("The meeting moved to Thursday", id="niv.3")]
    with pytest.raises(LeakageError, match=r"2 distillation question.*flan\.2 = sd-qa/usa/7, niv\.3 = mmau-1"):
        check_no_leakage(leaked, items)


def test_bundled_distillation_set_does_not_leak_into_the_bundled_suite():
    from speechlm_eval.data.suite import load_suite, parse_suite

    items, _ = load_suite(parse_suite("bundled"))
    check_no_leakage(load_distill_data("bundled"), items)
