"""The embedded default: what ``speechlm-eval gap`` and ``speechlm-eval distill`` run with no model arguments, and the
one place where it is applied to their configurations.

It is the *model organism*: a tiny Qwen2 text LLM and a tiny Qwen2-Audio speech LLM built from it, trained offline on
a synthetic world of facts, whose speech stage really causes forgetting and modality inequivalence. The seed-0 build
ships with the package (``speechlm_eval/organism/shipped``), so nothing is trained or downloaded to use it;
``speechlm-eval organism build`` rebuilds it from scratch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from speechlm_eval.organism.layout import is_built, paths_for

EMBEDDED_SUITE = "organism:organism_mcq@seed0"
EMBEDDED_MAX_NEW_TOKENS = 8  # a letter and the end-of-turn token; a few spare tokens show what a failure says
EMBEDDED_NOTE = (
    "Embedded default: the seed-0 model organism (speechlm_eval.organism), a 0.6 M-parameter Qwen2 text LLM and a "
    "1.3 M-parameter Qwen2-Audio speech LLM built from it, trained offline on a synthetic world; the suite asks each "
    "entity's held-out fact, spoken in an espeak-ng voice never used in training. Its numbers describe the organism, not any real model."
)
# What ``distill`` uses for the organism where the user sets nothing (each still overridable). The organism's
# distillation set is small (every non-evaluation fact, ~290 MCQs) and its models tiny, so the run is a full fine-tune
# for many epochs at a higher learning rate than the 7B defaults; S→T speaks the questions in a training voice, so
# the evaluation voice stays unheard by every training stage.
ORGANISM_DISTILL_DEFAULTS: dict[str, Any] = {
    "targets": "teacher",
    "lora": False,
    "lr": 3e-4,
    "epochs": 24,
    "batch_size": 24,
    "warmup_ratio": 0.05,
    "tts_voice": "en-gb",
    "teacher_batch_size": 32,
}


class EmbeddedModelError(RuntimeError):
    """The shipped organism is missing or incomplete (e.g. a source checkout without its package data)."""


def embedded_dir() -> Path:
    """The shipped organism build (``text_llm/``, ``speech_llm/``, suite and distillation data, ``organism.json``)."""
    return Path(str(resources.files("speechlm_eval.organism") / "shipped"))


def embedded_models() -> tuple[Path, Path]:
    """Paths of the (speech LLM, text LLM) embedded pair."""
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
    return paths_for(embedded_dir()).distill


def gap_defaults() -> dict[str, Any]:
    """The embedded values of a gap configuration's fields (applied where the user set nothing)."""
    speech, text = embedded_models()
    return {"model": str(speech), "text_model": str(text), "suites": [EMBEDDED_SUITE],
            "max_new_tokens": EMBEDDED_MAX_NEW_TOKENS}


def distill_defaults() -> dict[str, Any]:
    """The embedded values of a distillation configuration's fields, its before/after evaluation's included."""
    speech, text = embedded_models()
    return {"student": str(speech), "teacher": str(text), "data": str(embedded_distill_data()),
            "leakage_suite": EMBEDDED_SUITE, "suites": [EMBEDDED_SUITE], "eval_max_new_tokens": EMBEDDED_MAX_NEW_TOKENS,
            **ORGANISM_DISTILL_DEFAULTS}


def unset(value: Any) -> bool:
    """What counts as "not given": ``None`` or an empty list/tuple."""
    return value is None or (isinstance(value, (list, tuple)) and not value)


def apply_embedded(config: Any, defaults: Mapping[str, Any]) -> None:
    """Give every field of ``config`` that is unset its embedded value, and add :data:`EMBEDDED_NOTE` to its notes.

    ``config`` is any object with some of those attributes (a gap, distillation or evaluation configuration); one
    without a ``notes`` list gets no note.
    """
    for name, value in defaults.items():
        if hasattr(config, name) and unset(getattr(config, name)):
            setattr(config, name, list(value) if isinstance(value, list) else value)
    if isinstance(getattr(config, "notes", None), list):
        config.notes.append(EMBEDDED_NOTE)
