"""The judge's on-disk cache: one JSON file per (judge identity, exact prompt), so judging a run again makes no call."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from speechlm_eval.paths import cache_root
from speechlm_eval.records import write_atomic

CACHE_FORMAT = 1  # bump if a cache entry's meaning changes; it is part of every key


def default_cache_dir() -> Path:
    """``$SPEECHLM_EVAL_CACHE/judge`` (``~/.cache/speechlm_eval/judge`` when unset)."""
    return cache_root() / "judge"


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
    """Store one entry atomically and durably (an interrupted judge run resumes from its cache)."""
    path = cache_path(cache_dir, identity, prompt)
    entry = {"format": CACHE_FORMAT, "judge": dict(identity), "prompt": prompt, "outputs": list(outputs)}
    write_atomic(path, json.dumps(entry, ensure_ascii=False, sort_keys=True))
