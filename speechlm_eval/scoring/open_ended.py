"""VoiceBench's ``open`` scorer (alpacaeval_full, commoneval, wildvoice): the GPT judge's mean 1-5 rating.

Reproduces upstream ``src/evaluator/open.py`` on the judge outputs attached to the item (see ``judge.py``). Each output
is read with ``float(s)``, else the first ``[[n]]`` in it. One deliberate difference: upstream raises
``NotImplementedError`` on an output that is neither (and so crashes the whole run); here that output is left out of
the means, its item is marked unparsed, and the metric dict says how many there were.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, Sequence

import numpy as np

from speechlm_eval.scoring.base import Score
from speechlm_eval.scoring.judged import judge_outputs_for
from speechlm_eval.scoring.registry import Scorer

RATING_PATTERN = re.compile(r"\[\[(\d+)\]\]")


def parse_rating(output: str) -> float | None:
    """The rating upstream reads from one judge output, or ``None`` where upstream would crash.

    ``float`` accepts any number (no clamping to 1-5, as upstream), surrounding whitespace, and also ``"nan"`` or
    ``"inf"``, which then propagate into the means exactly as they do upstream.
    """
    try:
        return float(output)
    except ValueError:
        pass
    match = RATING_PATTERN.search(output)
    if match is None:
        return None
    try:
        return float(int(match.group(1)))
    except OverflowError:  # hundreds of digits: no float holds it
        return None


def score(item: Any, response: str, rng: random.Random) -> Score:
    """The mean of the parsed ratings of this response's judge outputs (NaN when none parses); ``rng`` is unused.

    ``parsed`` is False when any output failed to parse; ``details["ratings"]`` holds every output's rating (``None``
    for the unparsed ones), which is what :func:`aggregate` averages.
    """
    outputs = judge_outputs_for(item, response)
    ratings = [parse_rating(o) for o in outputs]
    parsed = [r for r in ratings if r is not None]
    unparsed = [o for o, r in zip(outputs, ratings) if r is None]
    details: dict[str, Any] = {"ratings": ratings}
    if unparsed:
        details["unparsed_outputs"] = unparsed
    value = sum(parsed) / len(parsed) if parsed else math.nan
    return Score(value=value, parsed=not unparsed, extracted=tuple(ratings), details=details)


def aggregate(items: Sequence[Any], scores: Sequence[Score]) -> dict[str, Any]:
    """``{"gpt": mean}`` over every parsed rating of every item, flattened, as upstream (``np.mean``) averages them.

    When some outputs did not parse (where upstream crashes), ``unparsed_outputs`` counts them and ``note`` says so.
    """
    ratings = [r for s in scores for r in s.details["ratings"]]
    parsed = [r for r in ratings if r is not None]
    # np.mean over the flat list, as upstream, so the float agrees to the last bit; NaN for nothing, as np.mean([]).
    result: dict[str, Any] = {"gpt": float(np.mean(np.array(parsed, dtype=np.float64))) if parsed else math.nan}
    n_unparsed = len(ratings) - len(parsed)
    if n_unparsed:
        result["unparsed_outputs"] = n_unparsed
        result["note"] = (f"{n_unparsed} of {len(ratings)} judge outputs were neither a number nor [[n]]: upstream "
                          f"open.py raises NotImplementedError there; gpt is the mean of the other {len(parsed)}")
    return result


SCORER = Scorer("open", score, aggregate, primary="gpt", scale=1.0, judged=True, graded=True)
