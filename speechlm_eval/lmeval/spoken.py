"""Spoken log-likelihood multiple choice: any lm-eval ``multiple_choice`` task asked as speech vs as text.

For each document, lm-eval's zero-shot context (the task's description, if any, then ``doc_to_text``) is spoken with our
TTS, and each choice (``doc_to_choice``) is scored by its summed log-likelihood as the assistant's reply, given

- ``speech_llm_text_ll``: the context as TEXT (``Prompt(text=context)``), and
- ``speech_llm_speech_ll``: the context as AUDIO (``Prompt(audio=tts(context))``),

both through the same speech-LLM adapter and its chat template, so the only difference between the two arms is the
modality of the context: their paired gap is the task's **inequivalence**.

The text arm here is NOT lm-eval's own prompt: lm-eval scores ``context + " " + choice`` as raw text, while this
module scores ``choice`` as the reply of a chat turn (no target delimiter). Compare ``speech_llm_text_ll`` only with
``speech_llm_speech_ll``; the forgetting arms (``text_llm_text`` / ``speech_llm_text``, lm-eval's raw prompt) come
from :mod:`speechlm_eval.lmeval.run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import ModelInputError, Prompt, SpeechLM
from speechlm_eval.progress import stage
from speechlm_eval.rundir import LMEVAL_SPOKEN_ARMS

SPOKEN_ARMS: tuple[str, str] = LMEVAL_SPOKEN_ARMS
NO_LABEL = -100  # lm-eval's index for a target that is not among the choices: never equal to a prediction


@dataclass(frozen=True)
class ChoiceDoc:
    """One multiple-choice document of an lm-eval task.

    Attributes:
        task: the lm-eval (leaf) task name.
        doc_id: lm-eval's ``doc_id`` (position in the task's evaluation split), as in its logged samples.
        context: the zero-shot context lm-eval builds (description + ``doc_to_text``).
        choices: ``doc_to_choice``, as given (no target delimiter).
        gold: indices of the correct choices (one unless the task has several targets); ``NO_LABEL`` for a target that
            is not among the choices, which lm-eval scores as wrong.
    """

    task: str
    doc_id: int
    context: str
    choices: tuple[str, ...]
    gold: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"lmeval/{self.task}/{self.doc_id}"

    @property
    def subset(self) -> str:
        return f"lmeval:{self.task}"


class UnsupportedTask(ValueError):
    """A task the spoken arm cannot ask (not ``multiple_choice``, or several contexts per document)."""


def choice_docs(task: Any, task_name: str, limit: int | float | None = None) -> list[ChoiceDoc]:
    """The documents of an lm-eval ``multiple_choice`` task as lm-eval would evaluate them (same ``doc_id``s/limit)."""
    from lm_eval.evaluator_utils import get_sample_size

    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
        raise UnsupportedTask(f"{task_name}: output_type is {getattr(task, 'OUTPUT_TYPE', None)!r}, "
                              "not multiple_choice")
    if getattr(task, "multiple_input", False):
        raise UnsupportedTask(f"{task_name}: several contexts per document (e.g. winogrande) cannot be one spoken turn")
    docs = []
    for doc_id, doc in task.doc_iterator(limit=get_sample_size(task, limit)):
        context = task.fewshot_context(doc, num_fewshot=0)
        choices = tuple(str(c) for c in task.doc_to_choice(doc))
        gold = gold_indices(task.doc_to_target(doc), choices)
        docs.append(ChoiceDoc(task_name, int(doc_id), str(context), choices, gold))
    return docs


def gold_indices(target: int | str | Sequence[int | str], choices: Sequence[str]) -> tuple[int, ...]:
    """Correct choice indices from ``doc_to_target`` (an index, a choice string, or a list of either), as lm-eval."""
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    indices = []
    for t in targets:
        if isinstance(t, str):
            indices.append(choices.index(t) if t in choices else NO_LABEL)
        else:
            indices.append(int(t) if 0 <= int(t) < len(choices) else NO_LABEL)
    return tuple(indices)


def choice_scores(loglikelihoods: Sequence[float], doc: ChoiceDoc) -> dict[str, Any]:
    """lm-eval's ``acc`` and ``acc_norm`` of one doc from its choices' summed log-likelihoods, shape ``(n_choices,)``.

    ``acc``: the argmax choice is a gold one; ``acc_norm``: the argmax of log-likelihood divided by the choice's length
    in characters (lm-eval's ``ConfigurableTask.process_results``).
    """
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in doc.choices])
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
    return {"acc": float(pred in doc.gold), "acc_norm": float(pred_norm in doc.gold), "pred": pred,
            "pred_norm": pred_norm}


def choice_loglikelihoods(
    model: SpeechLM, docs: Sequence[ChoiceDoc], prompts: Mapping[str, Prompt], batch_size: int
) -> dict[str, list[float] | str]:
    """Summed log-likelihood of each choice of each doc given ``prompts[doc.id]``, or an error message for that doc.

    Docs are batched whole (all their choices in one batch, ``batch_size`` rows or one doc's choices, whichever is
    more). A batch the model refuses (:class:`ModelInputError`) is retried one doc at a time, so only the docs at
    fault get an error.
    """
    out: dict[str, list[float] | str] = {}
    spoken = any(prompts[d.id].audio is not None for d in docs)
    with stage(f"lm-eval {'spoken' if spoken else 'typed'} log-likelihood", total=len(docs), unit="docs") as shown:
        for chunk in _doc_batches(docs, batch_size):
            try:
                out.update(_score_batch(model, chunk, prompts))
            except ModelInputError:
                for doc in chunk:
                    try:
                        out.update(_score_batch(model, [doc], prompts))
                    except ModelInputError as error:
                        out[doc.id] = str(error)
            shown.advance(len(chunk))
    return out


def spoken_records(
    model: SpeechLM,
    docs: Sequence[ChoiceDoc],
    speak: Callable[[str], np.ndarray],
    batch_size: int = 8,
) -> dict[str, list[dict[str, Any]]]:
    """Records of both spoken arms, ``{arm: [record per doc]}``, in ``docs`` order.

    ``speak`` turns a context into 16 kHz mono float32 audio (e.g. ``CachedTTS(get_tts("espeak-ng")).synthesize``).
    A context whose speech the model cannot take whole (longer than ``model.max_audio_seconds``, the encoder window)
    or that cannot be spoken gets an error record in the speech arm; its text record stays, and the pair is left out
    of the inequivalence.
    """
    from speechlm_eval.speech import TTSError

    text_arm, speech_arm = SPOKEN_ARMS
    text_prompts = {d.id: Prompt(text=d.context) for d in docs}
    speech_prompts: dict[str, Prompt] = {}
    audio_seconds: dict[str, float] = {}
    speech_errors: dict[str, str] = {}
    for doc in docs:
        try:
            audio = np.asarray(speak(doc.context), dtype=np.float32)
        except TTSError as error:
            speech_errors[doc.id] = f"TTS failed: {error}"
            continue
        seconds = audio.size / SAMPLING_RATE
        audio_seconds[doc.id] = seconds
        window = model.max_audio_seconds
        if window is not None and seconds > window + 1e-9:
            # Checked here so one long clip does not send its whole batch down the one-doc-at-a-time path.
            speech_errors[doc.id] = (f"spoken context is {seconds:.2f} s long but the audio encoder window is "
                                     f"{window:g} s")
            continue
        speech_prompts[doc.id] = Prompt(audio=audio)
    text_lls = choice_loglikelihoods(model, docs, text_prompts, batch_size)
    speakable = [d for d in docs if d.id in speech_prompts]
    speech_lls = {**speech_errors, **choice_loglikelihoods(model, speakable, speech_prompts, batch_size)}
    return {
        text_arm: [_record(d, text_arm, text_lls[d.id]) for d in docs],
        speech_arm: [_record(d, speech_arm, speech_lls[d.id], audio_seconds.get(d.id)) for d in docs],
    }


def _record(doc: ChoiceDoc, arm: str, result: list[float] | str, seconds: float | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"id": doc.id, "subset": doc.subset, "arm": arm, "task": doc.task, "doc_id": doc.doc_id,
                              "gold": list(doc.gold), "n_choices": len(doc.choices)}
    if arm == SPOKEN_ARMS[1]:
        record["audio_seconds"] = seconds
    if isinstance(result, str):
        return {**record, "acc": None, "acc_norm": None, "loglikelihoods": None, "error": result}
    return {**record, **choice_scores(result, doc), "loglikelihoods": result, "error": None}


def _doc_batches(docs: Sequence[ChoiceDoc], batch_size: int) -> Iterable[list[ChoiceDoc]]:
    chunk: list[ChoiceDoc] = []
    rows = 0
    for doc in docs:
        if chunk and rows + len(doc.choices) > batch_size:
            yield chunk
            chunk, rows = [], 0
        chunk.append(doc)
        rows += len(doc.choices)
    if chunk:
        yield chunk


def _score_batch(model: SpeechLM, docs: Sequence[ChoiceDoc], prompts: Mapping[str, Prompt]) -> dict[str, list[float]]:
    rows = [(prompts[d.id], choice) for d in docs for choice in d.choices]
    logprobs = model.continuation_logprobs([p for p, _ in rows], [c for _, c in rows])
    sums = iter(float(np.sum(lp, dtype=np.float64)) for lp in logprobs)
    return {d.id: [next(sums) for _ in d.choices] for d in docs}
