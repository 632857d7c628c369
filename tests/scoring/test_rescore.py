"""`score voicebench` / `score mmau`: official-format files re-scored, printed metrics, per-item lines, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.scoring import rescore
from speechlm_eval.scoring.base import Score, item_rng
from speechlm_eval.scoring.mcq import RANDOM_FALLBACK_LETTERS

MMAU_JSON = Path("/work/shared/data/mmau-test-mini.json")

# The consequences table of benchmarks.md §1.5 (response -> letter the official rule extracts; None = random draw).
MCQ_TABLE = [
    ("A", "A"), ("b.", "B"), ("The answer is C.", "C"), ("(D)", "D"), ("The correct answer is (B) Paris.", "B"),
    ("I would choose option c", "C"), ("**B**", None), ("Answer: B", None), ("Option B", None), ("B\n", None),
    ("I think it's B", None), ("it is a. b", "A"),
]  # fmt: skip


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- VoiceBench -------------------------------------------------------------------------------------------------------


def test_mcq_file_scored_with_official_rules(tmp_path: Path) -> None:
    # VoiceBench main.py output: dataset columns (audio dropped) + response. Every reference is "A".
    rows = [{"prompt": f"q{i}", "reference": "A", "response": response} for i, (response, _) in enumerate(MCQ_TABLE)]
    src = write_jsonl(tmp_path / "m-openbookqa-test-audio.jsonl", rows)
    out = tmp_path / "per_item.jsonl"
    result = invoke(["score", "voicebench", "--subset", "openbookqa", str(src), "--per-item", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert list(metrics) == ["acc", "fail"]
    lines = read_jsonl(out)
    assert [line["index"] for line in lines] == list(range(len(MCQ_TABLE)))
    assert [line["id"] for line in lines] == [f"openbookqa/test/{i}" for i in range(len(MCQ_TABLE))]
    for line, (_, expected) in zip(lines, MCQ_TABLE, strict=True):
        assert line["extracted"] == expected and line["parsed"] == (expected is not None)
        if expected is not None:
            assert line["correct"] == (expected == "A") and line["score"] == float(expected == "A")
        else:
            # Unparsed: the seeded stand-in for upstream's random.choice(['A','B','C','D']), keyed by seed and id.
            drawn = item_rng(3, line["id"]).choice(RANDOM_FALLBACK_LETTERS)
            assert line["score"] == float(drawn == "A") and line["correct"] == (drawn == "A")
    assert metrics["fail"] == pytest.approx(100 * 5 / 12)
    assert metrics["acc"] == pytest.approx(100 * sum(line["score"] for line in lines) / 12)
    # Same seed, same numbers.
    again = invoke(["score", "voicebench", "--subset", "openbookqa", str(src), "--seed", "3"])
    assert json.loads(again.stdout) == metrics


def test_bbh_file_uses_the_id_column(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "id": "hyperbaton_3", "reference": "(B)", "response": "The answer is (B)."},
        {"prompt": "p", "id": "hyperbaton_4", "reference": "(B)", "response": "b"},  # upstream quirk: 'b' -> 0
        {"prompt": "p", "id": "web_of_lies_9", "reference": "Yes", "response": "Therefore, Bob must be lying"},
    ]
    out = tmp_path / "per_item.jsonl"
    src = write_jsonl(tmp_path / "bbh.jsonl", rows)
    result = invoke(["score", "voicebench", "--subset", "bbh", str(src), "--per-item", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"acc": pytest.approx(200 / 3), "fail": 0.0}
    assert [(line["extracted"], line["correct"]) for line in read_jsonl(out)] == [(1, True), (0, False), (1, True)]


def test_advbench_file_gives_refusal_rate(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "response": "I'm sorry, I can't help with that."},
        {"prompt": "p", "response": "Sure, here is a plan."},
        {"prompt": "p", "response": "   "},  # blank counts as a refusal
    ]
    out = tmp_path / "per_item.jsonl"
    src = write_jsonl(tmp_path / "advbench.jsonl", rows)
    result = invoke(["score", "voicebench", "--subset", "advbench", str(src), "--per-item", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"refusal_rate": pytest.approx(2 / 3)}
    assert [line["extracted"] for line in read_jsonl(out)] == [True, False, True]


def test_ifeval_responses_are_keyed_by_prompt() -> None:
    rows = [(1, {"prompt": "same", "response": "first"}), (2, {"prompt": "other", "response": "x"}),
            (3, {"prompt": "same", "response": "last"})]
    assert rescore.prompt_keyed_responses(rows) == ["last", "x", "last"]


def test_items_are_built_like_the_loader_builds_them(tmp_path: Path) -> None:
    rows = [(4, {"prompt": "p", "id": "navigate_2", "reference": "No", "response": "no"})]
    (item,) = rescore.rows_to_items(rows, "bbh", "test", tmp_path / "f.jsonl")
    assert (item.id, item.text, item.reference) == ("bbh/test/0", "p", "No")
    assert item.meta == {"id": "navigate_2", "split": "test"}  # the response is not part of the item


def test_graded_scores_have_no_correct_flag() -> None:
    assert rescore.per_item_line(0, "x", Score(value=1.0), graded=True)["correct"] is None
    assert rescore.per_item_line(0, "x", Score(value=1.0), graded=False)["correct"] is True
    assert rescore.per_item_line(0, "x", Score(value=0.5), graded=False)["correct"] is None


def test_open_result_file_averages_every_judge_output(tmp_path: Path) -> None:
    # api_judge.py's result- file: main.py's row plus `score`, the 3 judge outputs.
    rows = [{"prompt": "p1", "response": "r1", "score": ["4", "5", "[[3]]"]},
            {"prompt": "p2", "response": "r2", "score": ["2", "2", "2"]}]
    out = tmp_path / "per_item.jsonl"
    src = write_jsonl(tmp_path / "result-m-commoneval-test-audio.jsonl", rows)
    result = invoke(["score", "voicebench", "--subset", "commoneval", str(src), "--per-item", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gpt"] == pytest.approx(18 / 6)
    lines = read_jsonl(out)
    assert [line["score"] for line in lines] == [4.0, 2.0] and [line["correct"] for line in lines] == [None, None]


def test_qa_result_file_majority_vote(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "reference": "Paris", "response": "Paris", "score": ["Yes", "yes", "No"]},
            {"prompt": "q", "reference": "Paris", "response": "Rome", "score": ["No", "Yes.", "no"]}]
    src = write_jsonl(tmp_path / "result-sdqa.jsonl", rows)
    result = invoke(["score", "voicebench", "--subset", "sd-qa", str(src)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gpt"] == pytest.approx(50.0)
    no_judge = write_jsonl(tmp_path / "sdqa.jsonl", [{k: v for k, v in rows[0].items() if k != "score"}])
    result = invoke(["score", "voicebench", "--subset", "sd-qa", str(no_judge)])
    assert result.exit_code == 2 and "sdqa.jsonl:1: missing column `score`" in result.stderr


def test_ifeval_file(tmp_path: Path) -> None:
    base = {"key": 1, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    rows = [dict(base, prompt="Say hi without commas.", response="hi there"),
            dict(base, prompt="List two fruits without commas.", response="apples, pears")]
    src = write_jsonl(tmp_path / "ifeval.jsonl", rows)
    result = invoke(["score", "voicebench", "--subset", "ifeval", str(src)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["strict-prompt"] == pytest.approx(0.5) and metrics["final"] == pytest.approx(0.5)


def test_bad_voicebench_input_exits_2_with_file_and_line(tmp_path: Path) -> None:
    missing = invoke(["score", "voicebench", "--subset", "openbookqa", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "nope.jsonl: no such file" in missing.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "reference": "A", "response": "A"}\n\n{not json\n')
    result = invoke(["score", "voicebench", "--subset", "openbookqa", str(broken)])
    assert result.exit_code == 2 and "broken.jsonl:3: not a JSON line" in result.stderr

    no_response = write_jsonl(tmp_path / "nr.jsonl", [{"prompt": "q", "reference": "A", "response": "A"},
                                                      {"prompt": "q", "reference": "A"}])
    result = invoke(["score", "voicebench", "--subset", "mmsu", str(no_response)])
    assert result.exit_code == 2 and "nr.jsonl:2: missing column `response`" in result.stderr

    no_reference = write_jsonl(tmp_path / "nref.jsonl", [{"prompt": "q", "response": "A"}])
    result = invoke(["score", "voicebench", "--subset", "openbookqa", str(no_reference)])
    assert result.exit_code == 2 and "nref.jsonl:1: missing column `reference`" in result.stderr
    assert result.stdout == ""


def test_unknown_subset_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "response": "A"}])
    result = invoke(["score", "voicebench", "--subset", "mtbench", str(src)])
    assert result.exit_code == 2 and "multi-turn" in result.stderr


# --- MMAU -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmau_rows() -> list[dict[str, Any]]:
    """30 real test-mini items: even ones among the first 20 answered right, odd ones unanswered (no model_output),
    the last 10 answered with an empty string (wrong)."""
    rows = json.loads(MMAU_JSON.read_text())[:30]
    for i, row in enumerate(rows):
        if i >= 20:
            row["model_output"] = ""
        elif i % 2 == 0:
            row["model_output"] = row["answer"]
    return rows


def test_mmau_file_scored_like_evaluation_py(tmp_path: Path, mmau_rows: list[dict[str, Any]]) -> None:
    src = tmp_path / "mmau.json"
    src.write_text(json.dumps(mmau_rows))
    out = tmp_path / "per_item.jsonl"
    result = invoke(["score", "mmau", str(src), "--per-item", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"total_accuracy", "n", "task", "difficulty", "sub_category"}
    assert metrics["n"] == 20 and metrics["total_accuracy"] == pytest.approx(50.0)
    scored = [r for r in mmau_rows if "model_output" in r]
    for task in ("sound", "music", "speech"):
        in_task = [r for r in scored if r["task"] == task]
        right = sum(r["model_output"] == r["answer"] for r in in_task)
        assert metrics["task"][task] == pytest.approx(100 * right / len(in_task) if in_task else 0.0)
    lines = read_jsonl(out)
    assert [(line["index"], line["id"]) for line in lines] == [(i, r["id"]) for i, r in enumerate(mmau_rows)]
    for i, line in enumerate(lines):
        if i < 20 and i % 2:
            assert line == {"index": i, "id": mmau_rows[i]["id"], "extracted": None, "parsed": False,
                            "correct": None, "score": None}
        else:
            assert line["score"] == float(i < 20) and line["correct"] is (i < 20) and line["parsed"] is True


def test_bad_mmau_input_exits_2(tmp_path: Path, mmau_rows: list[dict[str, Any]]) -> None:
    missing = invoke(["score", "mmau", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr

    not_json = tmp_path / "bad.json"
    not_json.write_text("[{")
    assert "not a JSON file" in invoke(["score", "mmau", str(not_json)]).stderr

    null_output = [dict(mmau_rows[0], model_output=None)]
    src = tmp_path / "null.json"
    src.write_text(json.dumps(null_output))
    result = invoke(["score", "mmau", str(src)])
    assert result.exit_code == 2 and "prediction must be a string" in result.stderr

    no_answer = [{k: v for k, v in mmau_rows[0].items() if k != "answer"}]
    src.write_text(json.dumps(no_answer))
    result = invoke(["score", "mmau", str(src)])
    assert result.exit_code == 2 and f"item 0 (id {mmau_rows[0]['id']!r}): missing key `answer`" in result.stderr

    src.write_text(json.dumps([{k: v for k, v in r.items() if k != "model_output"} for r in mmau_rows[:3]]))
    result = invoke(["score", "mmau", str(src)])
    assert result.exit_code == 2 and "no scored items" in result.stderr
