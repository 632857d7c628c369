"""`speechlm-eval distill` end to end: before gap, distillation, after gap, before/after report (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app

pytestmark = pytest.mark.slow


def test_distill_command_repairs_and_reports(tiny_pair, tmp_path):
    out = tmp_path / "kd"
    args = ["distill", "--student", str(tiny_pair[0]), "--teacher", str(tiny_pair[1]), "--out", str(out),
            "--max-examples", "16", "--lr", "2e-3", "--batch-size", "4", "--epochs", "2",
            "--suite", "bundled:openbookqa,bbh", "--eval-max-new-tokens", "4"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "report.html", "comparison.json", "before/results.json", "after/results.json",
                 "checkpoint/config.json"):
        assert (out / name).exists(), name
    after_manifest = json.loads((out / "after" / "manifest.json").read_text())
    assert after_manifest["models"]["speech_llm"]["id"] == "../checkpoint"  # recorded relative to the run
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["subsets"]) == {"openbookqa", "bbh"}
    assert set(comparison["subsets"]["bbh"]["gaps"]) == {"forgetting", "inequivalence"}
    # The judge-free signal moves even where 8 items cannot: T→T pulls the student's text path to the teacher.
    kl = comparison["distribution"]["openbookqa"]["kl_text_llm_vs_speech_llm"]
    assert kl["after"] < kl["before"]
    assert "recovered" in (out / "report.md").read_text()
    # A second call reuses the before run and the finished distillation.
    before_records = (out / "before" / "records" / "speech_llm_text.jsonl").read_bytes()
    again = CliRunner().invoke(app, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert (out / "before" / "records" / "speech_llm_text.jsonl").read_bytes() == before_records
    # --overwrite starts over: the earlier after run must not be resumed as if it scored the new checkpoint.
    stale = out / "after" / "records" / "stale-marker"
    stale.write_text("from the previous run")
    overwritten = CliRunner().invoke(app, [*args, "--overwrite"], catch_exceptions=False)
    assert overwritten.exit_code == 0, overwritten.output
    assert not stale.exists() and (out / "after" / "results.json").exists()
