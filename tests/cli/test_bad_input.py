"""The bad-input corpus: every way a user can hand a command something unusable ends in one `error:` line and exit 2,
never a traceback, and the checks of `gap` run before any model loads (seconds, not a whole run)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.report.build import failed_arms
from tests.judge.test_judge import SECRET, LocalOpenAI
from tests.report.test_check import _responses, write_run

MODEL_LOADED = "Loading weights"  # what transformers prints as a checkpoint loads


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def assert_clean_exit_2(result: Any, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped the command
    assert "Traceback" not in result.output
    assert "error: " in result.output and message in " ".join(result.output.split()), result.output


@pytest.fixture
def judge_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalOpenAI]:
    fake = LocalOpenAI()
    fake.thread.start()
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", fake.base_url)
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


# --- score -------------------------------------------------------------------------------------------------------


def test_score_on_a_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "outputs.jsonl"
    path.write_bytes(b'{"response": "A"}\n{"response": "\xff\xfe"}\n')
    assert_clean_exit_2(invoke("score", "voicebench", "--subset", "openbookqa", str(path)),
                        "outputs.jsonl:2: not UTF-8 text (byte 0xff")
    mmau = tmp_path / "mmau.json"
    mmau.write_bytes(b"[\xff]")
    assert_clean_exit_2(invoke("score", "mmau", str(mmau)), "mmau.json:1: not UTF-8 text")


def test_score_with_an_unwritable_per_item_path(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text(json.dumps({"response": "A", "answer": "A", "prompt": "q"}) + "\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_clean_exit_2(invoke("score", "voicebench", "--subset", "openbookqa", str(outputs), "--per-item",
                               str(blocker / "items.jsonl")), "cannot write there")
    assert_clean_exit_2(invoke("score", "voicebench", "--subset", "openbookqa", str(outputs), "--per-item",
                               str(tmp_path)), "is a directory")


# --- report ------------------------------------------------------------------------------------------------------


def test_report_on_a_folder_without_records(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(4, [])})})
    (run / "records" / "speech_llm_speech.jsonl").unlink()
    assert_clean_exit_2(invoke("report", str(run)), "has no records")
    assert_clean_exit_2(invoke("report", str(tmp_path / "nowhere")), "is not a run directory")


def test_report_on_a_corrupt_record(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(4, [])})})
    records = run / "records" / "speech_llm_speech.jsonl"
    records.write_text("{broken\n" + records.read_text())
    assert_clean_exit_2(invoke("report", str(run)), "speech_llm_speech.jsonl:1")


def test_a_subset_whose_items_all_failed_is_an_error_not_a_dash(tmp_path: Path) -> None:
    arms = {"speech_llm_text": _responses(4, []), "speech_llm_speech": _responses(4, [])}
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", arms)}, errors={"speech_llm_speech": {0, 1, 2, 3}})
    result = invoke("report", str(run))
    assert_clean_exit_2(result, "no item could be scored in openbookqa · speech_llm_speech: all 4 items failed "
                                "(4 error records, 0 missing; first error: CUDA OOM)")
    assert (run / "report.md").exists()  # written first, so the failure can be read
    assert failed_arms({"subsets": {"s": {"n": 3, "arms": {"a": {"n": 1, "errors": 2, "missing": 0}}}}}) == []


def test_judge_refusing_while_judging_a_run(tmp_path: Path, judge_server: LocalOpenAI) -> None:
    run = write_run(tmp_path / "run", {"openbookqa": ("mcq", {"speech_llm_speech": _responses(2, [])})})
    rows = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    for row in rows:  # make them open-ended: judge-scored
        row.update(subset="commoneval", scorer="open", reference=None, id=row["id"].replace("openbookqa", "ce"))
    (run / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = [json.loads(line) for line in (run / "records" / "speech_llm_speech.jsonl").read_text().splitlines()]
    for record in records:
        record.update(subset="commoneval", id=record["id"].replace("openbookqa", "ce"))
    (run / "records" / "speech_llm_speech.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    judge_server.failures = [(400, "bad request: unsupported parameter", {})] * 4
    result = invoke("report", str(run), "--judge", "openai:m")
    assert_clean_exit_2(result, "refused the request (HTTP 400")
    assert SECRET not in result.output


# --- gap: checked before any model loads ------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--tts-voice", "xx-nonexistent"], "--tts-voice xx-nonexistent: cannot speak"),
    (["--tts-engine", "no-such-engine"], "unknown TTS engine 'no-such-engine'"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
    (["--judge", "gpt-4o-mini"], "unknown judge 'gpt-4o-mini'"),
    (["--lm-eval-tasks", "arc_eezy"], "lm-eval knows no task or group arc_eezy"),
    (["--mmau-json", "/nonexistent/mmau.json"], "/nonexistent/mmau.json"),
    (["--lm-eval-include", "/nonexistent/tasks"], "--lm-eval-include /nonexistent/tasks: no such file"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: cannot read it"),
])
def test_gap_bad_options_fail_before_any_model_loads(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("gap", "--out", str(tmp_path / "run"), *args)
    assert_clean_exit_2(result, message)
    assert MODEL_LOADED not in result.output and not (tmp_path / "run" / "records").exists()


def test_gap_without_disk_space_fails_first(tmp_path: Path) -> None:
    result = invoke("gap", "--out", str(tmp_path / "run"), env={"SPEECHLM_EVAL_MIN_FREE_MB": str(2**40)})
    assert_clean_exit_2(result, "MiB free on its disk, below the")


def test_gap_judge_without_a_key_fails_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPEECHLM_EVAL_JUDGE_API_KEY", "OPENAI_API_KEY", "SPEECHLM_EVAL_JUDGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    result = invoke("gap", "--out", str(tmp_path / "run"), "--judge", "openai:gpt-4o-mini")
    assert_clean_exit_2(result, "needs an API key")
    assert MODEL_LOADED not in result.output


@pytest.mark.parametrize("status, message", [(401, "rejected the API key (HTTP 401"),
                                             (500, "answered with an error (HTTP 500")])
def test_gap_judge_endpoint_refusing_fails_first(tmp_path: Path, judge_server: LocalOpenAI, status: int,
                                                 message: str) -> None:
    judge_server.get_failures = [(status, "no")] * 3  # a bad key; a server failing every call
    result = invoke("gap", "--out", str(tmp_path / "run"), "--judge", "openai:m")
    assert_clean_exit_2(result, message)
    assert MODEL_LOADED not in result.output and SECRET not in result.output
    assert [r.get("method") for r in judge_server.requests] == ["GET"]  # one cheap call, no retries


def test_gap_judge_on_a_dead_host_fails_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    result = invoke("gap", "--out", str(tmp_path / "run"), "--judge", "openai:m")
    assert_clean_exit_2(result, "cannot reach the judge endpoint http://127.0.0.1")
    assert MODEL_LOADED not in result.output


def test_distill_bad_voice_fails_before_the_before_run(tmp_path: Path) -> None:
    result = invoke("distill", "--out", str(tmp_path / "d"), "--tts-voice", "xx-nonexistent")
    assert_clean_exit_2(result, "--tts-voice xx-nonexistent: cannot speak")
    assert not (tmp_path / "d" / "before").exists()
