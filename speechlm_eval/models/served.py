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
import contextlib
import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.endpoint import (  # noqa: F401 - re-exported: a served model's errors and policy
    ChatEndpoint,
    EndpointError,
    EndpointUnavailable,
    Price,
    RetryPolicy,
    Usage,
    parse_retry_after,
    public_url,
    run_sync,
)
from speechlm_eval.models.base import CHECKPOINT_DEFAULTS, Generation, GenerationConfig, ModelInputError, Prompt

FAMILY = "served"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_ATTEMPTS = 6
# Answers kept from failed batches; the runner collects them right away, so this only bounds a caller that does not.
MAX_RECOVERED = 4096
AUDIO_TOKENS_PER_SECOND = 25  # Whisper-style encoders after pooling (Qwen2-Audio): only used to sort batches


class NotServable(NotImplementedError):
    """An operation an OpenAI-compatible chat endpoint cannot perform (teacher-forced log-probs / logits)."""


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


def _prompt_key(prompt: Prompt, config: GenerationConfig) -> str:
    """A content digest of one request, so an answer already received is never asked for twice."""
    digest = hashlib.sha256()
    digest.update(repr((prompt.text, prompt.system, sorted(config.to_dict().items()))).encode())
    if prompt.audio is not None:
        digest.update(np.ascontiguousarray(prompt.audio, dtype=np.float32).tobytes())
    return digest.hexdigest()


