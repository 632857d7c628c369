"""The OpenAI-compatible chat-completions judge backend (``--judge openai:MODEL``), over the shared endpoint client
(:mod:`speechlm_eval.endpoint`: the ``openai`` package, one retry/timeout policy, usage counted); the API key comes
from the environment and never reaches a file, a manifest or a message."""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict
from typing import Any

from speechlm_eval.endpoint import ChatEndpoint, EndpointError, EndpointUnavailable, Price, RetryPolicy, run_sync
from speechlm_eval.judge.base import Judge, JudgeError, JudgeSettings

log = logging.getLogger(__name__)

BASE_URL_ENV = "SPEECHLM_EVAL_JUDGE_BASE_URL"
API_KEY_ENVS = ("SPEECHLM_EVAL_JUDGE_API_KEY", "OPENAI_API_KEY")  # first one set wins
DEFAULT_BASE_URL = "https://api.openai.com/v1"


def openai_judge(spec: str, model: str, settings: JudgeSettings, retry: RetryPolicy, workers: int,
                 price: Price | None = None) -> Judge:
    base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    key = _api_key()
    if key is None and urllib.parse.urlsplit(base_url).hostname == "api.openai.com":
        raise JudgeError(f"judge {spec!r} needs an API key: set {' or '.join(API_KEY_ENVS)}")
    try:
        endpoint = ChatEndpoint(base_url, api_key=key, retry=retry)
    except ValueError as error:
        raise JudgeError(f"{BASE_URL_ENV}: {error}") from None
    # The port is left out of the cache key: the same server moved to another port answers the same.
    identity = {"backend": "openai", "model": model, "base_url": _public_url(base_url, port=False),
                **settings.to_dict()}
    fallback = NFallback()

    def complete(prompt: str) -> list[str]:
        return run_sync(_complete(endpoint, _request_body(model, settings, prompt), settings.n, fallback))

    def usage() -> dict[str, Any]:
        return {"model": model, "endpoint": endpoint.url, "n_fallback": fallback.active,
                **endpoint.usage.to_dict(price)}

    return Judge(spec=spec, identity=identity, complete=complete, workers=max(1, workers),
                 details={"retry": asdict(retry), "endpoint": _public_url(base_url)}, usage=usage)


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


class NFallback:
    """Whether this endpoint was seen to ignore ``n`` (then each prompt's ``n`` outputs come from single calls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = False

    def switch_on(self, url: str, asked: int, got: int) -> None:
        with self._lock:
            if not self.active:
                log.warning("%s answered %d choice(s) for n=%d: it ignores `n`; each missing output now comes from "
                            "a single call (same settings, n=1)", url, got, asked)
            self.active = True


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


def _scrub(text: str, key: str | None) -> str:
    """``text`` with the API key blanked, in case a server or proxy echoed it back."""
    return text.replace(key, "***") if key else text


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


async def _complete(endpoint: ChatEndpoint, body: dict[str, Any], n: int, fallback: NFallback) -> list[str]:
    """The ``n`` stripped outputs for one prompt, in the order returned (upstream keeps that order).

    An endpoint that answers fewer than ``n`` choices ignores ``n`` (many local servers do): the outputs it gave are
    kept and the rest come from calls with ``n=1`` and the same settings, so each output is still one sample at the
    judge's temperature. Once seen, later prompts go to single calls straight away.
    """
    async with endpoint.client() as client:
        contents: list[str] = []
        if not fallback.active:
            contents = _contents(await _create(endpoint, client, body), endpoint)
            if len(contents) > n:
                raise JudgeError(f"asked the judge for n={n} completions and got {len(contents)}")
            if len(contents) < n:
                fallback.switch_on(endpoint.url, n, len(contents))
        single = {**body, "n": 1}
        while len(contents) < n:
            contents += _contents(await _create(endpoint, client, single), endpoint)[:1]
    return [c.strip() for c in contents]


async def _create(endpoint: ChatEndpoint, client: Any, body: dict[str, Any]) -> Any:
    """One call through the shared client, its failures worded as judge errors (key blanked, no client chain)."""
    try:
        return await endpoint.create(client, body)
    except EndpointError as error:
        raise JudgeError(f"judge endpoint {error.url} refused the request (HTTP {error.status}: {error.detail})") \
            from None
    except EndpointUnavailable as error:
        raise JudgeError(f"judge request to {error.url} failed after {error.attempts} attempts; last error: "
                         f"{error.last_problem}") from None


def _contents(response: Any, endpoint: ChatEndpoint) -> list[str]:
    """The text of each choice; a choice without text is an error (a judge output must be text to be parsed)."""
    contents = [getattr(getattr(c, "message", None), "content", None) for c in response.choices]
    if not all(isinstance(c, str) for c in contents):
        raise JudgeError(endpoint.scrub(f"a judge choice has no text content: {str(response)[:300]}"))
    return contents
