"""Where speechlm-eval keeps what it can recompute (TTS clips, judge answers, built test models): one cache root."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "SPEECHLM_EVAL_CACHE"


def cache_root() -> Path:
    """``$SPEECHLM_EVAL_CACHE`` (``~`` expanded) or ``~/.cache/speechlm_eval``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "speechlm_eval"
