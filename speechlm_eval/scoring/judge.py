"""LLM judges for VoiceBench's GPT-judged subsets (scorers ``open`` and ``qa``): backends, on-disk cache, wiring.

A judge turns one filled judge prompt into ``n`` (3) output strings, as upstream ``api_judge.py`` does. The ``--judge``
specs are ``openai:MODEL`` (any OpenAI-compatible chat-completions endpoint over plain HTTP), ``hf:PATH`` (a local
model through our adapters) and ``none`` (skip judging). Every call is cached on disk, keyed by the judge's identity
and the exact prompt, so a re-run makes no call. Scorers never call a judge: they read outputs attached to the item
view by :func:`attach_judgements`, keyed by the response they score.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from speechlm_eval.scoring.judge_prompts import JUDGE_SYSTEM, PROMPT_SOURCE, judge_prompt, prompt_digests

log = logging.getLogger(__name__)

JUDGED_SCORERS = frozenset({"open", "qa"})
BASE_URL_ENV = "SPEECHLM_EVAL_JUDGE_BASE_URL"
API_KEY_ENVS = ("SPEECHLM_EVAL_JUDGE_API_KEY", "OPENAI_API_KEY")  # first one set wins
DEFAULT_BASE_URL = "https://api.openai.com/v1"
JUDGE_NONE_NOTE = (
    "not judged (--judge none): the open and qa subsets need an LLM judge (VoiceBench uses gpt-4o-mini); "
    "their responses are in the records; judge them later with --judge openai:MODEL or --judge hf:PATH"
)
CACHE_FORMAT = 1  # bump if a cache entry's meaning changes; it is part of every key
RETRYABLE_HTTP_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """A judge that cannot be built or called (bad spec, missing key, endpoint refusing, retries exhausted)."""


class MissingJudgement(LookupError):
    """A judged scorer was asked to score a response that has no judge outputs attached."""


@dataclass(frozen=True)
class JudgeSettings:
    """Sampling settings of a judge call; the defaults are ``api_judge.py``'s. Part of the cache key."""

    system: str = JUDGE_SYSTEM
    max_tokens: int = 1024
    temperature: float = 0.5
    top_p: float = 0.95
    n: int = 3
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for HTTP judges.

    The k-th retry waits ``min(max_delay_s, initial_delay_s * multiplier**(k-1))`` seconds, or what a 429/503's
    ``Retry-After`` asks (capped the same way). Upstream retries 25 times, 30 s apart.
    """

    max_attempts: int = 8
    initial_delay_s: float = 2.0
    multiplier: float = 2.0
    max_delay_s: float = 60.0
    request_timeout_s: float = 120.0

    def delay(self, failed_attempts: int) -> float:
        return min(self.max_delay_s, self.initial_delay_s * self.multiplier ** (failed_attempts - 1))


@dataclass(frozen=True)
class Judge:
    """A ready judge.

    Attributes:
        spec: the ``--judge`` string it was built from.
        identity: JSON-safe description of everything that decides its outputs (backend, model, endpoint, settings,
            seed); with the exact prompt it forms the cache key. Never holds a secret.
        complete: one filled prompt -> its ``n`` output strings (each stripped, as upstream strips them).
        workers: how many prompts may be in flight at once.
        details: manifest-only facts that do not change outputs (e.g. a local model's path).
    """

    spec: str
    identity: Mapping[str, Any]
    complete: Callable[[str], list[str]]
    workers: int = 1
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-safe entry for the run manifest."""
        return {"spec": self.spec, **self.identity, **self.details, "key": identity_digest(self.identity),
                "prompts": prompt_digests(), "prompt_source": PROMPT_SOURCE}


def describe_judge(judge: Judge | None) -> dict[str, Any]:
    """The manifest entry of a judge, ``none`` included."""
    return judge.describe() if judge is not None else {"spec": "none", "backend": "none", "note": JUDGE_NONE_NOTE}


# --------------------------------------------------------------------------------------------------------------------
# Building a judge from its spec


def load_judge(
    spec: str,
    *,
    settings: JudgeSettings = JudgeSettings(),
    retry: RetryPolicy = RetryPolicy(),
    workers: int = 4,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> Judge | None:
    """The judge a ``--judge`` spec names; ``None`` for ``none``.

    ``openai:MODEL`` posts to ``$SPEECHLM_EVAL_JUDGE_BASE_URL`` (default OpenAI) with the key from
    ``$SPEECHLM_EVAL_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``, ``workers`` requests at a time (upstream uses 4).
    ``hf:PATH`` samples ``settings.n`` answers from a local model, seeded per prompt from ``seed``; the model is
    loaded on the first cache miss only (``device``/``dtype`` as for our model adapters).
    """
    backend, _, target = spec.partition(":")
    if spec.strip() == "none":
        return None
    if backend == "openai" and target:
        return _openai_judge(spec, target, settings, retry, workers)
    if backend == "hf" and target:
        return _hf_judge(spec, target, settings, seed, device, dtype)
    raise JudgeError(f"unknown judge {spec!r}; use openai:MODEL (e.g. openai:gpt-4o-mini), hf:PATH or none")


def _openai_judge(spec: str, model: str, settings: JudgeSettings, retry: RetryPolicy, workers: int) -> Judge:
    base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    key = _api_key()
    if key is None and urllib.parse.urlsplit(base_url).hostname == "api.openai.com":
        raise JudgeError(f"judge {spec!r} needs an API key: set {' or '.join(API_KEY_ENVS)}")
    url = base_url.rstrip("/") + "/chat/completions"
    identity = {"backend": "openai", "model": model, "base_url": _public_url(base_url), **settings.to_dict()}

    def complete(prompt: str) -> list[str]:
        return _post_with_retries(url, key, _request_body(model, settings, prompt), settings.n, retry)

    return Judge(spec=spec, identity=identity, complete=complete, workers=max(1, workers),
                 details={"retry": asdict(retry)})


def _hf_judge(spec: str, path: str, settings: JudgeSettings, seed: int, device: str, dtype: str) -> Judge:
    if settings.frequency_penalty or settings.presence_penalty:
        raise JudgeError("the hf judge samples with temperature/top_p only; frequency/presence penalties must be 0")
    identity = {"backend": "hf", "model": _checkpoint_identity(path), "seed": seed, "dtype": dtype,
                **settings.to_dict()}

    @functools.cache
    def model() -> Any:
        # Imported here: scoring must stay importable without torch/transformers (a report needs no model).
        from speechlm_eval.models.registry import LoadOptions, load_model

        return load_model(path, LoadOptions(device=device, dtype=dtype))

    def complete(prompt: str) -> list[str]:
        from speechlm_eval.models.base import GenerationConfig, Prompt

        # One generate call per prompt, its n samples as n rows, seeded from the prompt itself: the outputs of a
        # prompt do not depend on which other prompts are judged, in what order or batch.
        config = GenerationConfig(max_new_tokens=settings.max_tokens, do_sample=True, temperature=settings.temperature,
                                  top_p=settings.top_p, seed=prompt_seed(seed, prompt))
        generations = model().generate([Prompt(text=prompt, system=settings.system)] * settings.n, config)
        return [g.text.strip() for g in generations]

    return Judge(spec=spec, identity=identity, complete=complete, workers=1, details={"path": path})


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt for the hf judge: a 63-bit number from ``seed`` and the prompt text."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _checkpoint_identity(path: str) -> dict[str, Any]:
    """What identifies a judge checkpoint without loading it: for a local directory, a hash of its config and
    tokenizer files plus each weight file's name, size and first/last MiB (fine-tunes of one architecture differ
    there); for a hub id, the id."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return {"id": path}
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.suffix in {".json", ".jinja", ".txt", ".model"}:  # config, tokenizer, chat template
            digest.update(f"{file.name}\0".encode() + file.read_bytes())
        elif file.suffix in {".safetensors", ".bin", ".pt"}:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                head = handle.read(1 << 20)
                handle.seek(max(0, size - (1 << 20)))
                tail = handle.read()
            digest.update(f"{file.name}\0{size}\0".encode() + head + tail)
    return {"fingerprint": digest.hexdigest()}


# --------------------------------------------------------------------------------------------------------------------
# The OpenAI-compatible HTTP backend


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _api_key() -> str | None:
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _public_url(url: str) -> str:
    """The endpoint without credentials or query (a URL can carry ``user:pass@`` or ``?key=``)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
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


# --------------------------------------------------------------------------------------------------------------------
# The on-disk cache: one JSON file per (judge identity, prompt)


def default_cache_dir() -> Path:
    """``$SPEECHLM_EVAL_CACHE/judge`` (``~/.cache/speechlm_eval/judge`` when unset)."""
    from speechlm_eval.defaults import cache_root

    return cache_root() / "judge"


def identity_digest(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a judge identity, to name which judge produced a set of outputs."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def cache_key(identity: Mapping[str, Any], prompt: str) -> str:
    """sha256 of the canonical JSON of (cache format, judge identity, exact prompt)."""
    blob = json.dumps({"format": CACHE_FORMAT, "judge": identity, "prompt": prompt}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_path(cache_dir: Path, identity: Mapping[str, Any], prompt: str) -> Path:
    key = cache_key(identity, prompt)
    return Path(cache_dir) / key[:2] / f"{key}.json"


def read_cached(cache_dir: Path, identity: Mapping[str, Any], prompt: str) -> list[str] | None:
    """The cached outputs, or ``None`` on a miss (an unreadable or mismatching entry counts as a miss)."""
    path = cache_path(cache_dir, identity, prompt)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("prompt") != prompt:
        return None
    outputs = entry.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        return None
    return outputs


def write_cached(cache_dir: Path, identity: Mapping[str, Any], prompt: str, outputs: Sequence[str]) -> None:
    """Store one entry atomically (temp file in the same directory, then ``os.replace``)."""
    path = cache_path(cache_dir, identity, prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"format": CACHE_FORMAT, "judge": dict(identity), "prompt": prompt, "outputs": list(outputs)}
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(entry, handle, ensure_ascii=False, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------------
# Judging items


def judge_records(
    items: Sequence[Any], responses: Sequence[str], judge: Judge, cache_dir: str | Path | None = None
) -> list[list[str]]:
    """The ``n`` judge outputs for each (item, response), in order, calling the judge only on cache misses.

    Each prompt is built as upstream builds it (:func:`judge_prompt`); identical prompts are judged once. Results are
    cached as they arrive, so an interrupted run resumes where it stopped.
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prompts = [judge_prompt(item, response) for item, response in zip(items, responses)]
    outputs: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(prompts):
        cached = read_cached(cache, judge.identity, prompt)
        if cached is not None:
            outputs[prompt] = cached
    missing = [p for p in dict.fromkeys(prompts) if p not in outputs]
    log.info("judge %s: %d prompts, %d cached, %d to judge", judge.spec, len(outputs) + len(missing), len(outputs),
             len(missing))
    for prompt, result in _complete_all(judge, missing):
        write_cached(cache, judge.identity, prompt, result)
        outputs[prompt] = result
    return [list(outputs[p]) for p in prompts]


def _complete_all(judge: Judge, prompts: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(prompt, outputs) as each finishes; on the first failure, pending prompts are cancelled and it re-raises."""
    if judge.workers <= 1 or len(prompts) <= 1:
        for prompt in prompts:
            yield prompt, judge.complete(prompt)
        return
    with ThreadPoolExecutor(max_workers=judge.workers) as pool:
        futures = {pool.submit(judge.complete, prompt): prompt for prompt in prompts}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def judge_arm_rows(
    items: Sequence[Any], records: Mapping[str, Mapping[str, Any]], judge: Judge, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Judgement rows (see :func:`judgement_rows`) for the items of one arm that have a response without error."""
    answered = [item for item in items if records.get(item.id, {}).get("error") is None and item.id in records]
    responses = [records[item.id]["response"] for item in answered]
    return judgement_rows(answered, responses, judge_records(answered, responses, judge, cache_dir), judge)


def response_key(response: str) -> str:
    """How judge outputs are looked up: the sha256 of the exact response they judged."""
    return hashlib.sha256(response.encode("utf-8")).hexdigest()


def judgement_rows(
    items: Sequence[Any], responses: Sequence[str], outputs: Sequence[Sequence[str]], judge: Judge
) -> list[dict[str, Any]]:
    """One JSON-safe row per item, ``{"id", "response_sha256", "judge", "outputs"}``, to store beside the records.

    The response is stored as its hash: a row goes stale by itself when the record's response changes.
    """
    key = identity_digest(judge.identity)
    return [{"id": item.id, "response_sha256": response_key(response), "judge": key, "outputs": list(out)}
            for item, response, out in zip(items, responses, outputs)]


def attach_judgements(item: Any, rows: Iterable[Mapping[str, Any]]) -> SimpleNamespace:
    """A scorer-facing copy of ``item`` whose ``judgements`` maps response sha256 -> judge outputs.

    ``rows`` are this item's judgement rows from any arms; judgements already on ``item`` are kept. Keying by the
    response (not the arm) lets ``Scorer.score(item, response, rng)`` find them, and gives identical responses in two
    arms identical judgements, as the cache does.
    """
    if isinstance(item, SimpleNamespace):
        fields = dict(vars(item))
    else:
        fields = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    judgements = dict(fields.get("judgements") or {})
    for row in rows:
        if row["id"] != item.id:
            raise ValueError(f"judgement row for {row['id']!r} attached to item {item.id!r}")
        judgements[row["response_sha256"]] = list(row["outputs"])
    fields["judgements"] = judgements
    return SimpleNamespace(**fields)


def judge_outputs_for(item: Any, response: str) -> list[str]:
    """The judge outputs attached to ``item`` for exactly ``response``; :class:`MissingJudgement` when none are."""
    judgements = getattr(item, "judgements", None) or {}
    outputs = judgements.get(response_key(response))
    if outputs is None:
        raise MissingJudgement(f"{item.id}: no judge outputs for this response; the {item.subset} subset is scored "
                               "by an LLM judge: judge the run (--judge openai:MODEL or hf:PATH) before scoring it")
    if not outputs:
        raise MissingJudgement(f"{item.id}: the judge returned no outputs for this response")
    return list(outputs)
