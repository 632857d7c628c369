"""A judge, whatever its backend: one filled judge prompt in, its ``n`` output strings out, plus the identity that
decides those outputs (the cache key) and the sampling settings VoiceBench's ``api_judge.py`` uses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from speechlm_eval.endpoint import RetryPolicy  # noqa: F401 - the judge's policy type, re-exported
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


# The judge's retry policy is the shared endpoint client's (one policy for everything that calls a server), with the
# patience of a hosted judge: upstream retries 25 times, 30 s apart; we back off from 2 s up to 60 s over 8 attempts.
JUDGE_RETRY = RetryPolicy(max_attempts=8, initial_delay_s=2.0, multiplier=2.0, max_delay_s=60.0,
                          request_timeout_s=120.0)


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
        usage: for an endpoint judge, ``() -> dict`` of this process's calls, retries and tokens (see
            :class:`speechlm_eval.endpoint.Usage`); ``None`` for a local model.
    """

    spec: str
    identity: Mapping[str, Any]
    complete: Callable[[str], list[str]]
    workers: int = 1
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    usage: Callable[[], dict[str, Any]] | None = None

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
