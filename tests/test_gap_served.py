"""`speechlm-eval gap --base-url`: the served gap against real ``transformers serve`` processes on 127.0.0.1 serving the
shipped organism, compared with the in-process gap on the same 144 items, all three arms; prompt parity; a kill
mid-run; what a served model cannot do said in the report; no credential in any file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.gap import ConfigError, GapConfig, resolve_defaults
from speechlm_eval.rundir import ARMS
from tests.fixtures.kill import kill_after_lines
from tests.fixtures.served import SHIPPED_SPEECH_LLM, SHIPPED_TEXT_LLM, FaultProxy, require_serving

runner = CliRunner()
ORGANISM = ["--suite", "organism:organism_mcq@seed0", "--max-new-tokens", "8"]
KEY_ENV = "SPEECHLM_EVAL_TEST_GAP_KEY"
SECRET = "sk-gap-test-secret-5150"
PARITY_K = 32  # the parity check's own items (every item is compared with the in-process gap's records anyway)


def gap(*args: str):
    return runner.invoke(app, ["gap", *args], catch_exceptions=False)


def served_args(speech, text) -> list[str]:
    return ["--model", speech.model, "--base-url", speech.base_url, "--text-model", text.model,
            "--text-base-url", text.base_url]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_lines(path)}


def all_text_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("in_process") / "run"
    result = gap("--model", str(SHIPPED_SPEECH_LLM), "--text-model", str(SHIPPED_TEXT_LLM), *ORGANISM,
                 "--no-diagnostics", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def served_run(organism_speech_server, organism_text_server, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "run"
    result = gap(*served_args(organism_speech_server, organism_text_server), *ORGANISM, "--out", str(out),
                 "--no-diagnostics", "--parity-check", str(PARITY_K),
                 "--price", f"{organism_speech_server.model}=2.5/10")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_served_gap_answers_as_the_in_process_gap(served_run, in_process_run):
    """Every item, every arm: the served records hold the in-process gap's answers (text, token counts, finish), so
    the scores and gaps are the same; the parity check (in-process, one prompt at a time) agrees on its items and on
    prompt token counts."""
    for arm in ARMS:
        served, local = by_id(served_run / "records" / f"{arm}.jsonl"), by_id(in_process_run / "records" / f"{arm}.jsonl")
        assert len(served) == len(local) == 144
        same = sum(served[i] == local[i] for i in local)
        print(f"\n{arm}: {same}/144 served records identical to the in-process gap's")
        assert served == local, arm
    results, expected = (json.loads((run / "results.json").read_text()) for run in (served_run, in_process_run))
    assert results["subsets"] == expected["subsets"]
    for arm in ARMS:
        entry = results["parity"]["arms"][arm]
        assert (entry["n"], entry["compared"], entry["identical"]) == (PARITY_K,) * 3, arm
        assert entry["prompt_tokens"]["equal"] == PARITY_K and entry["differences"] == []
    manifest = json.loads((served_run / "manifest.json").read_text())
    assert manifest["models"]["speech_llm"]["family"] == "served"
    assert manifest["models"]["speech_llm"]["base_url"].startswith("http://127.0.0.1:")
    assert manifest["request"]["served"] == {"speech_llm": True, "text_llm": True}
    # --batch-size auto with no model in-process: the cap (the in-process batch; served arms sent --concurrency (32)
    # prompts per batch).
    assert manifest["batch_size"] == 64
    usage = {u["role"]: u for u in results["usage"]}
    assert (usage["speech_llm"]["calls"], usage["text_llm"]["calls"]) == (2 * 144, 144)
    assert usage["speech_llm"]["cost_usd"] == pytest.approx(
        (usage["speech_llm"]["prompt_tokens"] * 2.5 + usage["speech_llm"]["completion_tokens"] * 10) / 1e6)
    assert usage["text_llm"]["cost_usd"] is None  # not priced
    report = (served_run / "report.md").read_text()
    assert "## Prompt parity: served vs in-process" in report and "## Endpoint usage" in report
    assert "Served: speech LLM" in report
    assert str(SHIPPED_SPEECH_LLM) not in all_text_under(served_run)  # portable paths only, as in-process runs


@pytest.mark.slow
def test_served_diagnostics_run_on_the_local_checkpoints(organism_speech_server, organism_text_server, tmp_path):
    """Served under their paths, both checkpoints are on this machine: KL/JSD run in-process on them, the perception
    probe asks the endpoint (usage: two arms + the probe), and the report says so."""
    out = tmp_path / "diag"
    result = gap(*served_args(organism_speech_server, organism_text_server), *ORGANISM, "--limit", "12",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["diagnostics"]["distribution"]["organism_mcq"]["n"] == 12
    assert results["diagnostics"]["distribution"]["organism_mcq"]["kl_text_llm_vs_speech_llm"] is not None
    assert results["diagnostics"]["perception"]["subsets"]["organism_mcq"]["n"] == 12
    assert {u["role"]: u["calls"] for u in results["usage"]} == {"speech_llm": 3 * 12, "text_llm": 12}
    assert "ran in-process on the served models' local checkpoints" in (out / "report.md").read_text()


@pytest.mark.slow
def test_served_model_without_checkpoint_says_what_did_not_run(organism_speech_server, tmp_path, monkeypatch):
    """A model served under a name (no checkpoint here): the report says the logit diagnostics did not run, the
    perception probe still runs through the endpoint, and neither the key nor the URL's credentials reach a file."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    out = tmp_path / "alias"
    with FaultProxy(organism_speech_server.root_url, plan=lambda body: [],
                    aliases={"organism-speech": organism_speech_server.model}) as proxy:
        url = proxy.base_url.replace("http://", f"http://user:{SECRET}-url@")
        result = gap("--model", "organism-speech", "--base-url", url, "--api-key-env", KEY_ENV, *ORGANISM,
                     "--limit", "6", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert proxy.log.authorization  # (credentials in a URL are sent as HTTP basic auth, which replaces the key)
    records = read_lines(out / "records" / "speech_llm_speech.jsonl")
    assert len(records) == 6 and all(r["error"] is None for r in records)
    assert len(read_lines(out / "records" / "perception.jsonl")) == 6
    assert not (out / "records" / "diagnostics.jsonl").exists()
    report = (out / "report.md").read_text()
    assert "Distribution diagnostics (per-token KL/JSD) not run: a served model exposes no logits" in report
    assert "Spoken log-likelihood multiple choice (lm-eval) is not available" in report
    assert "forgetting is not measured" in report
    text = all_text_under(out)
    assert SECRET not in text and "user:" not in text
    assert json.loads((out / "manifest.json").read_text())["models"]["speech_llm"]["base_url"] == proxy.base_url


@pytest.mark.slow
def test_killed_served_run_resumes_without_duplicates(organism_speech_server, organism_text_server, served_run,
                                                      tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "speechlm_eval.cli", "gap",
               *served_args(organism_speech_server, organism_text_server), *ORGANISM, "--limit", "24",
               "--arm", "text_llm_text", "--arm", "speech_llm_text", "--no-diagnostics", "--concurrency", "1",
               "--out", str(out)]
    target = out / "records" / "text_llm_text.jsonl"
    kill_after_lines(command, target)
    done_before = target.read_text().count("\n")
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for arm in ("text_llm_text", "speech_llm_text"):
        records = read_lines(out / "records" / f"{arm}.jsonl")
        ids = [r["id"] for r in records]
        assert len(ids) == len(set(ids)) == 24, arm
        full = by_id(served_run / "records" / f"{arm}.jsonl")
        assert all(r == full[r["id"]] for r in records), arm
    assert 3 <= done_before < 24
    # The killed session died in its first arm (its usage with it); the resumed one asked only what was missing.
    usage = read_lines(out / "usage.jsonl")
    assert sum(u["calls"] for u in usage if u["role"] == "text_llm") == 24 - done_before
    assert sum(u["calls"] for u in usage if u["role"] == "speech_llm") == 24


def test_served_options_are_checked_before_anything_loads(tmp_path):
    require_serving()
    url = ["http://127.0.0.1:9/v1"]
    cases = [
        (GapConfig(base_url=url, out=tmp_path), "--base-url needs --model"),
        (GapConfig(model="m", text_base_url=url, out=tmp_path), "--text-base-url needs --text-model"),
        (GapConfig(model=str(SHIPPED_SPEECH_LLM), parity_check=3, out=tmp_path), "needs --base-url"),
        (GapConfig(model="org/m", base_url=url, parity_check=3, out=tmp_path), "--local-model PATH"),
        (GapConfig(model="org/m", base_url=url, lm_eval_tasks=["arc_easy"], out=tmp_path), "--local-model"),
        (GapConfig(model="org/m", base_url=url, prices=["org/m=cheap"], out=tmp_path), "per million"),
        (GapConfig(model="org/m", base_url=url, audio_encoding="mp3", out=tmp_path), "--audio-encoding"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve_defaults(config)
    config = resolve_defaults(GapConfig(model="org/m", base_url=url, out=tmp_path))
    # The batch stays "auto" until models load (served arms send --concurrency prompts per batch).
    assert config.batch_size == "auto" and any("exposes no logits" in n for n in config.notes)
    # A checkpoint served under its path is its own local checkpoint: nothing to say about missing logits.
    config = resolve_defaults(GapConfig(model=str(SHIPPED_SPEECH_LLM), base_url=url, parity_check=2, out=tmp_path))
    assert not any("exposes no logits" in n for n in config.notes)
    result = runner.invoke(app, ["gap", "--model", "org/m", "--base-url", "127.0.0.1:8000", "--limit", "1",
                                 "--suite", "bundled:openbookqa", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "http(s) URL" in result.output
