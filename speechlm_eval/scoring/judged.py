"""What the judge-scored rules (VoiceBench's open-ended subsets and sd-qa) read: an LLM judge's outputs, attached to
the item and keyed by the exact response they judged. Pure lookups; calling a judge is :mod:`speechlm_eval.judge`'s."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

from speechlm_eval.rundir import ItemRow

JUDGE_NONE_NOTE = (
    "not judged (--judge none): the open and qa subsets need an LLM judge (VoiceBench uses gpt-4o-mini); "
    "their responses are in the records; judge them later with --judge openai:MODEL or --judge hf:PATH"
)


class MissingJudgement(LookupError):
    """A judged scorer was asked to score a response that has no judge outputs attached."""


def response_key(response: str) -> str:
    """How judge outputs are looked up: the sha256 of the exact response they judged."""
    return hashlib.sha256(response.encode("utf-8")).hexdigest()


def attach_judgements(item: Any, rows: Iterable[Mapping[str, Any]]) -> ItemRow:
    """The scorer-facing row of ``item`` whose ``judgements`` maps response sha256 -> judge outputs.

    ``rows`` are this item's judgement rows from any arms; judgements already on ``item`` are kept. Keying by the
    response (not the arm) lets ``Scorer.score(item, response, rng)`` find them, and gives identical responses in two
    arms identical judgements, as the cache does.
    """
    row = item if isinstance(item, ItemRow) else ItemRow.from_item(item)
    judgements = dict(row.judgements)
    for judgement in rows:
        if judgement["id"] != row.id:
            raise ValueError(f"judgement row for {judgement['id']!r} attached to item {row.id!r}")
        judgements[judgement["response_sha256"]] = list(judgement["outputs"])
    return row.with_judgements(judgements)


def judge_outputs_for(item: Any, response: str) -> list[str]:
    """The judge outputs attached to ``item`` for exactly ``response``; :class:`MissingJudgement` when none are."""
    judgements = getattr(item, "judgements", None) or {}
    outputs = judgements.get(response_key(response))
    if outputs is None:
        raise MissingJudgement(f"{item.id}: no judge outputs for this response; the {item.subset} subset is scored "
                               "by an LLM judge: judge the run (--judge openai:MODEL or hf:PATH) before scoring it")
    if not outputs:
        raise MissingJudgement(f"{item.id}: the judge returned no outputs for this response")
    return list(outputs)
