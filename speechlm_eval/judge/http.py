"""The OpenAI-compatible chat-completions judge backend (``--judge openai:MODEL``), over plain HTTP with bounded
retries; the API key comes from the environment and never reaches a file, a manifest or a message."""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from typing import Any

from speechlm_eval.judge.base import Judge, JudgeError, JudgeSettings, RetryPolicy

log = logging.getLogger(__name__)

BASE_URL_ENV = "SPEECHLM_EVAL_JUDGE_BASE_URL"
API_KEY_ENVS = ("SPEECHLM_EVAL_JUDGE_API_KEY", "OPENAI_API_KEY")  # first one set wins
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_HTTP_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def openai_judge(spec: str, model: str, settings: JudgeSettings, retry: RetryPolicy, workers: int) -> Judge:
    base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    key = _api_key()
    if key is None and urllib.parse.urlsplit(base_url).hostname == "api.openai.com":
        raise JudgeError(f"judge {spec!r} needs an API key: set {' or '.join(API_KEY_ENVS)}")
    url = base_url.rstrip("/") + "/chat/completions"
    # The port is left out of the cache key: the same server moved to another port answers the same.
    identity = {"backend": "openai", "model": model, "base_url": _public_url(base_url, port=False),
                **settings.to_dict()}

    def complete(prompt: str) -> list[str]:
        return _post_with_retries(url, key, _request_body(model, settings, prompt), settings.n, retry)

    return Judge(spec=spec, identity=identity, complete=complete, workers=max(1, workers),
                 details={"retry": asdict(retry), "endpoint": _public_url(base_url)})


def check_endpoint(model: str, timeout_s: float = 15.0) -> None:
    """One cheap call before any model loads: ``GET {base}/models`` with the key. A dead host, a refused key
    (401/403) or a failing server (5xx) raise :class:`JudgeError` at once; a listing that lacks ``model`` too. An
    endpoint without ``/models`` (404/405) is reachable, and passes."""
    base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    key = _api_key()
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            payload = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        if error.code in (404, 405):
            return
        body = error.read()[:300].decode("utf-8", "replace")
        what = "rejected the API key" if error.code in (401, 403) else "answered with an error"
        raise JudgeError(_scrub(f"judge endpoint {_public_url(base_url)} {what} (HTTP {error.code}: {body})",
                                key)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        raise JudgeError(f"cannot reach the judge endpoint {_public_url(base_url)} ({reason}); check "
                         f"${BASE_URL_ENV}") from None
    except ValueError:
        return  # not JSON: reachable, nothing to check the model against
    served = [m.get("id") for m in payload.get("data", []) if isinstance(m, dict)] if isinstance(payload, dict) else []
    if served and model not in served:
        shown = ", ".join(map(str, served[:10])) + (" ..." if len(served) > 10 else "")
        raise JudgeError(f"judge endpoint {_public_url(base_url)} does not serve model {model!r} (it serves: {shown})")


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _api_key() -> str | None:
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _public_url(url: str, *, port: bool = True) -> str:
    """The endpoint without credentials or query (a URL can carry ``user:pass@`` or ``?key=``), and without its port
    when ``port`` is False."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port and port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _request_body(model: str, settings: JudgeSettings, prompt: str) -> dict[str, Any]:
    """The chat-completions request ``api_judge.py`` makes (its ``stop=None`` goes out as null, as openai's does)."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": settings.system}, {"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "frequency_penalty": settings.frequency_penalty,
        "presence_penalty": settings.presence_penalty,
        "stop": None,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "n": settings.n,
    }


def _post_with_retries(url: str, key: str | None, body: dict[str, Any], n: int, retry: RetryPolicy) -> list[str]:
    data = json.dumps(body).encode("utf-8")
    last_error = ""
    for attempt in range(1, retry.max_attempts + 1):
        try:
            return _choices(_post_json(url, key, data, retry.request_timeout_s), n, key)
        except _Retryable as error:
            last_error = str(error)
            if attempt == retry.max_attempts:
                break
            wait = min(retry.max_delay_s, error.retry_after if error.retry_after is not None else retry.delay(attempt))
            log.warning("judge request failed (attempt %d/%d: %s); retrying in %.1f s",
                        attempt, retry.max_attempts, _scrub(last_error, key), wait)
            time.sleep(wait)
    raise JudgeError(_scrub(f"judge request to {url} failed after {retry.max_attempts} attempts; "
                            f"last error: {last_error}", key))


def _post_json(url: str, key: str | None, data: bytes, timeout: float) -> Any:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        message = f"HTTP {error.code}: {error.read()[:500].decode('utf-8', 'replace')}"
        if error.code in RETRYABLE_HTTP_STATUS:
            raise _Retryable(message, _retry_after(error.headers.get("Retry-After"))) from None
        raise JudgeError(_scrub(f"judge endpoint {url} refused the request ({message})", key)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:  # network, timeout, reset
        raise _Retryable(f"{type(error).__name__}: {error}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise _Retryable(f"response is not JSON: {raw[:200]!r}") from None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # the HTTP-date form: fall back to our own backoff
        return None


def _choices(payload: Any, n: int, key: str | None) -> list[str]:
    """The stripped text of each choice, in the order returned (upstream keeps that order)."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        # Upstream retries when the client returns nothing; an error object with status 200 lands here too.
        raise _Retryable(f"response has no choices: {json.dumps(payload)[:300]}")
    contents = [c.get("message", {}).get("content") if isinstance(c, dict) else None for c in choices]
    if not all(isinstance(c, str) for c in contents):
        raise JudgeError(_scrub(f"a judge choice has no text content: {json.dumps(payload)[:300]}", key))
    if len(contents) != n:
        raise JudgeError(f"asked the judge for n={n} completions and got {len(contents)}: the endpoint may not "
                         "support `n`")
    return [c.strip() for c in contents]


def _scrub(text: str, key: str | None) -> str:
    """``text`` with the API key masked, in case an endpoint echoes it back."""
    return text.replace(key, "***") if key else text
