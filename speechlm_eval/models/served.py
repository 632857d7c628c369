"""A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint, as a
:class:`~speechlm_eval.models.base.SpeechLM`.

``vllm serve``, SGLang and ``transformers serve`` all expose this API, so one adapter evaluates a model served by any of
them (or by a hosted provider) without loading weights in this process. Each prompt becomes one chat completion; a
batch is sent concurrently and answered in input order, which is all the runner needs.

What a chat endpoint cannot give: the log-probabilities or logits of a *given* continuation (teacher forcing). Those
methods raise :class:`NotServable`, so diagnostics that need them must be skipped for a served model.

The request mirrors the in-process Qwen2-Audio adapter (:func:`speechlm_eval.models.qwen2_audio.conversation`): an
optional system message, then one user turn whose content is the audio part first and the text part after it.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import io
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import Generation, GenerationConfig, ModelInputError, Prompt

if TYPE_CHECKING:  # the client library is only needed once a request is sent
    from openai import AsyncOpenAI

FAMILY = "served"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_ATTEMPTS = 6
# Retry-After beyond this is treated as "come back much later": waiting longer would stall the whole batch.
MAX_RETRY_AFTER_S = 120.0
# Status codes worth asking again: the server was busy, restarting or briefly broken. 501/505 are permanent.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Without a key, local servers (vllm/sglang/transformers serve) accept any bearer token; vLLM documents "EMPTY".
PLACEHOLDER_KEY = "EMPTY"
# Answers kept from failed batches; the runner collects them right away, so this only bounds a caller that does not.
MAX_RECOVERED = 4096
AUDIO_TOKENS_PER_SECOND = 25  # Whisper-style encoders after pooling (Qwen2-Audio): only used to sort batches


class NotServable(NotImplementedError):
    """An operation an OpenAI-compatible chat endpoint cannot perform (teacher-forced log-probs / logits)."""


class EndpointError(ModelInputError):
    """The endpoint refused a request for good (400/401/403/404/422 ...): asking again cannot help."""


class EndpointUnavailable(RuntimeError):
    """The endpoint kept failing (429/5xx/timeouts/dropped connections) for one prompt until attempts ran out."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring the server's ``Retry-After``.

    Attributes:
        max_attempts: requests per prompt in all (1 = no retry).
        base_delay_s: the first backoff; attempt ``n`` waits up to ``base_delay_s * 2**(n-1)``.
        max_delay_s: cap on one backoff.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        # Full jitter: concurrent prompts that failed together must not come back together.
        return random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


