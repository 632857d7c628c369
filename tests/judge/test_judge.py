"""The VoiceBench judge: prompts byte for byte, the OpenAI-compatible backend against a real local HTTP server
(request fields, retries, errors, the key kept secret), the on-disk cache, the hf backend on a tiny model, wiring."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from speechlm_eval.data.item import Item
from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.judge import base as judge_module
from speechlm_eval.judge.base import JudgeError, JudgeSettings, RetryPolicy, describe_judge
from speechlm_eval.judge.cache import cache_key, cache_path
from speechlm_eval.judge.local import prompt_seed
from speechlm_eval.judge.run import judge_arm_rows, judge_records, judgement_rows, load_judge, validate_judge
from speechlm_eval.scoring.judged import MissingJudgement, attach_judgements, judge_outputs_for, response_key
from speechlm_eval.judge.prompts import (
    JUDGE_SYSTEM,
    OPEN_PROMPT,
    QA_PROMPT,
    fill_open_prompt,
    fill_qa_prompt,
    judge_prompt,
)
from speechlm_eval.scoring.open_ended import parse_rating  # also registers the "open" scorer
from speechlm_eval.scoring.registry import get_scorer

SECRET = "sk-test-SECRET-4242"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.05, request_timeout_s=5.0)


def open_item(n: int, text: str = "Why is the sky blue?") -> Item:
    return Item(id=f"commoneval/test/{n}", subset="commoneval", text=text)


def qa_item(n: int) -> Item:
    return Item(id=f"sd-qa/usa/{n}", subset="sd-qa", text="What is the capital of France?", reference="Paris")


# --------------------------------------------------------------------------------------------------------------------
# Prompts


def test_open_prompt_is_upstream_byte_for_byte() -> None:
    assert len(OPEN_PROMPT) == 1480
    assert OPEN_PROMPT.startswith("\nI need your help to evaluate the performance of several models")
    assert OPEN_PROMPT.endswith("without anything else.\nYou don\u2019t need to provide any explanations.\n")
    assert not OPEN_PROMPT.endswith("\n\n")
    # Curly apostrophes only: model’s ×2, user’s ×4, don’t, user’s instruction, models’, You don’t.
    assert OPEN_PROMPT.count("\u2019") == 10 and "'" not in OPEN_PROMPT
    for phrase in ("model\u2019s responses", "user\u2019s query", "models\u2019 response", "You don\u2019t need"):
        assert phrase in OPEN_PROMPT
    assert "### [Instruction]: {prompt}\n### [Response]: {response}\n\n" in OPEN_PROMPT
    assert OPEN_PROMPT.count("\n") == 17  # "\n" + 16 lines (upstream lines 12-27)
    assert hashlib.sha256(OPEN_PROMPT.encode()).hexdigest() == (
        "98f2e9919fbad61f1cab0c2492f53519412d97faeead126c756d73355552bd1e")


def test_qa_prompt_is_upstream_stripped_with_its_trailing_space() -> None:
    assert len(QA_PROMPT) == 238
    assert QA_PROMPT.startswith("### Question\n{prompt}\n\n### Reference answer\n{reference}\n\n### Candidate answer\n")
    assert QA_PROMPT.endswith('Please only output a single "Yes" or "No". Do not output anything else.')
    lines = QA_PROMPT.split("\n")
    assert lines[-2] == "Is the candidate answer correct based on the question and reference answer? "
    assert [line for line in lines if line != line.rstrip()] == [lines[-2]]  # the only line with trailing space
    assert hashlib.sha256(QA_PROMPT.encode()).hexdigest() == (
        "b89c3ec54556c16e6a111586a215d8b9d2cbbbb2d334c2604d84f7102ec398b0")


def test_system_message_keeps_its_straight_apostrophe() -> None:
    assert JUDGE_SYSTEM == "You are a helpful assistant who tries to help answer the user's question."


def test_prompts_are_filled_by_chained_replace() -> None:
    filled = fill_open_prompt("Say {hi}", "Hello {there}")
    assert "### [Instruction]: Say {hi}\n### [Response]: Hello {there}\n" in filled
    assert len(filled) == 1480 - len("{prompt}{response}") + len("Say {hi}Hello {there}")
    # Upstream replaces {prompt} first, so a literal "{response}" in the user's prompt is replaced as well.
    quirk = fill_open_prompt("Repeat {response}", "OK")
    assert "### [Instruction]: Repeat OK\n" in quirk
    qa = fill_qa_prompt("Q?", "Paris", "It is Paris.")
    assert qa.startswith("### Question\nQ?\n\n### Reference answer\nParis\n\n### Candidate answer\nIt is Paris.\n\n")


def test_item_with_reference_gets_the_qa_prompt() -> None:
    assert judge_prompt(qa_item(0), "Paris.") == fill_qa_prompt("What is the capital of France?", "Paris", "Paris.")
    assert judge_prompt(open_item(0), "Rayleigh.") == fill_open_prompt("Why is the sky blue?", "Rayleigh.")
    with pytest.raises(ValueError, match="text"):
        judge_prompt(Item(id="x", subset="commoneval", text=None), "r")


# --------------------------------------------------------------------------------------------------------------------
# A real OpenAI-compatible HTTP server on 127.0.0.1


def content_for(prompt: str, i: int) -> str:
    """What the local server answers as choice ``i`` of ``prompt``: unique per prompt, padded to test the strip."""
    return f"  {hashlib.sha256(prompt.encode()).hexdigest()[:8]}-{i}\n"


class LocalOpenAI:
    """A chat-completions endpoint: answers ``content_for`` per choice, after the queued failures (status, body)."""

    max_requests = 60  # a runaway retry loop fails the test instead of hanging it

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[int, str, dict[str, str]]] = []
        self.n_choices: int | None = None  # None = as many as asked
        self.models: list[str] = ["m"]  # what GET /models lists
        self.get_failures: list[tuple[int, str]] = []  # queued answers to GET /models
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the endpoint check's GET /models
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "method": "GET"})
                    failure = fake.get_failures.pop(0) if fake.get_failures else None
                if failure is not None:
                    self._send(failure[0], {"error": {"message": failure[1]}}, {})
                elif not self.path.endswith("/models"):
                    self._send(404, {"error": {"message": "not found"}}, {})
                else:
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]},
                               {})

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    failure = fake.failures.pop(0) if fake.failures else None
                    too_many = len(fake.requests) > fake.max_requests
                if too_many:
                    failure = (400, "too many requests in one test", {})
                if failure is not None:
                    status, text, headers = failure
                    # Echo the Authorization header back, as a careless proxy might: it must never reach our errors.
                    self._send(status, {"error": {"message": text, "auth": self.headers.get("Authorization")}},
                               headers)
                    return
                prompt = body["messages"][-1]["content"]
                n = fake.n_choices or body["n"]
                choices = [{"index": i, "message": {"role": "assistant", "content": content_for(prompt, i)},
                            "finish_reason": "stop"} for i in range(n)]
                self._send(200, {"id": "x", "object": "chat.completion", "choices": choices}, {})

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalOpenAI]:
    fake = LocalOpenAI()
    fake.thread.start()
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", fake.base_url)
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_API_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def all_text_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_openai_request_is_upstreams_and_key_stays_secret(server: LocalOpenAI, tmp_path: Path) -> None:
    judge = load_judge("openai:gpt-4o-mini", retry=FAST_RETRY)
    items = [open_item(0), qa_item(1)]
    responses = ["Because of Rayleigh scattering.", "Paris."]
    outputs = judge_records(items, responses, judge, tmp_path)

    prompts = [judge_prompt(it, r) for it, r in zip(items, responses)]
    assert outputs == [[content_for(p, i).strip() for i in range(3)] for p in prompts]
    assert len(server.requests) == 2
    for request in server.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions"
        headers = {k.lower(): v for k, v in request["headers"].items()}  # HTTP header names are case-free
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert body["model"] == "gpt-4o-mini"
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (3, 0.5, 0.95, 1024)
        assert (body["frequency_penalty"], body["presence_penalty"], body["stop"]) == (0, 0, None)
        assert body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
        assert body["messages"][1]["role"] == "user"
    assert sorted(r["body"]["messages"][1]["content"] for r in server.requests) == sorted(prompts)

    cache_text = all_text_under(tmp_path)
    assert prompts[0] in json.loads(cache_path(tmp_path, judge.identity, prompts[0]).read_text())["prompt"]
    assert SECRET not in cache_text and SECRET not in json.dumps(describe_judge(judge))
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files
    described = describe_judge(judge)
    assert described["backend"] == "openai" and described["endpoint"] == server.base_url
    assert described["base_url"] == "http://127.0.0.1/v1"  # the cache key's: no port
    assert described["n"] == 3 and described["prompts"]["open"] == hashlib.sha256(OPEN_PROMPT.encode()).hexdigest()


def test_cache_hit_makes_no_request(server: LocalOpenAI, tmp_path: Path) -> None:
    items = [open_item(0), open_item(1), open_item(2, "Name a colour.")]
    responses = ["Same answer.", "Same answer.", "Blue."]  # items 0 and 1 give the same prompt: judged once
    first = judge_records(items, responses, load_judge("openai:gpt-4o-mini", retry=FAST_RETRY), tmp_path)
    assert len(server.requests) == 2 and first[0] == first[1]
    again = judge_records(items, responses, load_judge("openai:gpt-4o-mini", retry=FAST_RETRY), tmp_path)
    assert again == first and len(server.requests) == 2
    # Another model (or other settings) is another cache entry.
    judge_records(items[:1], responses[:1], load_judge("openai:gpt-4o", retry=FAST_RETRY), tmp_path)
    judge_records(items[:1], responses[:1], load_judge("openai:gpt-4o-mini", retry=FAST_RETRY,
                                                       settings=JudgeSettings(temperature=0.0)), tmp_path)
    assert len(server.requests) == 4


def test_default_cache_dir_is_under_the_speechlm_eval_cache(server: LocalOpenAI, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.setenv("SPEECHLM_EVAL_CACHE", str(tmp_path))
    judge = load_judge("openai:m", retry=FAST_RETRY)
    judge_records([open_item(0)], ["A."], judge)
    assert cache_path(tmp_path / "judge", judge.identity, judge_prompt(open_item(0), "A.")).is_file()


def test_unreadable_cache_entry_is_a_miss(server: LocalOpenAI, tmp_path: Path) -> None:
    judge = load_judge("openai:gpt-4o-mini", retry=FAST_RETRY)
    first = judge_records([open_item(0)], ["A."], judge, tmp_path)
    path = cache_path(tmp_path, judge.identity, judge_prompt(open_item(0), "A."))
    path.write_text("{ torn")
    assert judge_records([open_item(0)], ["A."], judge, tmp_path) == first
    assert len(server.requests) == 2 and json.loads(path.read_text())["outputs"] == first[0]


def test_retries_then_succeeds(server: LocalOpenAI, tmp_path: Path) -> None:
    server.failures = [(500, "overloaded", {}), (429, "slow down", {"Retry-After": "0"})]
    outputs = judge_records([open_item(0)], ["A."], load_judge("openai:m", retry=FAST_RETRY), tmp_path)
    assert len(server.requests) == 3
    assert outputs == [[content_for(judge_prompt(open_item(0), "A."), i).strip() for i in range(3)]]


def test_retries_are_bounded_and_the_error_hides_the_key(server: LocalOpenAI, tmp_path: Path) -> None:
    server.failures = [(503, "down", {})] * 10
    with pytest.raises(JudgeError, match="after 3 attempts") as raised:
        judge_records([open_item(0)], ["A."], load_judge("openai:m", retry=FAST_RETRY), tmp_path)
    assert len(server.requests) == 3
    assert SECRET not in str(raised.value) and "Bearer ***" in str(raised.value)
    assert not list(tmp_path.rglob("*.json"))  # nothing cached for a failed call


def test_judging_reports_its_progress(server: LocalOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("SPEECHLM_EVAL_PROGRESS_INTERVAL", "0.01")
    caplog.set_level(logging.INFO, logger="speechlm_eval.progress")
    items = [open_item(i, f"Question {i}?") for i in range(3)]
    judge_records(items, ["A.", "B.", "C."], load_judge("openai:m", retry=FAST_RETRY), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "speechlm_eval.progress"]
    assert lines[0].startswith("judge openai:m: 0/3 items") and lines[-1].startswith("judge openai:m: 3/3 items")
    assert lines[-1].endswith("[done]")


def test_client_errors_are_not_retried(server: LocalOpenAI, tmp_path: Path) -> None:
    server.failures = [(401, "bad key", {})]
    with pytest.raises(JudgeError, match="HTTP 401") as raised:
        judge_records([open_item(0)], ["A."], load_judge("openai:m", retry=FAST_RETRY), tmp_path)
    assert len(server.requests) == 1 and SECRET not in str(raised.value)


def test_endpoint_ignoring_n_falls_back_to_single_calls(server: LocalOpenAI, tmp_path: Path) -> None:
    """An endpoint that answers one choice for n=3 (many local servers): the choice is kept and the other two come
    from n=1 calls with the same settings; once seen, later prompts go to single calls directly. The outputs are
    cached under the same key as an n-honouring endpoint's, and the usage says what happened."""
    server.n_choices = 1
    judge = load_judge("openai:m", retry=FAST_RETRY, workers=1)  # one at a time: the request order is known
    items = [open_item(0), open_item(1, "Name a colour.")]
    outputs = judge_records(items, ["A.", "B."], judge, tmp_path)
    assert [len(o) for o in outputs] == [3, 3]
    assert [r["body"]["n"] for r in server.requests] == [3, 1, 1, 1, 1, 1]
    first = server.requests[0]["body"]
    assert all({**r["body"], "n": 3} == first for r in server.requests[1:3])  # same settings, same prompt
    usage = judge.usage()
    assert usage["n_fallback"] and (usage["calls"], usage["attempts"], usage["failed"]) == (6, 6, 0)
    assert cache_path(tmp_path, judge.identity, judge_prompt(items[0], "A.")).is_file()
    server.n_choices = 5
    with pytest.raises(JudgeError, match="n=3"):
        judge_records([open_item(2, "More?")], ["C."], load_judge("openai:m", retry=FAST_RETRY), tmp_path)


