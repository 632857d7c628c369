"""The judge-free diagnostics (speechlm_eval/diagnostics.py): per-row divergences, and the KL/JSD pass and
perception probe run on top of the speech arm's prompt cache, which must give the records the separate passes give."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from speechlm_eval import diagnostics
from speechlm_eval.cli import app
from speechlm_eval.divergence import token_jsd, token_kl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_divergences_are_each_rows_own_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 5, 30, generator=generator), torch.randn(4, 5, 30, generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kl, jsd = diagnostics.token_divergences(p, q, mask)
    for row in (0, 1, 3):
        m = mask[row : row + 1]
        assert kl[row] == pytest.approx(float(token_kl(p[row : row + 1], q[row : row + 1], m).mean()), rel=1e-6)
        assert jsd[row] == pytest.approx(float(token_jsd(p[row : row + 1], q[row : row + 1], m).mean()), rel=1e-6)
    assert math.isnan(kl[2]) and math.isnan(jsd[2])


def records(run: Path, name: str) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (run / "records" / f"{name}.jsonl").read_text().splitlines())}


DIVERGENCES = ("kl_text_vs_speech", "jsd_text_vs_speech", "kl_text_llm_vs_speech_llm", "jsd_text_llm_vs_speech_llm")


def assert_same_diagnostics(run: Path, reference: Path) -> None:
    got, want = records(run, "diagnostics"), records(reference, "diagnostics")
    assert got.keys() == want.keys() and len(got) == 24
    for key, record in want.items():
        assert {k: v for k, v in got[key].items() if k not in DIVERGENCES} == {
            k: v for k, v in record.items() if k not in DIVERGENCES}
        for field in DIVERGENCES:
            assert got[key][field] == pytest.approx(record[field], abs=1e-4), (key, field)
    assert records(run, "perception") == records(reference, "perception")


@pytest.mark.slow
def test_diagnostics_on_the_speech_arms_prompts_match_the_separate_passes(tmp_path, monkeypatch, caplog) -> None:
    """The default organism run on 24 items with the prompt cache reused (the default) and without: the same arm
    and perception records byte for byte, the same KL/JSD to float rounding; with reuse, the separate passes found
    nothing left to do. Then half the diagnostics are deleted and the run resumed: the separate passes redo them."""
    calls = {"separate KL": 0, "separate probe": 0}
    divergence_records, probe_group = diagnostics._divergence_records, diagnostics._probe_group
    with_grad = []

    def counted_divergences(*args, given_speech=None, **kwargs):
        calls["separate KL"] += given_speech is None
        with_grad.append(torch.is_grad_enabled())  # teacher-forced forwards without autograd, either way
        return divergence_records(*args, given_speech=given_speech, **kwargs)

    def counted_probe(*args, **kwargs):
        calls["separate probe"] += 1
        return probe_group(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "_divergence_records", counted_divergences)
    monkeypatch.setattr(diagnostics, "_probe_group", counted_probe)
    runner = CliRunner()

    def gap(out: Path, *extra: str) -> None:
        result = runner.invoke(app, ["gap", "--limit", "24", "--out", str(out), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    gap(tmp_path / "separate", "--no-reuse-prompt-cache")
    assert calls["separate KL"] > 0 and calls["separate probe"] > 0
    calls.update({"separate KL": 0, "separate probe": 0})
    with caplog.at_level(logging.INFO, logger="speechlm_eval.diagnostics"):
        gap(tmp_path / "reused")
    assert calls == {"separate KL": 0, "separate probe": 0}
    assert "on the speech arm's prompts: 24 KL/JSD record(s), 24 transcript(s)" in caplog.text
    for arm in ("text_llm_text", "speech_llm_text", "speech_llm_speech", "perception"):
        reused = (tmp_path / "reused" / "records" / f"{arm}.jsonl").read_bytes()
        assert reused and reused == (tmp_path / "separate" / "records" / f"{arm}.jsonl").read_bytes(), arm
    assert_same_diagnostics(tmp_path / "reused", tmp_path / "separate")
    assert with_grad and not any(with_grad)

    for name in ("diagnostics", "perception"):  # a run killed before its diagnostics finished
        path = tmp_path / "reused" / "records" / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:12]))
    gap(tmp_path / "reused", "--resume")
    assert calls["separate KL"] > 0 and calls["separate probe"] > 0
    assert_same_diagnostics(tmp_path / "reused", tmp_path / "separate")