def public_url(url: str) -> str:
    """``url`` without user-info, query or fragment: the form that may appear in manifests and messages.

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


def encode_wav(audio: np.ndarray, subtype: str = "FLOAT") -> str:
    """Base64 of a 16 kHz mono WAV of ``audio`` (float32 samples, shape ``(n_samples,)``).

    ``FLOAT`` (IEEE float32) keeps the samples bit-exact, so the server's model hears what the in-process adapter
    hears; ``PCM_16`` halves the upload for providers that only take integer PCM.
    """
    import soundfile as sf

    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1:
        raise ModelInputError(f"audio must be mono samples of shape (n_samples,), got shape {samples.shape}")
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLING_RATE, format="WAV", subtype=subtype)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


def _prompt_key(prompt: Prompt, config: GenerationConfig) -> str:
    """A content digest of one request, so an answer already received is never asked for twice."""
    digest = hashlib.sha256()
    digest.update(repr((prompt.text, prompt.system, sorted(config.to_dict().items()))).encode())
    if prompt.audio is not None:
        digest.update(np.ascontiguousarray(prompt.audio, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _run_sync(coroutine: Any) -> Any:
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

    worker = threading.Thread(target=target, name="served-model-generate")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ServedModel:
    """A model answering through an OpenAI-compatible chat-completions endpoint.

    Attributes:
        name: the model name sent in every request (what the server was started with / lists in ``/v1/models``).
        base_url: the API base (ends in ``/v1`` for vLLM, SGLang and ``transformers serve``).
        accepts_audio: whether prompts may carry audio (sent as ``input_audio`` parts).
        max_audio_seconds: longest clip sent; longer ones fail client-side with :class:`ModelInputError`, because
            servers tend to truncate them to the encoder window silently (``None`` = no check).
        concurrency: requests in flight at once within one :meth:`generate` call.
        extra_body: extra JSON fields sent with every request (server-specific knobs such as vLLM's ``top_k``;
            ``transformers serve`` answers 422 to fields it does not know).
        retry: the backoff schedule; when given it replaces ``max_attempts``.
    """

    family = FAMILY

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        accepts_audio: bool = True,
        max_audio_seconds: float | None = None,
        audio_subtype: str = "FLOAT",
        extra_body: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.name = name
        self.base_url = api_base_url(base_url)
        self.endpoint = public_url(self.base_url) + "/chat/completions"
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.accepts_audio = accepts_audio
        self.max_audio_seconds = max_audio_seconds
        self.audio_subtype = audio_subtype
        self.extra_body = dict(extra_body or {})
        self.retry = retry if retry is not None else RetryPolicy(max_attempts=max_attempts)
        # Read once, kept only in memory: never in describe(), repr() or a message (see _scrub).
        self.__api_key = os.environ.get(api_key_env) or None
        # Answers that arrived in a batch that failed elsewhere: the runner re-asks that batch item by item, and
        # those items must not cost a second request (nor, when sampling, change their answer).
        self._recovered: dict[str, Generation] = {}

    def __repr__(self) -> str:
        return f"ServedModel(name={self.name!r}, endpoint={self.endpoint!r})"

    # ----- SpeechLM -----

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[Generation]:
        """Answer each prompt with one chat completion, ``concurrency`` at a time; order preserved.

        Raises:
            ModelInputError: a prompt this endpoint cannot take (audio to a text-only endpoint, a clip too long),
                before anything is sent.
            EndpointError: the endpoint refused a request for good (e.g. 400/401/404), after the other requests of
                the batch finished.
            EndpointUnavailable: a request still failed after ``max_attempts`` tries.
        """
        if not prompts:
            return []
        for prompt in prompts:
            self._check_prompt(prompt)
        keys = [_prompt_key(p, config) for p in prompts]
        done = {i: self._recovered.pop(k) for i, k in enumerate(keys) if k in self._recovered}
        todo = [i for i in range(len(prompts)) if i not in done]
        outcomes = _run_sync(self._generate_async([prompts[i] for i in todo], config)) if todo else []
        failures: list[BaseException] = []
        for i, outcome in zip(todo, outcomes):
            if isinstance(outcome, BaseException):
                failures.append(outcome)
            else:
                done[i] = outcome
        if failures:
            # Merged, not replaced: while the runner re-asks a batch item by item, a culprit failing again must not
            # discard the answers its batch-mates are still to collect.
            self._recovered.update((keys[i], done[i]) for i in done)
            for stale in list(self._recovered)[: max(0, len(self._recovered) - MAX_RECOVERED)]:
                del self._recovered[stale]
            # The first failure speaks for the batch; the runner then asks each prompt alone and records the
            # culprit's own error.
            raise failures[0]
        return [done[i] for i in range(len(prompts))]

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[np.ndarray]:
        """Not available: a chat endpoint samples its own answer and cannot score a given one."""
        raise NotServable(
            f"{self.name} is served at {self.endpoint}: a chat-completions endpoint returns log-probs of the tokens "
            "it generates, not of a given continuation (teacher forcing), so continuation log-probs need the model "
            "loaded in-process"
        )

    def continuation_logits(self, prompts: Sequence[Prompt], continuations: Sequence[str] | Sequence[Sequence[int]]):
        """Not available: full-vocabulary logits never leave an OpenAI-compatible server."""
        raise NotServable(
            f"{self.name} is served at {self.endpoint}: a chat-completions endpoint exposes no logits, so "
            "teacher-forced continuation logits (distillation, KL diagnostics) need the model loaded in-process"
        )

    def prompt_length(self, prompt: Prompt) -> int:
        """A rough token count (4 characters per token, 25 tokens per audio second); it only orders batches."""
        characters = len(prompt.text or "") + len(prompt.system or "")
        n = characters // 4 + 1
        if prompt.audio is not None:
            n += int(AUDIO_TOKENS_PER_SECOND * len(prompt.audio) / SAMPLING_RATE)
        return n

    def describe(self) -> dict:
        """JSON-safe identity for the manifest; names the key's environment variable, never the key."""
        try:
            from openai import __version__ as client_version
        except ImportError:  # describing a run must not need the client installed
            client_version = None
        return {
            "family": FAMILY,
            "id": self.name,
            "base_url": public_url(self.base_url),
            "api": "openai-chat-completions",
            "client": "openai",
            "client_version": client_version,
            "api_key_env": self.api_key_env,
            "accepts_audio": self.accepts_audio,
            "max_audio_seconds": self.max_audio_seconds,
            "audio_format": f"wav/{self.audio_subtype.lower()}/{SAMPLING_RATE}Hz/mono",
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_attempts": self.retry.max_attempts,
            "extra_body": self.extra_body,
            # What the server loaded (revision, dtype, device) is not observable through this API.
            "revision": None,
        }

    # ----- requests -----

    def messages(self, prompt: Prompt) -> list[dict[str, Any]]:
        """The chat messages for one prompt: system (when set), then the user turn, audio part before text part."""
        messages: list[dict[str, Any]] = []
        if prompt.system is not None:
            messages.append({"role": "system", "content": prompt.system})
        if prompt.audio is None:
            # A plain string, as hf_causal builds it: text-only servers may not take content-part lists.
            messages.append({"role": "user", "content": prompt.text or ""})
            return messages
        content: list[dict[str, Any]] = [
            {"type": "input_audio", "input_audio": {"data": encode_wav(prompt.audio, self.audio_subtype),
                                                    "format": "wav"}}
        ]
        if prompt.text is not None:
            content.append({"type": "text", "text": prompt.text})
        messages.append({"role": "user", "content": content})
        return messages

    def request_body(self, prompt: Prompt, config: GenerationConfig) -> dict[str, Any]:
        """The JSON body of one chat completion (without ``model``): decoding settings made explicit."""
        body: dict[str, Any] = {"messages": self.messages(prompt), "max_tokens": config.max_new_tokens,
                                "seed": config.seed}
        if config.do_sample:
            body.update(temperature=config.temperature, top_p=config.top_p)
        else:
            # Explicit 0: a server's default temperature (often 0.7-1.0, or the checkpoint's generation_config)
            # would otherwise sample.
            body["temperature"] = 0.0
        return body

    def _check_prompt(self, prompt: Prompt) -> None:
        if prompt.audio is None:
            return
        if not self.accepts_audio:
            raise ModelInputError(f"{self.name} at {self.endpoint} is configured text-only and cannot take audio")
        seconds = len(prompt.audio) / SAMPLING_RATE
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds + 1e-9:
            raise ModelInputError(f"audio is {seconds:.2f} s long but {self.name} takes at most "
                                  f"{self.max_audio_seconds:.0f} s; the server would truncate it")

    def _client(self) -> AsyncOpenAI:
        try:
            from openai import AsyncOpenAI
        except ImportError as error:
            raise ImportError("a served model needs the openai client: pip install openai") from error
        # max_retries=0: retries are ours, so that Retry-After caps, the attempt count and the error text are
        # under this module's control and the same for every server.
        return AsyncOpenAI(api_key=self.__api_key or PLACEHOLDER_KEY, base_url=self.base_url,
                           timeout=self.timeout_s, max_retries=0)

    async def _generate_async(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[Any]:
        """Each prompt's Generation or its exception, in input order."""
        semaphore = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:

            async def one(prompt: Prompt) -> Generation:
                async with semaphore:
                    return await self._complete(client, self.request_body(prompt, config))

            # return_exceptions: one prompt's failure must not cancel answers already on their way.
            return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)

    async def _complete(self, client: AsyncOpenAI, body: dict[str, Any]) -> Generation:
        """One chat completion with retries; the key never appears in what is raised."""
        import openai

        last_problem = "no attempt made"
        for attempt in range(1, self.retry.max_attempts + 1):
            retry_after: float | None = None
            try:
                response = await client.chat.completions.create(model=self.name, **body,
                                                                extra_body=self.extra_body or None)
            except openai.APIStatusError as error:
                detail = self._scrub(_error_detail(error))
                if error.status_code not in RETRYABLE_STATUS:
                    raise EndpointError(
                        f"{self.endpoint} answered HTTP {error.status_code} for model {self.name!r}: {detail}"
                    ) from None
                last_problem = f"HTTP {error.status_code}: {detail}"
                retry_after = parse_retry_after(error.response.headers)
            except openai.APITimeoutError:
                last_problem = f"no answer within {self.timeout_s:g} s"
            except openai.APIConnectionError as error:
                cause = error.__cause__ or error
                last_problem = self._scrub(f"connection failed ({type(cause).__name__}: {cause})")
            else:
                return self._to_generation(response)
            if attempt < self.retry.max_attempts:
                await asyncio.sleep(self.retry.backoff(attempt, retry_after))
        # `from None`: the client's exception chain carries the request, whose headers hold the key.
        raise EndpointUnavailable(
            f"{self.endpoint} failed {self.retry.max_attempts} attempt(s) for model {self.name!r}; "
            f"last: {last_problem}"
        ) from None

    def _to_generation(self, response: Any) -> Generation:
        choices = getattr(response, "choices", None) or []
        if not choices:
            raise EndpointError(f"{self.endpoint} answered without any choice for model {self.name!r}")
        choice = choices[0]
        # Only "length" means the budget ran out; "stop" (and tool/filter stops) end the answer like an EOS.
        finish = "length" if choice.finish_reason == "length" else "eos"
        usage = getattr(response, "usage", None)
        # 0 = the server reported no usage (token counts are only recorded, never scored).
        n_prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        n_new = int(getattr(usage, "completion_tokens", 0) or 0)
        return Generation(text=choice.message.content or "", n_prompt_tokens=n_prompt, n_new_tokens=n_new,
                          finish_reason=finish)

    def _scrub(self, text: str) -> str:
        """``text`` with the API key blanked, in case a server or proxy echoed it back."""
        if self.__api_key and self.__api_key != PLACEHOLDER_KEY:
            text = text.replace(self.__api_key, "***")
        return text


def _error_detail(error: Any, limit: int = 500) -> str:
    """The server's own explanation from an error body (OpenAI ``error.message`` or FastAPI ``detail``)."""
    body = getattr(error, "body", None)
    detail: Any = None
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            detail = inner.get("message")
        else:
            detail = inner or body.get("detail") or body.get("message")
        if detail is None:
            detail = body
    elif body is not None:
        detail = body
    text = str(detail if detail is not None else getattr(error, "message", "") or "no detail")
    return text if len(text) <= limit else text[:limit] + "..."


def load_served(
    model: str,
    base_url: str,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 32,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    accepts_audio: bool = True,
    max_audio_seconds: float | None = None,
) -> ServedModel:
    """A :class:`ServedModel` for ``model`` at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    Nothing is sent until :meth:`ServedModel.generate`; the key is read from ``api_key_env`` (unset = none, fine for
    local servers).
    """
    return ServedModel(model, base_url, api_key_env=api_key_env, concurrency=concurrency, timeout_s=timeout_s,
                       max_attempts=max_attempts, accepts_audio=accepts_audio, max_audio_seconds=max_audio_seconds)
