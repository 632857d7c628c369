"""Progress of long stages: a plain log line at start, at least every interval (even while no item finishes) and at
the end when stderr is not a terminal; and `gap` / `distill` with their output redirected to a file show every stage."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechlm_eval import progress
from speechlm_eval.cli import app

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\d\d:\d\d:\d\d INFO speechlm_eval\.progress: (?P<stage>[^:]+(?:: [^:0-9][^:]*)?): "
                  r"(?P<done>\d+)/(?P<total>\d+) \w+ \(\d+%\), [\d.]+ \w+/s, elapsed [\d:]+, ETA [\d:?]+")


def test_status_line_has_rate_and_eta() -> None:
    line = progress.status_line("speech_llm_speech", 40, 140, 20.0)
    assert line == "speech_llm_speech: 40/140 items (29%), 2.00 items/s, elapsed 0:00:20, ETA 0:00:50"
    # After a resume only this process's work counts towards the rate.
    assert "1.00 steps/s" in progress.status_line("distill", 30, 40, 10.0, "steps", already=20)


def test_a_stage_logs_at_every_interval_even_when_nothing_finishes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="speechlm_eval.progress")
    with progress.Stage("slow batch", total=4, interval=0.05, rich=False) as shown:
        time.sleep(0.4)  # one long batch: no advance for 8 intervals
        shown.advance(4)
    lines = [r.getMessage() for r in caplog.records if r.name == "speechlm_eval.progress"]
    assert lines[0].startswith("slow batch: 0/4 items (0%)")
    assert len([ln for ln in lines if ln.startswith("slow batch: 0/4")]) >= 4  # heartbeats while waiting
    assert lines[-1].startswith("slow batch: 4/4 items (100%)") and lines[-1].endswith("[done]")


def test_a_disabled_stage_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="speechlm_eval.progress")
    with progress.Stage("other rank", total=2, interval=0.01, enabled=False, rich=False) as shown:
        time.sleep(0.05)
        shown.advance(2)
    assert not caplog.records


def test_log_level_is_checked() -> None:
    with pytest.raises(ValueError, match="--log-level must be one of"):
        progress.configure_logging("loud")
    result = CliRunner().invoke(app, ["--log-level", "loud", "report", "nowhere"])
    assert result.exit_code == 2 and "--log-level must be one of" in result.output
    progress.configure_logging("info")


def _run_redirected(tmp_path: Path, *args: str) -> str:
    """Run the CLI in a fresh process with stdout and stderr redirected to a file (as in CI); returns the file."""
    log = tmp_path / "out.log"
    env = {**os.environ, progress.INTERVAL_ENV: "0.2", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-m", "speechlm_eval.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                       cwd=ROOT, env=env, check=True, timeout=900)
    return log.read_text()


def _stages(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            out.setdefault(match["stage"], []).append(line)
    return out


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.mark.slow
@needs_espeak
def test_gap_redirected_to_a_file_logs_every_stage(tmp_path: Path) -> None:
    # The diagnostics as separate passes, each with its own stage (by default they run on top of the speech arm's
    # prompts, within its stage: tests/test_diagnostics.py).
    text = _run_redirected(tmp_path, "gap", "--out", str(tmp_path / "run"), "--limit", "8", "--no-reuse-prompt-cache")
    stages = _stages(text)
    for name in ("text_llm_text", "speech_llm_text", "speech_llm_speech", "diagnostics: KL/JSD", "perception probe"):
        assert name in stages, (name, text)
        assert f"{name}: 0/8 items" in stages[name][0]
        assert stages[name][-1].endswith("[done]") and "8/8 items (100%)" in stages[name][-1]
    # ... and ends with the numbers, not only paths.
    assert "speechlm-eval gap" in text and "organism_mcq" in text and "forgetting" in text


@pytest.mark.slow
@needs_espeak
def test_short_organism_distill_redirected_to_a_file_logs_every_stage(tmp_path: Path) -> None:
    text = _run_redirected(tmp_path, "distill", "--out", str(tmp_path / "distill"), "--epochs", "1",
                           "--max-examples", "24", "--eval-limit", "4")
    stages = _stages(text)
    for name in ("distill data: TTS", "distill data: teacher targets", "teacher cache", "distill training",
                 "speech_llm_speech"):
        assert name in stages, (name, text)
        assert stages[name][-1].endswith("[done]")
    # the before/after evaluations' diagnostics ran within their speech arm's stage
    assert text.count("on the speech arm's prompts: 4 KL/JSD record(s), 4 transcript(s)") == 2, text
    for phase in ("distill 1/4", "distill 2/4", "distill 3/4", "distill 4/4"):
        assert phase in text
    assert "before / after" in text and "inequivalence" in text


@pytest.mark.slow
@needs_espeak
def test_micro_organism_build_redirected_to_a_file_logs_every_stage(tmp_path: Path) -> None:
    text = _run_redirected(tmp_path, "organism", "build", "--out", str(tmp_path / "build"), "--micro")
    stages = _stages(text)
    for name, unit in (("text LLM", "steps"), ("clips", "clips"), ("stage A", "steps"), ("stage B", "steps")):
        assert name in stages, (name, text)
        assert f"{name}: 0/" in stages[name][0] and unit in stages[name][0]
        assert stages[name][-1].endswith("[done]") and "(100%)" in stages[name][-1]
