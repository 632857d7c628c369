"""The organism's headline numbers, measured on the saved checkpoints through ``load_model`` (as ``gap`` loads them).

Forgetting = typed accuracy of the text LLM − typed accuracy of the speech LLM; inequivalence = typed − spoken
accuracy of the speech LLM (held-out voice); both as paired gaps in points with a bootstrap 95% CI and exact McNemar.
Hearing = the perception probe's entity accuracy on the evaluation audio, which separates "misheard" from "heard but
answered worse".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from speechlm_eval.data.item import Item
from speechlm_eval.metrics.paired import paired_gap
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.organism.evaluate import hearing_summary, spoken_scores, transcribe, typed_scores
from speechlm_eval.data.organism_world import MCQ


def mcq_items(mcqs: Sequence[MCQ], subset: str = "organism_mcq") -> list[Item]:
    return [Item(id=f"organism/dev/{i}", subset=subset, text=m.prompt, reference=m.answer) for i, m in enumerate(mcqs)]


def measure(
    text_dir: Path,
    speech_dir: Path,
    items: Sequence[Item],
    eval_clips: Sequence[np.ndarray],
    speech_mcqs: Sequence[MCQ],
    speech_clips: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Accuracies (fractions), hearing and the two paired gaps (points). ``eval_clips[i]`` speaks ``items[i].text``;
    ``speech_mcqs`` are fresh renderings of speech-split facts (trained from audio), spoken in ``speech_clips``."""
    options = LoadOptions(device="cpu", dtype="float32")
    text_llm = load_model(str(text_dir), options)
    speech_llm = load_model(str(speech_dir), options)
    text_typed, _ = typed_scores(text_llm, items)
    speech_typed, _ = typed_scores(speech_llm, items)
    speech_spoken, spoken_replies = spoken_scores(speech_llm, items, eval_clips)
    transcripts = transcribe(speech_llm, eval_clips)
    hearing = hearing_summary(transcripts, [i.text or "" for i in items], [i.meta["entity"] for i in items])
    trained_items = mcq_items(speech_mcqs)
    trained_spoken, _ = spoken_scores(speech_llm, trained_items, speech_clips)
    trained_typed, _ = typed_scores(speech_llm, trained_items)
    forgetting = paired_gap(text_typed, speech_typed, scale=100.0)
    inequivalence = paired_gap(speech_typed, speech_spoken, scale=100.0)
    return {
        "n_eval": len(items),
        "text_llm_typed": float(text_typed.mean()),
        "speech_llm_typed": float(speech_typed.mean()),
        "speech_llm_spoken": float(speech_spoken.mean()),
        "spoken_right_typed_wrong": int(((speech_spoken == 1) & (speech_typed == 0)).sum()),
        "hearing_eval_heldout_voice": hearing,
        "speech_split_spoken": float(trained_spoken.mean()),
        "speech_split_typed": float(trained_typed.mean()),
        "forgetting_points": forgetting.to_dict(),
        "inequivalence_points": inequivalence.to_dict(),
        "examples": [
            {"prompt": i.text, "reference": i.reference, "spoken_reply": r, "transcript": t}
            for i, r, t in list(zip(items, spoken_replies, transcripts))[:5]
        ],
    }
