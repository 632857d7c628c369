"""What a scorer returns for one item, and the signature every scorer follows."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True)
class Score:
    """The score of one response to one item.

    Attributes:
        value: the item's score on the subset metric's scale (1.0/0.0 for accuracy-style metrics). Where the official
            scorer would fall back to an unseeded random draw, ``value`` holds the result of a *seeded* draw so the
            official-compatible number is reproducible, and ``parsed`` is False.
        parsed: False when the official rule extracted nothing from the response (reported as ``fail``).
        extracted: what the rule produced (a letter, a 0/1 label, a refusal flag, ...), ``None`` when unparsed.
        details: extra per-item values some metrics need (e.g. ifeval's strict/loose flags).
    """

    value: float
    parsed: bool = True
    extracted: Any = None
    details: Mapping[str, Any] = field(default_factory=dict)


def item_rng(seed: int, *keys: str) -> random.Random:
    """A random generator determined by ``seed`` and the keys (e.g. item id and arm), independent of scoring order."""
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# (item, response, rng) -> Score; ``item`` is a speechlm_eval.data.item.Item.
ScorerFn = Callable[[Any, str, random.Random], Score]


def accuracy_and_fail(name: str, scores: Sequence[Score]) -> dict[str, float]:
    """``{"acc": 100 * mean(value), "fail": 100 * share unparsed}`` as VoiceBench's mcq/bbh evaluators compute them.

    Same operation order as upstream (correct / total * 100) so floats agree to the last bit; an empty subset is an
    error (the official evaluators divide by the item count and crash).
    """
    if not scores:
        raise ValueError(f"{name}: cannot aggregate zero scores")
    n = len(scores)
    return {
        "acc": sum(s.value for s in scores) / n * 100,
        "fail": 100 * sum(not s.parsed for s in scores) / n,
    }
