"""The embedded default: what ``speechlm-eval gap`` and ``speechlm-eval distill`` run with no model arguments.

It is the *model organism* (``speechlm_eval.organism``): a tiny Qwen2 text LLM and a tiny Qwen2-Audio speech LLM built
from it, trained offline on a synthetic world of facts, whose speech stage really causes forgetting and modality
inequivalence. The seed-0 build ships with the package (``speechlm_eval/organism/shipped``, ~10 MB), so nothing is
trained or downloaded to use it; ``speechlm-eval organism build`` rebuilds it from scratch.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

EMBEDDED_NAME = "organism-seed0"
EMBEDDED_SUITE = "organism:organism_mcq@seed0"
EMBEDDED_MAX_NEW_TOKENS = 8  # a letter and the end-of-turn token; a few spare tokens show what a failure says
EMBEDDED_NOTE = (
    "Embedded default: the seed-0 model organism (speechlm_eval.organism), a 0.6 M-parameter Qwen2 text LLM and a "
    "1.3 M-parameter Qwen2-Audio speech LLM built from it, trained offline on a synthetic world; the suite asks each "
    "entity's held-out fact, spoken in an espeak-ng voice never used in training. Its numbers describe the organism, not any real model."
)


class EmbeddedModelError(RuntimeError):
    """The shipped organism is missing or incomplete (e.g. a source checkout without its package data)."""


def cache_root() -> Path:
    """``$SPEECHLM_EVAL_CACHE`` or ``~/.cache/speechlm_eval``."""
    return Path(os.environ.get("SPEECHLM_EVAL_CACHE", Path.home() / ".cache" / "speechlm_eval"))


def embedded_dir() -> Path:
    """The shipped organism build (``text_llm/``, ``speech_llm/``, suite and distillation data, ``organism.json``)."""
    return Path(str(resources.files("speechlm_eval.organism") / "shipped"))


def embedded_models() -> tuple[Path, Path]:
    """Paths of the (speech LLM, text LLM) embedded pair."""
    from speechlm_eval.organism.builder import is_built, paths_for

    root = embedded_dir()
    if not is_built(root):
        raise EmbeddedModelError(
            f"the shipped model organism is missing or incomplete in {root}; reinstall the package, or build one with "
            "`speechlm-eval organism build --out DIR` and pass --model DIR/speech_llm --text-model DIR/text_llm"
        )
    paths = paths_for(root)
    return paths.speech_llm, paths.text_llm


def embedded_distill_data() -> Path:
    """The shipped organism's distillation data (Open-Orca columns; every non-evaluation fact)."""
    from speechlm_eval.organism.builder import paths_for

    return paths_for(embedded_dir()).distill
