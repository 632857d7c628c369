"""lm-eval integration: our adapters as the lm-eval model ``speechlm``, any lm-eval task as a forgetting probe
(:func:`run_lmeval_tasks`), and spoken log-likelihood multiple choice (:mod:`speechlm_eval.lmeval.spoken`) for the
inequivalence of any ``multiple_choice`` task.

Importing this package registers ``speechlm`` with lm-eval as a lazy entry (torch and the model code load on first
use), so ``lm_eval.simple_evaluate(model="speechlm", ...)`` works after ``import speechlm_eval.lmeval``; the numbers are
computed from the records by :mod:`speechlm_eval.report.lmeval`, without lm-eval or torch.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own lazy entries first: its registry only self-fills when empty
from lm_eval.api.registry import model_registry

from speechlm_eval.lmeval.run import harness_records, run_lmeval_tasks, task_manager_for
from speechlm_eval.lmeval.spoken import SPOKEN_ARMS, ChoiceDoc, choice_docs, choice_scores, spoken_records

if "speechlm" not in model_registry:
    model_registry.register("speechlm", target="speechlm_eval.lmeval.model:SpeechLMHarness")


def __getattr__(name: str) -> Any:
    if name == "SpeechLMHarness":
        from speechlm_eval.lmeval.model import SpeechLMHarness

        return SpeechLMHarness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SPOKEN_ARMS",
    "ChoiceDoc",
    "SpeechLMHarness",
    "choice_docs",
    "choice_scores",
    "harness_records",
    "run_lmeval_tasks",
    "spoken_records",
    "task_manager_for",
]