class ServedModel:
    """A model answering through an OpenAI-compatible chat-completions endpoint (or several replicas of it).

    Attributes:
        name: the model name sent in every request (what the server was started with / lists in ``/v1/models``).
        endpoints: one :class:`~speechlm_eval.endpoint.ChatEndpoint` per replica URL; each request goes to the
            replica with the fewest requests in flight, so replicas without a router in front still share the load.
        accepts_audio: whether prompts may carry audio (sent as ``input_audio`` parts).
        max_audio_seconds: longest clip sent; longer ones fail client-side with :class:`ModelInputError`, because
            servers tend to truncate them to the encoder window silently (``None`` = no check).
        concurrency: requests in flight at once within one :meth:`generate` call (over all replicas).
        extra_body: extra JSON fields sent with every request (server-specific knobs such as vLLM's ``top_k``;
            ``transformers serve`` answers 422 to fields it does not know).
        retry: the backoff schedule and per-request timeout (``timeout_s`` overrides the latter).
        price: USD per million tokens, for the cost in the report (``None`` = not priced).
    """

    family = FAMILY

    def __init__(
        self,
        name: str,
        base_url: str | Sequence[str],
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        timeout_s: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        accepts_audio: bool = True,
        max_audio_seconds: float | None = None,
        audio_subtype: str = "FLOAT",
        extra_body: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        price: Price | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        policy = retry if retry is not None else RetryPolicy(max_attempts=max_attempts,
                                                             request_timeout_s=DEFAULT_TIMEOUT_S)
        if timeout_s is not None:
            if timeout_s <= 0:
                raise ValueError(f"timeout_s must be positive, got {timeout_s}")
            policy = dataclasses.replace(policy, request_timeout_s=float(timeout_s))
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("a served model needs at least one base URL")
        # Read once, kept only in memory (inside the endpoints): never in describe(), repr() or a message.
        key = os.environ.get(api_key_env) or None
        self.endpoints = [ChatEndpoint(url, api_key=key, retry=policy) for url in urls]
        self.name = name
        self.base_url = self.endpoints[0].base_url
        self.endpoint = ", ".join(e.url for e in self.endpoints)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = policy.request_timeout_s
        self.accepts_audio = accepts_audio
        self.max_audio_seconds = max_audio_seconds
        self.audio_subtype = audio_subtype
        self.extra_body = dict(extra_body or {})
        self.retry = policy
        self.price = price
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
        outcomes = run_sync(self._generate_async([prompts[i] for i in todo], config)) if todo else []
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
            "base_url": ", ".join(e.public_base_url for e in self.endpoints),
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

    def usage(self) -> dict[str, Any]:
        """Requests, retries, failures and the server-reported tokens of this process (all replicas), with the
        cost when priced."""
        total = Usage()
        for endpoint in self.endpoints:
            for name in ("calls", "attempts", "failed", "prompt_tokens", "completion_tokens", "audio_prompt_tokens",
                         "unreported"):
                setattr(total, name, getattr(total, name) + getattr(endpoint.usage, name))
        return {"model": self.name, "endpoint": ", ".join(e.url for e in self.endpoints), **total.to_dict(self.price)}

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

    @staticmethod
    def extra_fields(config: GenerationConfig) -> dict[str, Any]:
        """``--gen-kwargs`` settings, sent as extra request fields (vLLM and SGLang take e.g. ``repetition_penalty``
        and ``top_k`` so; ``transformers serve`` answers 422 to fields it does not know). Whether to apply the
        checkpoint's generation config is the server's own setting, so that key is not sent."""
        return {k: v for k, v in config.extra if k != CHECKPOINT_DEFAULTS}

    def _check_prompt(self, prompt: Prompt) -> None:
        if prompt.audio is None:
            return
        if not self.accepts_audio:
            raise ModelInputError(f"{self.name} at {self.endpoint} is configured text-only and cannot take audio")
        seconds = len(prompt.audio) / SAMPLING_RATE
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds + 1e-9:
            raise ModelInputError(f"audio is {seconds:.2f} s long but {self.name} takes at most "
                                  f"{self.max_audio_seconds:.0f} s; the server would truncate it")

    async def _generate_async(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[Any]:
        """Each prompt's Generation or its exception, in input order."""
        semaphore = asyncio.Semaphore(self.concurrency)
        in_flight = [0] * len(self.endpoints)
        extra = {**self.extra_fields(config), **self.extra_body}
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(e.client()) for e in self.endpoints]

            async def one(prompt: Prompt) -> Generation:
                async with semaphore:
                    k = min(range(len(clients)), key=in_flight.__getitem__)  # least busy replica
                    in_flight[k] += 1
                    try:
                        body = {"model": self.name, **self.request_body(prompt, config)}
                        response = await self.endpoints[k].create(clients[k], body, extra)
                    finally:
                        in_flight[k] -= 1
                    return _to_generation(response)

            # return_exceptions: one prompt's failure must not cancel answers already on their way.
            return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)


def _to_generation(response: Any) -> Generation:
    choice = response.choices[0]
    # Only "length" means the budget ran out; "stop" (and tool/filter stops) end the answer like an EOS.
    finish = "length" if choice.finish_reason == "length" else "eos"
    usage = getattr(response, "usage", None)
    # 0 = the server reported no usage (token counts are only recorded, never scored).
    n_prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    n_new = int(getattr(usage, "completion_tokens", 0) or 0)
    return Generation(text=choice.message.content or "", n_prompt_tokens=n_prompt, n_new_tokens=n_new,
                      finish_reason=finish)


def load_served(
    model: str,
    base_url: str | Sequence[str],
    *,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 32,
    timeout_s: float | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    accepts_audio: bool = True,
    max_audio_seconds: float | None = None,
    price: Price | None = None,
    audio_subtype: str = "FLOAT",
) -> ServedModel:
    """A :class:`ServedModel` for ``model`` at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``, or several replicas).

    Nothing is sent until :meth:`ServedModel.generate`; the key is read from ``api_key_env`` (unset = none, fine for
    local servers).
    """
    return ServedModel(model, base_url, api_key_env=api_key_env, concurrency=concurrency, timeout_s=timeout_s,
                       max_attempts=max_attempts, accepts_audio=accepts_audio, max_audio_seconds=max_audio_seconds,
                       price=price, audio_subtype=audio_subtype)
