"""The silent-audio guard: hand-built records for each signal, then the embedded organism with every clip replaced by
silence (a TTS engine registered here) through `gap`, `report` and `check`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.report import frontend
from speechlm_eval.rundir import RunDir
from tests.fixtures import silent_tts
from tests.report.test_check import _responses, write_run

LETTERS = "ABCD"


def _varied(n: int) -> list[str]:
    return [LETTERS[i % 4] for i in range(n)]


def _with_references(run: Path, references: list[str]) -> None:
    rows = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    for row, reference in zip(rows, references):
        row["reference"] = reference
    (run / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _with_perception(run: Path, wers: list[float]) -> None:
    rows = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    records = [{"id": r["id"], "subset": r["subset"], "arm": "perception", "error": None, "transcript": "x",
                "wer": w} for r, w in zip(rows, wers)]
    (run / "records" / "perception.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_constant_speech_answers_with_varied_text_answers_are_a_front_end_failure(tmp_path: Path) -> None:
    arms = {"speech_llm_text": _varied(20), "speech_llm_speech": ["B"] * 19 + ["C"]}
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", arms)})
    (reason,) = frontend.front_end_failures(RunDir(run))["openbookqa"]
    assert "same answer ('b') to 95% of 20 different clips" in reason and "given the text it does so for 25%" in reason


def test_constant_answers_that_the_references_share_are_not_flagged(tmp_path: Path) -> None:
    # Every reference is "A" and both arms answer "A": nothing says the audio was ignored.
    arms = {"speech_llm_text": _responses(20, []), "speech_llm_speech": _responses(20, [])}
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", arms)})
    assert frontend.front_end_failures(RunDir(run)) == {}
    # Without a text arm, varied references are what make a constant answer suspicious.
    speech_only = write_run(tmp_path / "speech", {"openbookqa": ("mcq", {"speech_llm_speech": ["A"] * 20})})
    assert frontend.front_end_failures(RunDir(speech_only)) == {}
    _with_references(speech_only, _varied(20))
    assert "the most common reference covers 25%" in frontend.front_end_failures(RunDir(speech_only))["openbookqa"][0]


def test_misheard_clips_are_a_front_end_failure_only_when_most_are(tmp_path: Path) -> None:
    arms = {"speech_llm_text": _varied(10), "speech_llm_speech": _varied(10)}
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", arms)})
    _with_perception(run, [0.9] * 5 + [0.0] * 5)  # half misheard: not "most"
    assert frontend.front_end_failures(RunDir(run)) == {}
    _with_perception(run, [0.9] * 6 + [0.0] * 4)
    (reason,) = frontend.front_end_failures(RunDir(run))["openbookqa"]
    assert reason.startswith("60% of 10 clips misheard in the perception probe")


def test_check_fails_a_candidate_that_did_not_hear(tmp_path: Path) -> None:
    base_arms = {"speech_llm_text": _varied(20), "speech_llm_speech": _varied(20)}
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", base_arms)})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {**base_arms, "speech_llm_speech": ["B"] * 20})})
    result = CliRunner().invoke(app, ["check", "--baseline", str(base), "--candidate", str(cand), "--max-drop", "100"])
    assert result.exit_code == 1, result.output
    assert "**openbookqa · front end**: the candidate did not hear its audio" in result.stdout


# --- the embedded organism, every clip silence -----------------------------------------------------------------------

LIMIT = "24"


@pytest.fixture(scope="module")
def silent_and_heard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(a normal embedded run, the same run with silent clips, the silent run's terminal output)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    silent_tts.register()
    root = tmp_path_factory.mktemp("silent")
    runner = CliRunner()
    heard = runner.invoke(app, ["gap", "--out", str(root / "heard"), "--limit", LIMIT])
    assert heard.exit_code == 0, heard.output
    silent = runner.invoke(app, ["gap", "--out", str(root / "silent"), "--limit", LIMIT, "--tts-engine",
                                 silent_tts.NAME])
    assert silent.exit_code == 0, silent.output
    return root / "heard", root / "silent", silent.output


@pytest.mark.slow
def test_silent_clips_are_reported_as_a_front_end_failure_first(silent_and_heard: tuple[Path, Path, str]) -> None:
    heard, silent, output = silent_and_heard
    assert RunDir(heard).read_results()["front_end"]["organism_mcq"]["failure"] is False
    results = RunDir(silent).read_results()
    entry = results["front_end"]["organism_mcq"]
    assert entry["failure"] and entry["misheard_share"] > 0.9
    assert results["subsets"]["organism_mcq"]["inequivalence"]["front_end_failure"] is True
    report = (silent / "report.md").read_text()
    assert report.index("FRONT-END FAILURE") < report.index("| subset |")
    assert "front-end failure, not inequivalence: +" in report
    assert "FRONT-END FAILURE" not in (heard / "report.md").read_text()
    page = (silent / "report.html").read_text()
    assert page.index('<div class="alert"') < page.index("<h2>Scores and gaps</h2>")
    assert 'class="gap-frontend"' in page
    # The terminal says so before the table.
    assert output.index("FRONT-END FAILURE") < output.index("speechlm-eval gap")


@pytest.mark.slow
def test_check_fails_the_silent_candidate(silent_and_heard: tuple[Path, Path, str]) -> None:
    heard, silent, _ = silent_and_heard
    result = CliRunner().invoke(app, ["check", "--baseline", str(heard), "--candidate", str(silent),
                                      "--max-drop", "100"])
    assert result.exit_code == 1, result.output
    assert "organism_mcq · front end**: the candidate did not hear its audio" in result.stdout
    assert CliRunner().invoke(app, ["check", "--baseline", str(heard), "--candidate", str(heard)]).exit_code == 0
