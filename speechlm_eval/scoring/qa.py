"""VoiceBench's ``qa`` scorer (sd-qa): a majority vote over 3 GPT-judge Yes/No outputs, plus PEDANT when configured.

Reproduces upstream ``src/evaluator/qa.py``: lower-case the outputs, take the most common one, and count the item
correct iff it is exactly ``"yes"`` (so ``"Yes."`` is a no). Upstream breaks a tie (three distinct outputs) by set
iteration order, which changes with Python's hash seed; here the tie is broken by a draw from the caller's seeded
``rng`` (the house rule for upstream randomness, see ``Score``) and the item is ``parsed=False`` when that draw decides
the outcome (``"yes"`` is among the tied). The ``panda`` half needs ``qa_metrics==0.2.17`` and its classifier files,
which we never download: it is computed only when the user supplies them (``$SPEECHLM_EVAL_PEDANT_DIR``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.judged import judge_outputs_for
from speechlm_eval.scoring.registry import Scorer

PEDANT_DIR_ENV = "SPEECHLM_EVAL_PEDANT_DIR"
# The two joblib pickles qa_metrics' PEDANT loads (and would otherwise download from GitHub on first use).
PEDANT_FILES = ("lr_classifier.pkl", "tf-idf_vectorizer.pkl")
PEDANT_VERSION = "0.2.17"  # the version VoiceBench pins; PEDANT's verdicts change between versions

# (references, candidate, question) -> correct?; qa_metrics' PEDANT.evaluate
PedantFn = Callable[[list[str], str, str], bool]


def majority_vote(outputs: Sequence[str], rng: random.Random) -> tuple[str, bool]:
    """``(winner, tie_decides)``: the most common lower-cased output, ties drawn from ``rng`` in first-seen order.

    ``tie_decides`` is True when the tied outputs include ``"yes"``, i.e. when upstream's answer would depend on
    the hash seed.
    """
    lowered = [o.lower() for o in outputs]
    counts = Counter(lowered)
    top = max(counts.values())
    tied = [o for o in dict.fromkeys(lowered) if counts[o] == top]
    if len(tied) == 1:
        return tied[0], False
    return rng.choice(tied), "yes" in tied


def score(item: Any, response: str, rng: random.Random) -> Score:
    """1.0 when the judges' majority answer is exactly ``yes`` (case-insensitive), else 0.0.

    ``details`` holds the lower-cased votes and, when PEDANT is configured, its verdict on the response.
    """
    outputs = judge_outputs_for(item, response)
    winner, tie_decides = majority_vote(outputs, rng)
    details: dict[str, Any] = {"votes": [o.lower() for o in outputs]}
    pedant, _ = pedant_status()
    if pedant is not None:
        # Upstream lower-cases all three before PEDANT sees them.
        details["panda"] = bool(pedant([str(item.reference).lower()], response.lower(), item.text.lower()))
    return Score(value=float(winner == "yes"), parsed=not tie_decides, extracted=winner, details=details)


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, Any]:
    """``{"panda": 100*mean, "gpt": 100*mean(vote)}`` as upstream; without PEDANT, ``panda_note`` replaces ``panda``."""
    # np.mean(...) * 100 in upstream's order so floats agree to the last bit; NaN for no items, as np.mean([]).
    gpt = float(np.mean([s.value for s in scores]) * 100) if scores else float("nan")
    _, note = pedant_status()
    if scores and all("panda" in s.details for s in scores):
        result: dict[str, Any] = {"panda": float(np.mean([s.details["panda"] for s in scores]) * 100), "gpt": gpt}
    else:
        result = {"gpt": gpt}
        note = note or "panda omitted: PEDANT was not available when these items were scored"
    if note:
        result["panda_note"] = note
    return result


def pedant_status() -> tuple[PedantFn | None, str | None]:
    """PEDANT's ``evaluate`` (or ``None``) and a note for the metric dict: why panda is absent, or a version warning."""
    return _load_pedant(os.environ.get(PEDANT_DIR_ENV) or None)


@functools.cache
def _load_pedant(directory: str | None) -> tuple[PedantFn | None, str | None]:
    if directory is None:
        return None, (f"panda omitted: PEDANT (qa_metrics=={PEDANT_VERSION}) is an opt-in extra; set "
                      f"{PEDANT_DIR_ENV} to a directory holding its classifier files {', '.join(PEDANT_FILES)}")
    try:
        import joblib
        from qa_metrics.pedant import PEDANT
    except ImportError as error:
        return None, (f"panda omitted: {PEDANT_DIR_ENV} is set but qa_metrics cannot be imported ({error}); "
                      f"install qa_metrics=={PEDANT_VERSION}")
    files = [Path(directory) / name for name in PEDANT_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        return None, f"panda omitted: classifier files not found: {', '.join(missing)}"
    # PEDANT() itself would fetch the pickles from GitHub when its package has none; build it without __init__ and
    # give it the user's files under the attribute names its evaluate() reads. [U: checked against qa_metrics
    # master's pedant.py, not the 0.2.17 wheel: a mismatch fails loudly at the first evaluate().]
    pedant = PEDANT.__new__(PEDANT)
    try:
        pedant.model = joblib.load(files[0])
        pedant.tokenizer = joblib.load(files[1])
    except Exception as error:  # noqa: BLE001 - unpickling can fail in many ways; the note names it
        return None, f"panda omitted: cannot load the classifier files from {directory}: {error}"
    try:
        version = importlib.metadata.version("qa_metrics")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    note = None if version == PEDANT_VERSION else (
        f"panda computed with qa_metrics {version}; VoiceBench's numbers come from {PEDANT_VERSION} and PEDANT's "
        "verdicts change between versions")
    return pedant.evaluate, note


SCORER = Scorer("qa", score, aggregate, primary="gpt", scale=100.0, judged=True)
