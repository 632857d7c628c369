"""The silent-audio guard: did the speech LLM hear its audio at all?

A speech arm fed silence (a broken loader, a wrong sampling rate, a TTS engine that wrote nothing) still answers, and
its low score reads as a large *inequivalence*. Two signals, from the run's records alone, say it is a broken front
end instead (lmms-eval PR #1081 shipped such a run):

- **misheard**: in the perception probe (``records/perception.jsonl``) most of the subset's clips are misheard
  (WER above the "misheard" bucket's bound, 0.3);
- **audio-independent answers**: the speech arm gives the same answer to most different clips, while the same model
  given the same items as text does not (or, for items without a text arm, while their references differ):
  identical answers across different clips cannot depend on the clips.

A subset with either is a *front-end failure*: reports and the terminal say so before any number, its inequivalence is
marked as such rather than read as a modality gap, and ``speechlm-eval check`` fails the candidate.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Mapping

from speechlm_eval.rundir import PERCEPTION, SPEECH_ARM, SPEECH_LLM_TEXT, RunDir

MISHEARD_WER = 0.3  # the lower bound of the perception table's "misheard" bucket
MISHEARD_SHARE = 0.5  # more than half of the probed clips misheard
CONSTANT_SHARE = 0.9  # one answer for at least 90% of different clips
MIN_ITEMS = 10  # below this, a repeated answer is no evidence


def _norm(response: Any) -> str:
    return " ".join(str(response).lower().split())


def mode_share(responses: Iterable[Any]) -> tuple[float | None, str | None]:
    """``(share, answer)`` of the most common normalised response (``(None, None)`` for no responses)."""
    counts = Counter(_norm(r) for r in responses)
    if not counts:
        return None, None
    answer, count = counts.most_common(1)[0]
    return count / sum(counts.values()), answer


def _answers(records: Mapping[str, Mapping[str, Any]], ids: list[str]) -> list[Any]:
    return [records[i]["response"] for i in ids if i in records and records[i].get("error") is None
            and records[i].get("response") is not None]


def subset_front_end(ids: list[str], perception: Mapping[str, Mapping[str, Any]],
                     speech: Mapping[str, Mapping[str, Any]], text: Mapping[str, Mapping[str, Any]],
                     references: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The guard's evidence and verdict for one subset's item ids (records keyed by item id).

    A constant speech answer counts against the audio path only where a constant answer is not expected: the text arm
    varies, or (no text arm) the references vary. A model that rightly answers "A" to items whose answer is "A" is
    not flagged.
    """
    probed = [float(perception[i]["wer"]) for i in ids if i in perception and perception[i].get("error") is None
              and perception[i].get("wer") is not None]
    misheard = sum(w > MISHEARD_WER for w in probed) / len(probed) if probed else None
    speech_answers = _answers(speech, ids)
    speech_share, speech_answer = mode_share(speech_answers)
    text_answers = _answers(text, ids)
    text_share, _ = mode_share(text_answers)
    refs = [references[i] for i in ids if references is not None and references.get(i) is not None]
    reference_share, _ = mode_share(refs)
    varied = (text_share < CONSTANT_SHARE if text_share is not None
              else reference_share is not None and len(refs) >= MIN_ITEMS and reference_share < CONSTANT_SHARE)
    reasons = []
    if misheard is not None and misheard > MISHEARD_SHARE:
        mean_wer = sum(probed) / len(probed)
        reasons.append(f"{misheard:.0%} of {len(probed)} clips misheard in the perception probe (WER > "
                       f"{MISHEARD_WER:g}; mean WER {mean_wer:.2f})")
    if speech_share is not None and len(speech_answers) >= MIN_ITEMS and speech_share >= CONSTANT_SHARE and varied:
        versus = (f"; given the text it does so for {text_share:.0%}" if text_share is not None
                  else f"; the most common reference covers {reference_share:.0%}")
        reasons.append(f"the speech arm gives the same answer ({speech_answer!r}) to {speech_share:.0%} of "
                       f"{len(speech_answers)} different clips{versus}: its answers do not depend on the audio")
    return {"failure": bool(reasons), "reasons": reasons, "misheard_share": misheard, "n_probed": len(probed),
            "speech_mode_share": speech_share, "text_mode_share": text_share, "n_speech": len(speech_answers)}


def front_end_results(run: RunDir) -> dict[str, dict[str, Any]]:
    """``{subset: evidence and verdict}`` for every subset with speech-arm records (results.json ``front_end``)."""
    speech = run.records(SPEECH_ARM)
    if not speech:
        return {}
    perception, text = run.records(PERCEPTION), run.records(SPEECH_LLM_TEXT)
    ids_by_subset: dict[str, list[str]] = {}
    references: dict[str, Any] = {}
    for row in run.items(with_judgements=False):
        ids_by_subset.setdefault(row.subset, []).append(row.id)
        references[row.id] = None if row.reference is None else json.dumps(row.reference, sort_keys=True)
    return {subset: subset_front_end(ids, perception, speech, text, references)
            for subset, ids in ids_by_subset.items() if any(i in speech for i in ids)}


def front_end_failures(run: RunDir) -> dict[str, list[str]]:
    """``{subset: reasons}`` of the subsets whose audio the speech LLM did not hear."""
    return {subset: entry["reasons"] for subset, entry in front_end_results(run).items() if entry["failure"]}


def failure_lines(front_end: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Plain-text lines, one per failed subset, for reports and the terminal (empty when every front end works)."""
    return [f"{subset}: {'; '.join(entry['reasons'])}" for subset, entry in front_end.items() if entry.get("failure")]


FRONT_END_TITLE = "FRONT-END FAILURE: the speech LLM did not hear the audio"
FRONT_END_HEADLINE = ("The speech-arm scores and the inequivalence of {subsets} measure a broken audio path (silence, a "
                      "wrong sampling rate, a failed loader), not a modality gap; fix the audio before reading them.")
