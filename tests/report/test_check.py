"""`check` CI gate: two hand-built run directories (no model), exit codes, threshold vs significance, step summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.report import check
from speechlm_eval.report.build import build_results, run_item_scores

N_RESAMPLES = 2000
RIGHT, WRONG = "A", "B"  # mcq responses to an item whose reference is "A"
REFUSE, COMPLY = "I'm sorry, I cannot help with that.", "Sure, here is how to do it."


def _row(subset: str, scorer: str, index: int, *, speech_only: bool = False) -> dict[str, Any]:
    reference = {"mcq": "A", "harm": None, "mmau": "Man"}[scorer]
    return {
        "id": f"{subset}/test/{index}", "subset": subset, "scorer": scorer,
        "text": None if speech_only else f"question {index}",
        "audio_instruction": "Which voice?" if speech_only else None, "speak": None,
        "choices": ["Man", "Woman"] if scorer == "mmau" else [], "reference": reference,
        "meta": {"task": "sound", "difficulty": "easy"} if scorer == "mmau" else {}, "has_audio": speech_only,
    }


def _responses(n: int, bad: Iterable[int], good: str = RIGHT, wrong: str = WRONG) -> list[str]:
    bad = set(bad)
    return [wrong if i in bad else good for i in range(n)]


def write_run(path: Path, subsets: dict[str, tuple[str, dict[str, list[str]]]], *, speech_only: bool = False,
              errors: dict[str, set[int]] | None = None) -> Path:
    """A run directory: ``subsets`` maps subset -> (scorer, {arm: responses by item index})."""
    rows, records = [], {}
    for subset, (scorer, arms) in subsets.items():
        n = len(next(iter(arms.values())))
        rows += [_row(subset, scorer, i, speech_only=speech_only) for i in range(n)]
        for arm, responses in arms.items():
            for i, response in enumerate(responses):
                failed = i in (errors or {}).get(arm, set())
                records.setdefault(arm, []).append({
                    "id": f"{subset}/test/{i}", "subset": subset, "arm": arm,
                    "response": None if failed else response, "error": "CUDA OOM" if failed else None,
                })
    path.mkdir(parents=True)
    manifest = {"seed": 0, "statistics": {"n_resamples": N_RESAMPLES}, "models": {"speech_llm": {"id": path.name}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "records").mkdir()
    for arm, arm_records in records.items():
        (path / "records" / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arm_records))
    return path


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, args, env=env)


def run_check(baseline: Path, candidate: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return invoke(["check", "--baseline", str(baseline), "--candidate", str(candidate), *extra], env=env)


def row_of(result: Any, subset: str, quantity: str) -> str:
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith(f"| {subset} | {quantity} |")]
    return line


# --- scenarios -------------------------------------------------------------------------------------------------------


@pytest.fixture
def drop_runs(tmp_path: Path) -> tuple[Path, Path]:
    """40 openbookqa items: the speech arm is right on all of them, then wrong on 10 (-25 points, McNemar p ~ 0.002)."""
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, range(10))})})
    return base, cand


def test_identical_runs_pass(tmp_path: Path) -> None:
    arms = {"text_llm_text": _responses(20, [1]), "speech_llm_text": _responses(20, [1, 2]),
            "speech_llm_speech": _responses(20, [1, 2, 3])}
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", arms)})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", arms)})
    result = run_check(base, cand)
    assert result.exit_code == 0, result.output
    quantities = ["text_llm_text", "speech_llm_text", "speech_llm_speech", "forgetting", "inequivalence"]
    for quantity in quantities:
        assert "| +0.00 |" in row_of(result, "openbookqa", quantity)
    assert "| openbookqa | speech_llm_speech | 20 | 85.00 | 85.00 |" in result.stdout
    assert "**FAIL**" not in result.stdout and result.stdout.startswith("## speechlm-eval check: pass")


def test_significant_drop_above_threshold_fails(drop_runs: tuple[Path, Path]) -> None:
    result = run_check(*drop_runs)
    assert result.exit_code == 1, result.output
    line = row_of(result, "openbookqa", "speech_llm_speech")
    assert "| 100.00 | 75.00 | -25.00 |" in line and "**FAIL**" in line
    assert result.stdout.startswith("## speechlm-eval check: FAIL (1 regression)")
    (comparison,) = check.compare_runs(*drop_runs).comparisons
    assert comparison.delta == pytest.approx(-25.0)
    assert comparison.p_value == pytest.approx(2 * 0.5**10)  # exact McNemar: 10 discordant pairs, all one way
    assert comparison.ci_high < 0


def test_significant_drop_below_threshold_passes(drop_runs: tuple[Path, Path]) -> None:
    result = run_check(*drop_runs, "--max-drop", "30")
    assert result.exit_code == 0, result.output
    assert "pass (drop within the threshold)" in row_of(result, "openbookqa", "speech_llm_speech")


def test_alpha_decides_significance(drop_runs: tuple[Path, Path]) -> None:
    # p = 2 * 0.5**10 ~ 0.00195: significant at 0.05 (fails above), not at 0.001.
    result = run_check(*drop_runs, "--alpha", "0.001")
    assert result.exit_code == 0, result.output
    assert "not significant" in row_of(result, "openbookqa", "speech_llm_speech")


def test_big_but_not_significant_drop_passes(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"mmsu": ("mcq", {"speech_llm_speech": _responses(6, [])})})
    cand = write_run(tmp_path / "cand", {"mmsu": ("mcq", {"speech_llm_speech": _responses(6, [0, 1])})})
    result = run_check(base, cand)
    assert result.exit_code == 0, result.output
    line = row_of(result, "mmsu", "speech_llm_speech")
    assert "-33.33" in line and "| 0.5 |" in line and "not significant" in line


def test_gap_growth_fails_while_arms_pass(tmp_path: Path) -> None:
    # Candidate: speech LLM gets 6 more text items right and 6 more spoken items wrong. Each arm moves 15 points with
    # McNemar p = 0.031 (not significant at alpha 0.02), but the inequivalence gap grows by 30 on 12 items.
    base_arms = {"speech_llm_text": _responses(40, range(20, 26)), "speech_llm_speech": _responses(40, [])}
    cand_arms = {"speech_llm_text": _responses(40, []), "speech_llm_speech": _responses(40, range(6))}
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", base_arms)})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", cand_arms)})
    result = run_check(base, cand, "--alpha", "0.02")
    assert result.exit_code == 1, result.output
    assert "not significant" in row_of(result, "openbookqa", "speech_llm_speech")
    assert "no regression" in row_of(result, "openbookqa", "speech_llm_text")
    gap_line = row_of(result, "openbookqa", "inequivalence")
    assert "| -15.00 | 15.00 | +30.00 |" in gap_line and "**FAIL**" in gap_line
    assert "forgetting" not in result.stdout.split("|---|")[-1]  # no text LLM arm: no forgetting row


def test_refusal_rate_threshold_is_in_points(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"advbench": ("harm", {"speech_llm_speech": _responses(40, [], REFUSE)})})
    cand_responses = _responses(40, range(10), REFUSE, COMPLY)
    cand = write_run(tmp_path / "cand", {"advbench": ("harm", {"speech_llm_speech": cand_responses})})
    # refusal_rate 1.00 -> 0.75 is 25 points: above 1 point (it would be below 1.0 in the fraction's own units).
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "| 100.00 | 75.00 | -25.00 |" in row_of(result, "advbench", "speech_llm_speech")
    assert run_check(base, cand, "--max-drop", "26").exit_code == 0


def test_speech_only_subset_compares_only_the_speech_arm(tmp_path: Path) -> None:
    arms = {"text_llm_text": _responses(8, [], "Man", "Woman"), "speech_llm_speech": _responses(8, [0], "Man", "Woman")}
    base = write_run(tmp_path / "base", {"mmau": ("mmau", arms)}, speech_only=True)
    cand = write_run(tmp_path / "cand", {"mmau": ("mmau", arms)}, speech_only=True)
    report = check.compare_runs(base, cand)
    assert [(c.subset, c.quantity, c.n) for c in report.comparisons] == [("mmau", "speech_llm_speech", 8)]


def test_errored_items_are_left_out_of_the_pairing_and_fail_the_error_rate(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, range(10))})},
                     errors={"speech_llm_speech": set(range(10))})
    report = check.compare_runs(base, cand)
    (comparison,) = report.comparisons
    assert comparison.n == 30 and comparison.delta == 0.0 and comparison.verdict == "pass"
    assert "openbookqa · speech_llm_speech: 10 of 40 items unscored" in "\n".join(report.notes)
    (failure,) = report.failures
    assert failure.what == "speech_llm_speech" and "25.0% of 40 answers unusable" in failure.reason
    assert "10 errors" in failure.reason and report.failed
    # A tolerance above the rise lets the same candidate through.
    assert not check.compare_runs(base, cand, max_error_rate=30).failed


def test_arm_answered_in_the_candidate_only_is_noted_not_compared(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(10, [])})})
    cand_arms = {"speech_llm_text": _responses(10, []), "speech_llm_speech": _responses(10, [])}
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", cand_arms)})
    report = check.compare_runs(base, cand)
    assert [c.quantity for c in report.comparisons] == ["speech_llm_speech"]
    assert report.notes == ["openbookqa · speech_llm_text: answered in the candidate only, not compared"]
    assert not report.failed


# --- gate failures: exit 1 -------------------------------------------------------------------------------------------


def test_candidate_missing_the_speech_arm_fails(tmp_path: Path) -> None:
    arms = {"text_llm_text": _responses(20, []), "speech_llm_text": _responses(20, [1]),
            "speech_llm_speech": _responses(20, [1, 2])}
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", arms)})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {k: v for k, v in arms.items()
                                                                 if k != "speech_llm_speech"})})
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("## speechlm-eval check: FAIL (1 gate failure)")
    assert "**openbookqa · speech_llm_speech**: the baseline answered this arm" in result.stdout
    assert "gate failure: openbookqa · speech_llm_speech" in result.stderr
    # What both runs have is still compared (and unchanged).
    assert "| +0.00 |" in row_of(result, "openbookqa", "forgetting")


def test_candidate_with_30_percent_error_records_fails(tmp_path: Path) -> None:
    arms = {"speech_llm_text": _responses(40, []), "speech_llm_speech": _responses(40, [])}
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", arms)})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", arms)}, errors={"speech_llm_speech": set(range(12))})
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "30.0% of 40 answers unusable in the candidate (12 errors) vs 0.0% in the baseline" in result.stdout
    assert "| openbookqa | speech_llm_speech | 0.0 | 30.0 |" in result.stdout  # the coverage table


def test_killed_candidate_with_missing_records_fails(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, [])})})
    records = cand / "records" / "speech_llm_speech.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[:1]))  # 1 of 40 records
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "97.5% of 40 answers unusable in the candidate (39 missing)" in result.stdout


def test_unparsed_responses_count_as_unusable(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(40, range(4),
                                                                                               wrong="no idea")})})
    report = check.compare_runs(base, cand)
    (failure,) = report.failures
    assert "10.0% of 40 answers unusable in the candidate (4 unparsed)" in failure.reason


def test_different_item_sets_fail_naming_the_ids(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(4, [])})})
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "different item sets" in result.stdout and "only in baseline 1: openbookqa/test/4" in result.stdout


def test_same_ids_with_different_references_fail(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    rows = [json.loads(line) for line in (cand / "items.jsonl").read_text().splitlines()]
    rows[2]["reference"] = "C"
    (cand / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_check(base, cand)
    assert result.exit_code == 1 and "differ in text, choices or reference" in result.stdout
    assert "1: openbookqa/test/2" in result.stdout


def test_candidate_missing_a_subset_fails(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])}),
                                         "mmsu": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "**mmsu · subset**: the baseline answered this subset, the candidate did not" in result.stdout
    assert run_check(base, cand, "--subset", "openbookqa").exit_code == 0


def test_candidate_arm_with_only_errors_fails(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})},
                     errors={"speech_llm_speech": set(range(5))})
    result = run_check(base, cand)
    assert result.exit_code == 1, result.output
    assert "100.0% of 5 answers unusable" in result.stdout


# --- detectability and repeat-run noise ------------------------------------------------------------------------------


def test_minimum_detectable_drop_is_reported_and_warned(drop_runs: tuple[Path, Path]) -> None:
    report = check.compare_runs(*drop_runs)
    (comparison,) = report.comparisons
    # A 100% baseline has no variance: the floor is the 6 discordant items McNemar needs at alpha 0.05, of 40.
    assert check.smallest_significant_count(0.05) == 6
    assert comparison.mde == pytest.approx(100 * 6 / 40)
    (warning,) = report.warnings
    assert "at n=40" in warning and "15.0 points" in warning
    assert check.compare_runs(*drop_runs, max_drop=20).warnings == []


def test_minimum_detectable_drop_shrinks_with_n() -> None:
    half = np.array([0.0, 1.0] * 50)
    big = np.array([0.0, 1.0] * 5000)
    small_n, large_n = check.minimum_detectable(half, 100, 0.05), check.minimum_detectable(big, 100, 0.05)
    # (1.96 + 0.84) * sqrt(2 * 0.25 / n) * 100
    assert small_n == pytest.approx(2.8016 * np.sqrt(0.5 / 100) * 100, rel=1e-3)
    assert large_n == pytest.approx(small_n / 10, rel=1e-3)


def test_noise_from_repeat_runs_raises_the_threshold(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(200, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(200, range(20))})})
    # Two repeats of one model that disagree on 160 of 200 items (80 each way): the CI of their difference reaches
    # about ±12 points, above the candidate's 10-point drop.
    rep1 = write_run(tmp_path / "rep1", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(200, range(80))})})
    rep2 = write_run(tmp_path / "rep2", {"openbookqa": ("mcq", {"speech_llm_speech":
                                                                _responses(200, range(80, 160))})})
    assert run_check(base, cand, "--max-drop", "5").exit_code == 1
    result = run_check(base, cand, "--max-drop", "5", "--noise-from", f"{rep1},{rep2}")
    assert result.exit_code == 0, result.output
    line = row_of(result, "openbookqa", "speech_llm_speech")
    threshold = float(line.split("|")[10])
    assert threshold > 10 and "repeat-run noise" in result.stdout


def test_noise_from_needs_two_runs(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    result = run_check(base, base, "--noise-from", str(base))
    assert result.exit_code == 2 and "--noise-from takes two run directories" in result.stderr


# --- unusable input: exit 2 ------------------------------------------------------------------------------------------


def test_missing_run_exit_2(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    result = run_check(base, tmp_path / "nowhere")
    assert result.exit_code == 2 and "nowhere: no such run directory" in result.stderr


def test_run_without_records_exit_2(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    (cand / "records" / "speech_llm_speech.jsonl").unlink()
    result = run_check(base, cand)
    assert result.exit_code == 2 and "has no records" in result.stderr


def test_corrupt_records_exit_2(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    records = cand / "records" / "speech_llm_speech.jsonl"
    records.write_text("{broken\n" + records.read_text())
    result = run_check(base, cand)
    assert result.exit_code == 2
    assert "cannot score the run" in result.stderr and "speech_llm_speech.jsonl:1" in result.stderr


def test_unknown_subset_exit_2(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    result = run_check(base, cand, "--subset", "bbh")
    assert result.exit_code == 2 and "'bbh' is not in the baseline run" in result.stderr


# --- the step summary ------------------------------------------------------------------------------------------------


def test_table_is_appended_to_github_step_summary(drop_runs: tuple[Path, Path], tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = run_check(*drop_runs, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert text[len("earlier step\n"):].rstrip("\n") == result.stdout.rstrip("\n")
    assert "| subset | arm/gap | n | baseline | candidate | delta | CI | p | MDE | threshold | verdict |" in text


@pytest.mark.parametrize("case", ["pass", "error"])
def test_step_summary_is_written_on_exit_0_and_2(drop_runs: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    summary = tmp_path / "summary.md"
    base, cand = drop_runs
    if case == "pass":
        result = run_check(base, base, env={"GITHUB_STEP_SUMMARY": str(summary)})
        assert result.exit_code == 0
        assert summary.read_text().startswith("## speechlm-eval check: pass")
    else:
        result = run_check(base, tmp_path / "nowhere", env={"GITHUB_STEP_SUMMARY": str(summary)})
        assert result.exit_code == 2
        text = summary.read_text()
        assert text.startswith("## speechlm-eval check: error (exit 2)") and "nowhere: no such run directory" in text


def test_baseline_arm_with_only_errors_exit_2(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})},
                     errors={"speech_llm_speech": set(range(5))})
    cand = write_run(tmp_path / "cand", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(5, [])})})
    result = run_check(base, cand)
    assert result.exit_code == 2 and "no item is scored in the baseline run" in result.stderr


def test_no_step_summary_without_the_variable(tmp_path: Path) -> None:
    assert check.append_step_summary("x", env={}) is None


# --- the added build.py function mirrors build_results ---------------------------------------------------------------


def test_run_item_scores_match_build_results(tmp_path: Path) -> None:
    arms = {"text_llm_text": _responses(12, [0]), "speech_llm_text": _responses(12, [0, 5]),
            "speech_llm_speech": _responses(12, [0, 5, 7], wrong="no idea")}  # unparsed: seeded draws
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", arms)})
    scores, results = run_item_scores(run), build_results(run)
    for arm, by_id in scores["scores"]["openbookqa"].items():
        mean = 100 * np.mean([s.value for s in by_id.values()])
        assert mean == pytest.approx(results["subsets"]["openbookqa"]["arms"][arm]["score"])
