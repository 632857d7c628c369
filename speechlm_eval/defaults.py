"""The embedded default: what ``speechlm-eval gap`` runs with no ``--model``.

Until the model organism lands this is a pair of *tiny random* models (speechlm_eval.models.tiny) built offline on first
use, with a tokenizer trained on the bundled mini-suite, cached under the speechlm-eval cache directory. Their scores
carry no meaning about any real model; they demonstrate the pipeline end to end on a laptop.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_NAME = "tiny-random-v1"
EMBEDDED_SUITE = "bundled"
EMBEDDED_MAX_NEW_TOKENS = 24
EMBEDDED_NOTE = (
    "Embedded default: tiny randomly initialised Qwen2-Audio student and Qwen2 text model built offline "
    "(speechlm_eval.models.tiny); their answers are noise, the numbers only show the pipeline working."
)


def cache_root() -> Path:
    """``$SPEECHLM_EVAL_CACHE`` or ``~/.cache/speechlm_eval``."""
    return Path(os.environ.get("SPEECHLM_EVAL_CACHE", Path.home() / ".cache" / "speechlm_eval"))


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt, choice and reference of the bundled suite."""
    from speechlm_eval.data.registry import LoadOptions, SubsetRequest, get_benchmark

    bundled = get_benchmark("bundled")
    corpus: list[str] = []
    for subset in bundled.subsets:
        for item in bundled.load(SubsetRequest("bundled", subset), LoadOptions()):
            corpus.extend(t for t in (item.text, item.audio_instruction, item.speak, *item.choices) if t)
            if isinstance(item.reference, str):
                corpus.append(item.reference)
    return corpus


def embedded_models() -> tuple[Path, Path]:
    """Paths of the (speech LLM, text LLM) embedded pair, building it once; safe when two processes start together."""
    from filelock import FileLock

    from speechlm_eval.models.tiny import build_tiny_pair, is_built

    root = cache_root() / "models" / EMBEDDED_NAME
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not is_built(root):
            build_tiny_pair(tokenizer_corpus(), root)
    return root / "speech_llm", root / "text_llm"