def test_judge_run_logs_usage_and_cost_of_the_calls_it_made(server: LocalOpenAI, tmp_path: Path) -> None:
    from speechlm_eval.endpoint import Price
    from speechlm_eval.judge.run import judge_run
    from speechlm_eval.rundir import ItemRow, Manifest, RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_manifest(Manifest(request={}))
    run.write_items([ItemRow.from_item(open_item(i, f"Question {i}?"), scorer="open") for i in range(2)])
    run.records_dir.mkdir()
    run.records_path("speech_llm_text").write_text("".join(
        json.dumps({"id": f"commoneval/test/{i}", "response": f"A{i}.", "error": None}) + "\n" for i in range(2)))
    description = judge_run(run.path, "openai:m", cache_dir=tmp_path / "cache", prices={"m": Price(1.0, 2.0)})
    assert description["backend"] == "openai" and len(server.requests) == 2
    (line,) = run.usage_rows()
    assert (line["role"], line["model"], line["calls"], line["attempts"]) == ("judge", "m", 2, 2)
    assert line["unreported"] == 2 and line["cost_usd"] == 0.0  # this server reports no tokens
    judge_run(run.path, "openai:m", cache_dir=tmp_path / "cache")  # all cached: no call, no usage line
    assert len(server.requests) == 2 and len(run.usage_rows()) == 1
    assert len((run.judgements_dir / "speech_llm_text.jsonl").read_text().splitlines()) == 2


