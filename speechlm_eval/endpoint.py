"""The one client for OpenAI-compatible chat-completions endpoints: served models (``gap --base-url``) and the
``openai:`` judge both send their requests through :class:`ChatEndpoint`.

Why one module: the retry and timeout policy, what counts as "ask again" vs "refused for good", how a key is kept out
of every message, and how tokens are counted must be the same whoever calls a server. It sits on the lowest floor so
that ``models/`` and ``judge/`` may both import it; it imports nothing of the package and only needs the ``openai``
client once a request is sent (so reports and scoring never need it).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # the client library is only needed once a request is sent
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

# Status codes worth asking again: the server was busy, restarting or briefly broken. 501/505 are permanent.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Without a key, local servers (vllm/sglang/transformers serve) accept any bearer token; vLLM documents "EMPTY".
PLACEHOLDER_KEY = "EMPTY"
DETAIL_LIMIT = 500  # characters of a server's error body kept in a message


class EndpointError(ValueError):
    """The endpoint refused a request for good (400/401/403/404/422 ...): asking again cannot help.

    Attributes: ``status`` (the HTTP code), ``detail`` (the server's body, key blanked), ``url`` (public).
    """

    def __init__(self, message: str, *, status: int, detail: str, url: str) -> None:
        super().__init__(message)
        self.status, self.detail, self.url = status, detail, url


class EndpointUnavailable(RuntimeError):
    """The endpoint kept failing (429/5xx/timeouts/dropped connections) until the attempts ran out.

    Attributes: ``attempts`` (requests sent), ``last_problem`` (what the last one met, key blanked), ``url``.
    """

    def __init__(self, message: str, *, attempts: int, last_problem: str, url: str) -> None:
        super().__init__(message)
        self.attempts, self.last_problem, self.url = attempts, last_problem, url


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for one answer and how to ask again: exponential backoff with full jitter, honouring the
    server's ``Retry-After``.

    Attributes:
        max_attempts: requests per call in all (1 = no retry).
        initial_delay_s, multiplier, max_delay_s: after failed attempt ``k`` the wait is drawn uniformly from
            ``[0, min(max_delay_s, initial_delay_s * multiplier**(k-1))]`` (full jitter: concurrent calls that failed
            together must not come back together).
        request_timeout_s: how long one request may take before it counts as failed (and is retried).
        max_retry_after_s: cap on a server's ``Retry-After``; beyond it waiting would stall a whole batch.
    """

    max_attempts: int = 6
    initial_delay_s: float = 0.5
    multiplier: float = 2.0
    max_delay_s: float = 30.0
    request_timeout_s: float = 300.0
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")

    def delay(self, failed_attempts: int) -> float:
        """The longest backoff after ``failed_attempts`` failures (the jitter draws below it)."""
        return min(self.max_delay_s, self.initial_delay_s * self.multiplier ** (failed_attempts - 1))

    def backoff(self, failed_attempts: int, retry_after: float | None) -> float:
        """Seconds to wait before the next attempt: the server's ``Retry-After`` when it sent one, else jittered."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        return random.uniform(0.0, self.delay(failed_attempts))


# ----- URLs and headers -----

def public_url(url: str) -> str:
    """``url`` without user-info, query or fragment: the form that may appear in manifests, caches and messages.

    A credential can ride in ``https://user:key@host/`` or ``?api-key=...``; neither must reach a file or a log.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def api_base_url(url: str) -> str:
    """The base URL the client appends ``/chat/completions`` to: a bare ``http://host:port`` gets ``/v1``.

    Any other path is kept, because providers mount the API under their own prefixes (``/api/v1``, ``/openai/v1``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {public_url(url)!r}")
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path or "/v1", parts.query, ""))


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` when absent or unreadable."""
    if not headers:
        return None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# ----- usage and cost -----

@dataclass(frozen=True)
class Price:
    """USD per million prompt (input) and completion (output) tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6

    def to_dict(self) -> dict[str, float]:
        return {"input_per_mtok": self.input_per_mtok, "output_per_mtok": self.output_per_mtok}


def parse_price(text: str) -> Price:
    """``"2.50/10"`` -> ``Price(2.5, 10.0)`` (USD per million prompt / completion tokens)."""
    left, sep, right = text.partition("/")
    try:
        price = Price(float(left), float(right))
    except ValueError:
        price = None
    if not sep or price is None or price.input_per_mtok < 0 or price.output_per_mtok < 0:
        raise ValueError(f"a price is INPUT/OUTPUT in USD per million tokens, e.g. 2.50/10.00; got {text!r}")
    return price


def parse_prices(specs: list[str] | tuple[str, ...]) -> dict[str, Price]:
    """``["MODEL=IN/OUT", ...]`` -> ``{model: Price}`` (the model name exactly as requests send it)."""
    out: dict[str, Price] = {}
    for spec in specs:
        model, sep, price = spec.rpartition("=")
        if not sep or not model:
            raise ValueError(f"--price takes MODEL=INPUT/OUTPUT (USD per million tokens), got {spec!r}")
        out[model] = parse_price(price)
    return out


@dataclass
class Usage:
    """What one endpoint was asked and answered in this process: requests, retries, failures, tokens.

    Thread-safe (judge workers share one). Tokens are the server's own ``usage`` counts; a server that reports none
    adds nothing, and ``unreported`` says how many answers came without them.
    """

    calls: int = 0  # answered calls (one per answer asked for, whatever its retries)
    attempts: int = 0  # HTTP requests sent, retries included
    failed: int = 0  # calls that ended in EndpointError / EndpointUnavailable
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_prompt_tokens: int = 0  # part of prompt_tokens, where the server says (providers price audio apart)
    unreported: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def add_failure(self) -> None:
        with self._lock:
            self.failed += 1

    def add_answer(self, usage: Any) -> None:
        """Count one answered call with the response's ``usage`` object (``None`` = not reported)."""
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        details = getattr(usage, "prompt_tokens_details", None)
        audio = int(getattr(details, "audio_tokens", 0) or 0)
        with self._lock:
            self.calls += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.audio_prompt_tokens += audio
            self.unreported += usage is None

    @property
    def retries(self) -> int:
        return max(0, self.attempts - self.calls - self.failed)

    def to_dict(self, price: Price | None = None) -> dict[str, Any]:
        """JSON-safe counts, with ``cost_usd`` when a price is given (else ``None``)."""
        with self._lock:
            out = {"calls": self.calls, "attempts": self.attempts, "retries": self.retries, "failed": self.failed,
                   "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                   "audio_prompt_tokens": self.audio_prompt_tokens, "unreported": self.unreported}
        out["price"] = price.to_dict() if price is not None else None
        out["cost_usd"] = price.cost(out["prompt_tokens"], out["completion_tokens"]) if price is not None else None
        return out


# ----- the client -----

def run_sync(coroutine: Any) -> Any:
    """Run ``coroutine`` to completion from synchronous code, even when this thread already runs an event loop.

    ``asyncio.run`` refuses to nest (notebooks, async callers), so such a caller gets a short-lived worker thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = error

    worker = threading.Thread(target=target, name="endpoint-run-sync")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ChatEndpoint:
    """One OpenAI-compatible ``/chat/completions`` endpoint: where it is, its key, its retry policy, its usage.

    The key is held only in memory: never in :meth:`describe`, ``repr`` or a message (see :meth:`scrub`).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, retry: RetryPolicy | None = None) -> None:
        self.base_url = api_base_url(base_url)
        self.public_base_url = public_url(self.base_url)
        self.url = self.public_base_url + "/chat/completions"
        self.retry = retry if retry is not None else RetryPolicy()
        self.usage = Usage()
        self.__api_key = api_key or None

    def __repr__(self) -> str:
        return f"ChatEndpoint({self.url!r})"

    @property
    def has_key(self) -> bool:
        return self.__api_key is not None

    def client(self) -> AsyncOpenAI:
        """A fresh async client (use as ``async with``); its own retries are off, ours apply."""
        try:
            from openai import AsyncOpenAI
        except ImportError as error:
            raise ImportError("an OpenAI-compatible endpoint needs the openai client: "
                              "pip install 'speechlm-eval[served]'") from error
        # max_retries=0: the attempt count, Retry-After cap and error text are this module's, the same for every
        # caller and server.
        return AsyncOpenAI(api_key=self.__api_key or PLACEHOLDER_KEY, base_url=self.base_url,
                           timeout=self.retry.request_timeout_s, max_retries=0)

    async def create(self, client: AsyncOpenAI, body: Mapping[str, Any],
                     extra_body: Mapping[str, Any] | None = None) -> Any:
        """One chat completion (``body`` = the request's JSON fields, ``model`` included), retried by the policy.

        Returns the parsed response, which has at least one choice. Raises :class:`EndpointError` at once on a
        refusal and :class:`EndpointUnavailable` when the attempts ran out; neither carries the key or the client's
        exception chain (whose request headers hold it).
        """
        import openai

        model = body.get("model")
        last_problem = "no attempt made"
        for attempt in range(1, self.retry.max_attempts + 1):
            retry_after: float | None = None
            self.usage.add_attempt()
            try:
                response = await client.chat.completions.create(**body, extra_body=dict(extra_body or {}) or None)
            except openai.APIStatusError as error:
                detail = self.scrub(_body_text(error))
                if error.status_code not in RETRYABLE_STATUS:
                    self.usage.add_failure()
                    raise EndpointError(f"{self.url} answered HTTP {error.status_code} for model {model!r}: {detail}",
                                        status=error.status_code, detail=detail, url=self.url) from None
                last_problem = f"HTTP {error.status_code}: {detail}"
                retry_after = parse_retry_after(error.response.headers)
            except openai.APITimeoutError:
                last_problem = f"no answer within {self.retry.request_timeout_s:g} s"
            except openai.APIConnectionError as error:
                cause = error.__cause__ or error
                last_problem = self.scrub(f"connection failed ({type(cause).__name__}: {cause})")
            else:
                problem = _unusable(response)
                if problem is None:
                    self.usage.add_answer(getattr(response, "usage", None))
                    return response
                # An error object with status 200, or a body that is not JSON: upstream VoiceBench asks again.
                last_problem = self.scrub(problem)
            if attempt < self.retry.max_attempts:
                wait = self.retry.backoff(attempt, retry_after)
                log.warning("%s: attempt %d/%d failed (%s); retrying in %.1f s", self.url, attempt,
                            self.retry.max_attempts, last_problem, wait)
                await asyncio.sleep(wait)
        self.usage.add_failure()
        raise EndpointUnavailable(f"{self.url} failed {self.retry.max_attempts} attempt(s) for model {model!r}; "
                                  f"last: {last_problem}", attempts=self.retry.max_attempts,
                                  last_problem=last_problem, url=self.url) from None

    def scrub(self, text: str) -> str:
        """``text`` with the API key blanked, in case a server or proxy echoed it back."""
        if self.__api_key and self.__api_key != PLACEHOLDER_KEY:
            text = text.replace(self.__api_key, "***")
        return text


def _unusable(response: Any) -> str | None:
    """Why a 200 answer cannot be used (``None`` when it can): not JSON, or no choices."""
    if isinstance(response, (str, bytes)):
        return f"response is not JSON: {str(response)[:200]!r}"
    if not (getattr(response, "choices", None) or []):
        return f"response has no choices: {str(response)[:300]}"
    return None


def _body_text(error: Any, limit: int = DETAIL_LIMIT) -> str:
    """The server's error body as it sent it (OpenAI ``{"error": ...}``, FastAPI ``{"detail": ...}``, plain text)."""
    response = getattr(error, "response", None)
    try:
        text = response.text if response is not None else ""
    except Exception:  # noqa: BLE001 - a streamed or undecodable body: fall back to the client's message
        text = ""
    text = text or str(getattr(error, "message", "") or "no detail")
    return text if len(text) <= limit else text[:limit] + "..."
