"""A judge, whatever its backend: one filled judge prompt in, its ``n`` output strings out, plus the identity that
decides those outputs (the cache key) and the sampling settings VoiceBench's ``api_judge.py`` uses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from speechlm_eval.judge.prompts import JUDGE_SYSTEM, PROMPT_SOURCE, prompt_digests
from speechlm_eval.scoring.judged import JUDGE_NONE_NOTE


class JudgeError(RuntimeError):
    """A judge that cannot be built or called (bad spec, missing key, endpoint refusing, retries exhausted)."""


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


def identity_digest(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a judge identity, to name which judge produced a set of outputs."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