def test_concurrent_requests_keep_item_order(server: LocalOpenAI, tmp_path: Path) -> None:
    items = [open_item(i, f"Question number {i}?") for i in range(7)]
    responses = [f"Answer {i}." for i in range(7)]
    outputs = judge_records(items, responses, load_judge("openai:m", retry=FAST_RETRY, workers=4), tmp_path)
    assert outputs == [[content_for(judge_prompt(it, r), i).strip() for i in range(3)]
                       for it, r in zip(items, responses)]
    assert len(server.requests) == 7


def test_judge_specs_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_judge("none") is None
    assert describe_judge(None)["backend"] == "none" and "not judged" in describe_judge(None)["note"]
    for bad in ("gpt-4o-mini", "openai:", "hf:", "anthropic:claude"):
        with pytest.raises(JudgeError, match="unknown judge"):
            load_judge(bad)
    for name in ("SPEECHLM_EVAL_JUDGE_API_KEY", "OPENAI_API_KEY", "SPEECHLM_EVAL_JUDGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        load_judge("openai:gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert load_judge("openai:gpt-4o-mini").identity["base_url"] == "https://api.openai.com/v1"
    # A local endpoint may need no key; credentials in its URL never reach the identity (cache key, manifest).
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", "http://user:pw@localhost:8000/v1/?token=t")
    assert load_judge("openai:local").identity["base_url"] == "http://localhost/v1"


def test_the_cache_key_does_not_include_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same server moved to another port (a restarted vLLM) answers from the same cache entries."""
    keys = []
    for port in (8000, 8001):
        monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", f"http://localhost:{port}/v1")
        keys.append(cache_key(load_judge("openai:local").identity, "prompt"))
    assert keys[0] == keys[1]
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", "http://otherhost:8000/v1")
    assert cache_key(load_judge("openai:local").identity, "prompt") != keys[0]


# --------------------------------------------------------------------------------------------------------------------
# The endpoint check before any model loads


def test_validate_judge_passes_a_working_endpoint_with_one_get(server: LocalOpenAI) -> None:
    validate_judge("openai:m")
    assert [r.get("method") for r in server.requests] == ["GET"] and server.requests[0]["path"] == "/v1/models"


@pytest.mark.parametrize("status, message", [(401, "rejected the API key (HTTP 401"),
                                             (403, "rejected the API key (HTTP 403"),
                                             (500, "answered with an error (HTTP 500")])
def test_validate_judge_fails_at_once_on_a_refusing_endpoint(server: LocalOpenAI, status: int, message: str) -> None:
    server.get_failures = [(status, "nope")]
    with pytest.raises(JudgeError, match=re.escape(message)) as raised:
        validate_judge("openai:m")
    assert SECRET not in str(raised.value) and len(server.requests) == 1


def test_validate_judge_names_an_unserved_model_and_a_dead_host(server: LocalOpenAI,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JudgeError, match=r"does not serve model 'gpt-4o-mnii' \(it serves: m\)"):
        validate_judge("openai:gpt-4o-mnii")
    server.get_failures = [(404, "no /models here")]  # an endpoint without /models is reachable: passes
    validate_judge("openai:unlisted")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("SPEECHLM_EVAL_JUDGE_BASE_URL", f"http://127.0.0.1:{dead}/v1")
    with pytest.raises(JudgeError, match="cannot reach the judge endpoint http://127.0.0.1"):
        validate_judge("openai:m")


# --------------------------------------------------------------------------------------------------------------------
# The hf backend on a tiny local model


@pytest.fixture(scope="module")
def judge_model_dir(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("judge_model") / "text_llm"
    shutil.copytree(tiny_pair[1], copy)
    return copy


TINY_SETTINGS = JudgeSettings(max_tokens=6)


def test_hf_judge_end_to_end(judge_model_dir: Path, tmp_path: Path) -> None:
    spec = f"hf:{judge_model_dir}"
    items = [open_item(0), qa_item(1)]
    responses = ["Because of scattering.", "Paris."]
    judge = load_judge(spec, settings=TINY_SETTINGS, seed=7, device="cpu")
    outputs = judge_records(items, responses, judge, tmp_path / "a")
    assert [len(o) for o in outputs] == [3, 3] and all(isinstance(s, str) for o in outputs for s in o)
    assert judge.identity["seed"] == 7 and judge.identity["model"]["fingerprint"]
    assert describe_judge(judge)["path"] == str(judge_model_dir)

    # Each prompt's n samples are one sampled generate call of the model on (system, prompt), seeded from the prompt
    # alone: so they do not depend on the other prompts judged, their order or batching.
    model = load_model(str(judge_model_dir), LoadOptions(device="cpu"))
    prompt = judge_prompt(items[1], responses[1])
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.5, top_p=0.95,
                              seed=prompt_seed(7, prompt))
    assert [g.text.strip() for g in model.generate([Prompt(text=prompt, system=JUDGE_SYSTEM)] * 3, config)] == (
        outputs[1])
    assert prompt_seed(7, "a") != prompt_seed(8, "a") and prompt_seed(7, "a") != prompt_seed(7, "b")
    assert load_judge(spec, settings=TINY_SETTINGS, seed=8).identity != judge.identity

    # A re-run is served from the cache without loading the model: move the weights away and judge again.
    rerun = load_judge(spec, settings=TINY_SETTINGS, seed=7, device="cpu")
    weights = judge_model_dir / "model.safetensors"
    weights.rename(tmp_path / "weights.bak")
    try:
        assert judge_records(items, responses, rerun, tmp_path / "a") == outputs
        with pytest.raises(OSError, match="model.safetensors"):  # a cache miss does need the model
            judge_records([open_item(5)], ["Something new."], rerun, tmp_path / "a")
    finally:
        (tmp_path / "weights.bak").rename(weights)

    # The scorer plumbing on these (garbage) outputs: parsed exactly when every output parses.
    rows = judgement_rows(items[:1], responses[:1], outputs[:1], judge)
    view = attach_judgements(items[0], rows)
    scored = get_scorer("open").score(view, responses[0], random.Random(0))
    assert scored.parsed == all(parse_rating(o) is not None for o in outputs[0])


# --------------------------------------------------------------------------------------------------------------------
# Wiring: judgement rows, attaching them to item views, looking them up


def test_rows_attach_and_lookup(server: LocalOpenAI, tmp_path: Path) -> None:
    judge = load_judge("openai:m", retry=FAST_RETRY)
    items = [open_item(0), open_item(1), open_item(2)]
    records = {"commoneval/test/0": {"id": "commoneval/test/0", "response": "A.", "error": None},
               "commoneval/test/1": {"id": "commoneval/test/1", "response": None, "error": "OOM"}}
    rows = judge_arm_rows(items, records, judge, tmp_path)
    assert [r["id"] for r in rows] == ["commoneval/test/0"]  # errored and missing records are not judged
    assert rows[0]["response_sha256"] == response_key("A.") and len(rows[0]["outputs"]) == 3
    json.dumps(rows)  # JSON-safe

    view = attach_judgements(items[0], rows)
    assert judge_outputs_for(view, "A.") == rows[0]["outputs"]
    with pytest.raises(MissingJudgement, match="commoneval/test/0"):
        judge_outputs_for(view, "A different response.")  # a stale judgement does not match
    with pytest.raises(MissingJudgement):
        judge_outputs_for(items[0], "A.")  # nothing attached
    # A second arm's rows add to the same view; the view keeps the item's fields.
    other = {"id": "commoneval/test/0", "response_sha256": response_key("B."), "outputs": ["1", "2", "3"]}
    both = attach_judgements(view, [other])
    assert judge_outputs_for(both, "B.") == ["1", "2", "3"] and judge_outputs_for(both, "A.") == rows[0]["outputs"]
    assert (both.id, both.text, both.reference) == (items[0].id, items[0].text, None)
    with pytest.raises(ValueError, match="attached to item"):
        attach_judgements(items[1], rows)


def test_scoring_modules_do_not_import_torch() -> None:
    code = ("import sys; import speechlm_eval.judge.run, speechlm_eval.scoring.open_ended, "
            "speechlm_eval.scoring.qa; sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(initial_delay_s=2.0, multiplier=2.0, max_delay_s=10.0)
    assert [policy.delay(k) for k in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert judge_module.RetryPolicy().max_attempts >= 2

