"""`speechlm-eval export`: VoiceBench files re-score with `speechlm-eval score voicebench` to the run's numbers, the
MMAU file with `score mmau`; the leaderboard row and lm-eval results carry the same numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.report.build import build_report
from speechlm_eval.rundir import RunDir
from tests.report.test_check import COMPLY, REFUSE, _responses, write_run

ARMS3 = ("text_llm_text", "speech_llm_text", "speech_llm_speech")


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openbookqa (some answers unparsed: seeded draws) and advbench, three arms each."""
    root = tmp_path_factory.mktemp("export") / "run"
    obqa = {"text_llm_text": _responses(30, [1]), "speech_llm_text": _responses(30, [1, 2, 3], wrong="no idea"),
            "speech_llm_speech": _responses(30, range(10), wrong="I am not sure")}
    adv = {arm: _responses(20, range(k * 3), REFUSE, COMPLY) for k, arm in enumerate(ARMS3)}
    write_run(root, {"openbookqa": ("mcq", obqa), "advbench": ("harm", adv)})
    build_report(root)
    return root


def test_voicebench_export_rescores_to_the_same_numbers(run: Path, tmp_path: Path) -> None:
    result = invoke("export", str(run), "--format", "voicebench", "--out", str(tmp_path), "--model-name", "cand")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert "cand-openbookqa-test-audio.jsonl" in names and "cand-openbookqa-test-text.jsonl" in names
    assert len(names) == 6  # 2 subsets x 3 arms (the text LLM's files under its own name)
    results = RunDir(run).read_results()
    checked = 0
    for path in tmp_path.glob("*.jsonl"):
        first = json.loads(path.read_text().splitlines()[0])
        subset, arm = first["speechlm_eval"]["id"].split("/")[0], first["speechlm_eval"]["arm"]
        scored = invoke("score", "voicebench", "--subset", subset, str(path))
        assert scored.exit_code == 0, scored.output
        metrics = json.loads(scored.stdout)
        official = results["subsets"][subset]["arms"][arm]["official"]
        assert metrics == pytest.approx(official), (path.name, metrics, official)
        checked += 1
    assert checked == 6
    # The unparsed answers' seeded draws matched too (they are in the numbers compared above).
    assert results["subsets"]["openbookqa"]["arms"]["speech_llm_speech"]["unparsed"] == 10


def test_leaderboard_row_and_lmeval_results_carry_the_run_numbers(run: Path, tmp_path: Path) -> None:
    results = RunDir(run).read_results()
    assert invoke("export", str(run), "--format", "voicebench-row", "--out", str(tmp_path / "row")).exit_code == 0
    rows = json.loads((tmp_path / "row" / "leaderboard-row.json").read_text())
    speech = next(r for r in rows if r["arm"] == "speech_llm_speech")
    assert speech["OBQA"] == pytest.approx(results["subsets"]["openbookqa"]["arms"]["speech_llm_speech"]["score"])
    assert speech["AdvBench"] == pytest.approx(100 * results["subsets"]["advbench"]["arms"]["speech_llm_speech"][
        "official"]["refusal_rate"])
    assert speech["Overall"] is None and "MMSU" in speech["missing"]
    table = (tmp_path / "row" / "leaderboard-row.md").read_text()
    assert table.startswith("| Model | AlpacaEval | CommonEval | WildVoice | SD-QA | MMSU | OBQA | BBH | IFEval | "
                            "AdvBench | Overall |")
    assert invoke("export", str(run), "--format", "lm-eval", "--out", str(tmp_path / "lm")).exit_code == 0
    document = json.loads((tmp_path / "lm" / "results_speech_llm_speech.json").read_text())
    assert document["results"]["openbookqa"]["acc,none"] == pytest.approx(
        results["subsets"]["openbookqa"]["arms"]["speech_llm_speech"]["score"])
    samples = (tmp_path / "lm" / "samples_openbookqa_speech_llm_speech.jsonl").read_text().splitlines()
    assert len(samples) == 30 and {"doc", "target", "resps", "acc"} <= set(json.loads(samples[0]))


def test_mmau_export_rescores_with_score_mmau(tmp_path: Path) -> None:
    root = write_run(tmp_path / "mmau", {"mmau": ("mmau", {"speech_llm_speech": _responses(8, [0, 1], "Man", "Woman")})},
                     speech_only=True)
    rows = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    for row in rows:
        row["meta"].update({"sub-category": "voice", "audio_id": row["id"], "question": "Which voice?",
                            "dataset": "d", "category": "c", "category_raw": "c", "split": "test-mini"})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = build_report(root)
    assert invoke("export", str(root), "--format", "mmau", "--out", str(tmp_path / "out")).exit_code == 0
    (path,) = (tmp_path / "out").glob("*-mmau-test-mini.json")
    scored = invoke("score", "mmau", str(path))
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["total_accuracy"] == pytest.approx(
        results["subsets"]["mmau"]["arms"]["speech_llm_speech"]["score"])


def test_export_refuses_what_the_run_does_not_have(run: Path, tmp_path: Path) -> None:
    result = invoke("export", str(run), "--format", "mmau", "--out", str(tmp_path))
    assert result.exit_code == 2 and "no MMAU items" in result.output
    result = invoke("export", str(run), "--format", "csv")
    assert result.exit_code == 2 and "--format must be one of" in result.output
