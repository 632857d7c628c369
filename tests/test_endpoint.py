"""The shared OpenAI-compatible client: retry policy, URLs, prices, and usage counted against a real local server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from speechlm_eval.endpoint import (
    ChatEndpoint,
    EndpointUnavailable,
    Price,
    RetryPolicy,
    api_base_url,
    parse_price,
    parse_prices,
    parse_retry_after,
    public_url,
    run_sync,
)


def test_retry_after_and_backoff():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None
    policy = RetryPolicy(initial_delay_s=1.0, max_delay_s=4.0)
    assert policy.backoff(1, 2.5) == 2.5 and policy.backoff(1, 10_000.0) == 120.0
    assert all(0.0 <= policy.backoff(n, None) <= policy.delay(n) <= 4.0 for n in range(1, 12))
    assert [policy.delay(k) for k in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_urls_keep_no_credentials():
    assert public_url("https://user:key@h.example:8443/v1/?api-key=k#f") == "https://h.example:8443/v1"
    assert public_url("http://[::1]:8000/v1/?q=1") == "http://[::1]:8000/v1"
    assert api_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base_url("https://h/api/v1/") == "https://h/api/v1"
    with pytest.raises(ValueError, match="http"):
        api_base_url("127.0.0.1:8000")


def test_prices():
    assert parse_price("2.50/10") == Price(2.5, 10.0)
    assert parse_prices(["gpt-4o-mini=0.15/0.60", "org/m=v1=1/2"]) == {"gpt-4o-mini": Price(0.15, 0.6),
                                                                        "org/m=v1": Price(1.0, 2.0)}
    assert Price(2.0, 8.0).cost(1_000_000, 500_000) == pytest.approx(6.0)
    for bad in ("2.5", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="per million"):
            parse_price(bad)
    with pytest.raises(ValueError, match="MODEL="):
        parse_prices(["0.1/0.2"])


class Scripted:
    """A chat-completions endpoint on 127.0.0.1 answering a script of (status, JSON body) and then successes."""

    def __init__(self, script: list[tuple[int, Any]]) -> None:
        self.script = list(script)
        self.bodies: list[dict[str, Any]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                scripted.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, payload = scripted.script.pop(0) if scripted.script else (200, success())
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def success(prompt_tokens: int = 11, completion_tokens: int = 3) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def call(endpoint: ChatEndpoint, n: int = 1) -> list[Any]:
    async def calls() -> list[Any]:
        async with endpoint.client() as client:
            return [await endpoint.create(client, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                    for _ in range(n)]

    return run_sync(calls())


def test_usage_counts_answers_retries_and_failures(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    fast = RetryPolicy(max_attempts=3, initial_delay_s=0.01, max_delay_s=0.02, request_timeout_s=5.0)
    # An error object with status 200 (no choices) is asked again, as upstream VoiceBench does.
    with Scripted([(503, {"error": "busy"}), (200, {"error": {"message": "overloaded"}})]) as url:
        endpoint = ChatEndpoint(url, retry=fast)
        (response,) = call(endpoint)
        assert response.choices[0].message.content == "ok"
        call(endpoint, 2)
    assert endpoint.usage.to_dict(Price(1.0, 2.0)) == {
        "calls": 3, "attempts": 5, "retries": 2, "failed": 0, "prompt_tokens": 33, "completion_tokens": 9,
        "audio_prompt_tokens": 0, "unreported": 0, "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        "cost_usd": pytest.approx((33 * 1.0 + 9 * 2.0) / 1e6)}
    with Scripted([(500, {"error": "down"})] * 3) as url:
        endpoint = ChatEndpoint(url, retry=fast)
        with pytest.raises(EndpointUnavailable, match="failed 3 attempt") as caught:
            call(endpoint)
    assert caught.value.attempts == 3 and "HTTP 500" in caught.value.last_problem
    assert endpoint.usage.to_dict()["failed"] == 1 and endpoint.usage.to_dict()["cost_usd"] is None
