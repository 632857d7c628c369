"""What served models leave in a run directory, summarised from files alone: every parity difference listed, usage
summed over processes and sessions, cost only where every line was priced."""

from __future__ import annotations

import json
from pathlib import Path

from speechlm_eval.records import dumps
from speechlm_eval.report.markdown import parity_lines, usage_lines
from speechlm_eval.report.served import parity_results, usage_results
from speechlm_eval.rundir import PARITY, RunDir


def entry(served: str, local: str, served_tokens: int = 40, local_tokens: int = 40) -> dict:
    return {"compared": True, "identical": served == local, "served": served, "in_process": local,
            "served_prompt_tokens": served_tokens, "in_process_prompt_tokens": local_tokens,
            "served_new_tokens": 2, "in_process_new_tokens": 2}


def test_parity_lists_every_difference(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.records_dir.mkdir()
    rows = [
        {"id": "q/0", "subset": "q", "arm": PARITY, "error": None,
         "arms": {"speech_llm_text": entry("A", "A"), "speech_llm_speech": entry("B", "C", 90, 91)}},
        {"id": "q/1", "subset": "q", "arm": PARITY, "error": None,
         "arms": {"speech_llm_text": entry("D", "D"),
                  "speech_llm_speech": {"compared": False, "reason": "served: HTTP 400"}}},
    ]
    run.records_path(PARITY).write_text("".join(dumps(r) + "\n" for r in rows))
    parity = parity_results(run)
    text, speech = parity["arms"]["speech_llm_text"], parity["arms"]["speech_llm_speech"]
    assert (text["n"], text["compared"], text["identical"], text["prompt_tokens"]["equal"]) == (2, 2, 2, 2)
    assert (speech["n"], speech["compared"], speech["identical"], speech["prompt_tokens"]["equal"]) == (2, 1, 0, 0)
    assert speech["differences"] == [{"id": "q/0", "served": "B", "in_process": "C", "served_prompt_tokens": 90,
                                      "in_process_prompt_tokens": 91}]
    assert speech["not_compared"] == [{"id": "q/1", "reason": "served: HTTP 400"}]
    markdown = "\n".join(parity_lines(parity))
    assert "| speech LLM · text | 2 of 2 | 2 (100.0%) | 40.0 | 40.0 | 2 of 2 |" in markdown
    assert "`q/0`: served 'B' (90 prompt tokens) vs in-process 'C' (91)" in markdown
    assert "`q/1`: served: HTTP 400" in markdown
    assert parity_results(RunDir(tmp_path / "none")) is None and parity_lines(None) == []


def test_usage_sums_sessions_and_prices_only_what_was_priced(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    line = {"role": "speech_llm", "model": "m", "endpoint": "http://h/v1/chat/completions", "calls": 10,
            "attempts": 12, "retries": 2, "failed": 0, "prompt_tokens": 1000, "completion_tokens": 50,
            "audio_prompt_tokens": 0, "unreported": 0, "cost_usd": 0.5}
    run.append_usage([line, {**line, "role": "judge", "model": "j", "n_fallback": True}])
    run.append_usage([{**line, "rank": 1, "cost_usd": 0.25}, {**line, "role": "judge", "model": "j",
                                                               "cost_usd": None}])
    assert all("id" in json.loads(raw) for raw in run.usage_path.read_text().splitlines())
    rows = {r["role"]: r for r in usage_results(run)}
    assert (rows["speech_llm"]["calls"], rows["speech_llm"]["retries"]) == (20, 4)
    assert rows["speech_llm"]["cost_usd"] == 0.75
    assert rows["judge"]["cost_usd"] is None and rows["judge"]["n_fallback"]
    markdown = "\n".join(usage_lines(usage_results(run)))
    assert "| speech llm | `m` | http://h/v1/chat/completions | 20 | 4 | 0 | 2000 | 100 | 0.7500 |" in markdown
    assert "judge (n ignored: single calls)" in markdown
    assert usage_results(RunDir(tmp_path / "none")) == [] and usage_lines([]) == []
