"""Judge-free diagnostics, run after the arms: distribution gaps per token, and a perception probe.

1. **Distribution gaps** (no answer extraction, no judge): teacher-forced on one fixed response per item (the text
   LLM's own greedy answer; the speech LLM's text-arm answer when no text LLM is given), the per-token KL and JSD
   between the speech LLM's next-token distributions given the *speech* vs given the *text* query (inequivalence at
   the distribution level), and between the text LLM and the speech LLM given the text (forgetting at the distribution
   level). Written to ``records/diagnostics.jsonl``.
2. **Perception probe**: the speech LLM is asked to transcribe each item's audio; the WER (jiwer) against the text that
   was spoken separates "misheard" from "heard but answered worse". Written to ``records/perception.jsonl``.
Both resume like the arms: items already recorded are not recomputed.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.backbone import shared_vocabulary
from speechlm_eval.data.item import KEY_PHRASE, Item
from speechlm_eval.distributed import process_state, shard
from speechlm_eval.divergence import token_jsd, token_kl
from speechlm_eval.models.base import GenerationConfig, Prompt, SpeechLM
from speechlm_eval.progress import stage
from speechlm_eval.records import RecordWriter
from speechlm_eval.rundir import DIAGNOSTICS, PERCEPTION, SPEECH_LLM_TEXT, TEXT_LLM_TEXT, RunDir
from speechlm_eval.runner import audio_length, batches, error_record

PROBE_INSTRUCTION = "Transcribe the speech in the audio exactly."  # our choice; configurable with --probe-instruction


def normalise_for_wer(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces: WER counts words heard, not formatting."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER after :func:`normalise_for_wer`; an empty reference gives 0 (nothing to hear)."""
    import jiwer

    ref, hyp = normalise_for_wer(reference), normalise_for_wer(hypothesis)
    if not ref:
        return 0.0
    return float(jiwer.wer(ref, hyp if hyp else "<empty>"))


def phrase_heard(transcript: str, phrase: str) -> bool:
    """True when the normalised ``phrase`` occurs as whole words in the normalised transcript."""
    return f" {normalise_for_wer(phrase)} " in f" {normalise_for_wer(transcript)} "


def token_divergences(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-row mean KL(p‖q) and JSD(p, q) at temperature 1 over the masked positions of one batch.

    ``p_logits``/``q_logits``: ``(batch, len, vocab)`` (cut to a common vocabulary); ``mask``: ``(batch, len)`` bool.
    Every masked token of the batch goes through one divergence call (in chunks), then each row averages its own;
    a row without masked tokens gets NaN.
    """
    mask = mask.bool()
    kl = token_kl(p_logits, q_logits, mask)  # (n_masked,), in row-major order of the mask
    jsd = token_jsd(p_logits, q_logits, mask)
    counts = mask.sum(dim=1)
    rows = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), counts)

    def row_means(values: torch.Tensor) -> list[float]:
        sums = torch.zeros(mask.shape[0], dtype=torch.float64, device=values.device)
        sums.index_add_(0, rows, values.double())
        return [float(s / n) if n else float("nan") for s, n in zip(sums.tolist(), counts.tolist())]

    return row_means(kl), row_means(jsd)


def _common_vocab(*models: SpeechLM) -> int:
    return min(len(m.tokenizer) for m in models)  # type: ignore[attr-defined]


def _my_share(run_dir: Path, name: str, todo: list[Item]) -> tuple[Path, list[Item]]:
    """This process's records file and disjoint share of the items (several processes under torchrun/accelerate).

    Callers build ``todo`` from what the run directory already holds; the barrier keeps any process from writing this
    stage's records before every process has read them, so all shard the same list.
    """
    state = process_state()
    state.wait_for_everyone()
    path = RunDir(run_dir).records_path(name, state.process_index, state.num_processes)
    return path, shard(todo, state.process_index, state.num_processes)


@torch.no_grad()
def run_distribution_diagnostics(
    run_dir: Path,
    items: Sequence[Item],
    speech_llm: SpeechLM,
    text_llm: SpeechLM | None,
    audio_source: Callable[[Item], Any],
    *,
    batch_size: int = 8,
    max_tokens: int = 256,
    system: str | None = None,
    reference_arm: str | None = None,
) -> None:
    """KL/JSD per item on its fixed response; skipped where the response is missing or the audio fails.

    Text LLM vs speech LLM is compared over the tokens both vocabularies share (:func:`shared_vocabulary`), each
    side's distribution renormalised over that support when the vocabularies differ (audio tokens, reassigned special
    ids); a record says why when the comparison cannot be made (``kl_text_llm_vs_speech_llm_skipped``).

    ``reference_arm``: whose answers are the fixed responses (default: the text LLM's when it is given, else the
    speech LLM's text-arm answers); a served text LLM without logits still provides its answers, with
    ``text_llm=None``.
    """
    if reference_arm is None:
        reference_arm = TEXT_LLM_TEXT if text_llm is not None else SPEECH_LLM_TEXT
    run = RunDir(run_dir)
    responses = run.records(reference_arm)
    shared = shared_vocabulary(speech_llm.tokenizer, text_llm.tokenizer) if text_llm is not None else None  # type: ignore[attr-defined]
    done = run.completed_ids(DIAGNOSTICS)
    path, todo = _my_share(run_dir, DIAGNOSTICS, [
        i for i in items if i.has_text_equivalent and i.id not in done
        and responses.get(i.id, {}).get("error") is None and responses.get(i.id, {}).get("response")])
    todo = sorted(todo, key=lambda i: -audio_length(i))  # similar clip lengths share a batch: least padding
    tokenizer = speech_llm.tokenizer  # type: ignore[attr-defined]
    # Nothing left (the speech arm's prompt cache did it all, or a resume): no stage line of 0 items.
    shown = stage("diagnostics: KL/JSD", total=len(todo), enabled=process_state().is_main_process and bool(todo))
    with shown, RecordWriter(path) as writer:
        for batch in batches(todo, batch_size):
            records, ready, audio_prompts = [], [], []
            for item in batch:
                try:
                    audio_prompts.append(Prompt(audio=audio_source(item), system=system))
                    ready.append(item)
                except Exception as error:  # noqa: BLE001 - the item's own error record
                    records.append(error_record(DIAGNOSTICS, item, error))
            if ready:
                targets = [tokenizer(responses[i.id]["response"], add_special_tokens=False)["input_ids"][:max_tokens]
                           for i in ready]
                keep = [k for k, t in enumerate(targets) if t]
                ready = [ready[k] for k in keep]
                targets = [targets[k] for k in keep]
                audio_prompts = [audio_prompts[k] for k in keep]
            if ready:
                text_prompts = [Prompt(text=i.text, system=system) for i in ready]
                try:
                    records += _divergence_records(ready, text_prompts, audio_prompts, targets, speech_llm,
                                                   text_llm, shared, reference_arm)
                except Exception:  # noqa: BLE001 - e.g. a clip over the window: retry one by one
                    for item, tp, ap, tg in zip(ready, text_prompts, audio_prompts, targets):
                        try:
                            records += _divergence_records([item], [tp], [ap], [tg], speech_llm,
                                                           text_llm, shared, reference_arm)
                        except Exception as item_error:  # noqa: BLE001
                            records.append(error_record(DIAGNOSTICS, item, item_error))
            writer.write_many(records)
            shown.advance(len(batch))


def _divergence_records(items, text_prompts, audio_prompts, targets, speech_llm, text_llm, shared, reference_arm,
                        given_speech=None):
    """The diagnostics records of one batch; ``given_speech``: the speech LLM's logits over ``targets`` after the
    audio prompts when already computed (from the speech arm's prompt cache), else computed here."""
    vocab = _common_vocab(speech_llm)
    given_text, _, mask = speech_llm.continuation_logits(text_prompts, targets)
    if given_speech is None:
        given_speech, _, _ = speech_llm.continuation_logits(audio_prompts, targets)
    kl_st, jsd_st = token_divergences(given_text[..., :vocab], given_speech[..., :vocab], mask)
    kl_tl = jsd_tl = [None] * len(items)
    skipped: list[str | None] = [None] * len(items)
    if text_llm is not None and shared.identical:
        vocab = _common_vocab(speech_llm, text_llm)
        teacher, _, _ = text_llm.continuation_logits(text_prompts, targets)
        kl_tl, jsd_tl = token_divergences(teacher[..., :vocab], given_text[..., :vocab], mask)
    elif text_llm is not None:
        kl_tl, jsd_tl, skipped = _shared_support_divergences(text_llm, text_prompts, targets, given_text, mask, shared)
    records = []
    for k, item in enumerate(items):
        record = {
            "id": item.id, "subset": item.subset, "arm": DIAGNOSTICS, "error": None,
            "response_from": reference_arm, "n_tokens": int(mask[k].sum()),
            "kl_text_vs_speech": kl_st[k], "jsd_text_vs_speech": jsd_st[k],
            "kl_text_llm_vs_speech_llm": kl_tl[k], "jsd_text_llm_vs_speech_llm": jsd_tl[k],
        }
        if text_llm is not None and not shared.identical:
            record["text_llm_support"] = "shared vocabulary, renormalised"
        if skipped[k]:
            record["kl_text_llm_vs_speech_llm_skipped"] = skipped[k]
        records.append(record)
    return records


def _shared_support_divergences(text_llm, text_prompts, targets, given_text, mask, shared):
    """Text LLM vs speech LLM over the shared vocabulary: the response's tokens mapped to the text LLM's ids by
    string, both distributions restricted to the shared ids and renormalised there (a log-softmax over the subset).

    An item whose response holds a token the text LLM does not have cannot be teacher-forced token for token on both
    sides; it gets no value and the reason instead."""
    to_text = dict(zip(shared.speech_ids, shared.text_ids))
    n = len(targets)
    kl, jsd, skipped = [None] * n, [None] * n, [None] * n
    mappable = [k for k, t in enumerate(targets) if all(i in to_text for i in t)]
    for k in set(range(n)) - set(mappable):
        skipped[k] = "the response holds tokens the text LLM's vocabulary lacks"
    if not mappable:
        return kl, jsd, skipped
    teacher, _, teacher_mask = text_llm.continuation_logits([text_prompts[k] for k in mappable],
                                                           [[to_text[i] for i in targets[k]] for k in mappable])
    device = given_text.device
    speech_ids = torch.tensor(shared.speech_ids, device=device)
    text_ids = torch.tensor(shared.text_ids, device=teacher.device)
    student = given_text[mappable][..., speech_ids]
    kl_m, jsd_m = token_divergences(teacher[..., text_ids].to(device), student, mask[mappable])
    for j, k in enumerate(mappable):
        kl[k], jsd[k] = kl_m[j], jsd_m[j]
    return kl, jsd, skipped


def run_perception_probe(
    run_dir: Path,
    items: Sequence[Item],
    speech_llm: SpeechLM,
    audio_source: Callable[[Item], Any],
    *,
    instruction: str = PROBE_INSTRUCTION,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    system: str | None = None,
) -> None:
    """Transcripts + WER of each item's audio against the text that was spoken (items with a text equivalent).

    Each transcript's new-token budget is :func:`probe_budget` of the spoken text, at most ``max_new_tokens``; items
    are batched among those of the same budget (longest clips first), so a transcript never depends on its batch.
    """
    done = RunDir(run_dir).completed_ids(PERCEPTION)
    path, todo = _my_share(run_dir, PERCEPTION, [i for i in items if i.id not in done and i.text_to_speak()])
    budgets = {i.id: probe_budget(spoken_tokens(speech_llm, i.text_to_speak() or ""), max_new_tokens) for i in todo}
    todo = sorted(todo, key=lambda i: (-budgets[i.id], -audio_length(i)))
    shown = stage("perception probe", total=len(todo), enabled=process_state().is_main_process and bool(todo))
    with shown, RecordWriter(path) as writer:
        for budget, group in itertools.groupby(todo, key=lambda i: budgets[i.id]):
            _probe_group(list(group), budget, speech_llm, audio_source, instruction, batch_size, system, writer,
                         shown)


PROBE_BUDGET_STEP = 16  # budgets are rounded up to a multiple of this, so items fall into few batch groups


def probe_budget(spoken_tokens: int, limit: int) -> int:
    """New-token budget of one transcript: twice the spoken text's tokens plus 8 (a faithful transcript needs about
    as many tokens as the text; what runs past twice that is babble, and the probe's longest generation), rounded up
    to a multiple of :data:`PROBE_BUDGET_STEP`, never above ``limit``."""
    return max(1, min(limit, PROBE_BUDGET_STEP * math.ceil((2 * spoken_tokens + 8) / PROBE_BUDGET_STEP)))


def spoken_tokens(model: SpeechLM, text: str) -> int:
    """Tokens of ``text`` in the model's vocabulary (two per word for a model without a local tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return 2 * len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _probe_group(todo: list[Item], budget: int, speech_llm: SpeechLM, audio_source: Callable[[Item], Any],
                 instruction: str, batch_size: int, system: str | None, writer: RecordWriter, shown: Any) -> None:
    """The probe's records of items sharing one new-token budget, a batch at a time."""
    generation = GenerationConfig(max_new_tokens=budget)
    for batch in batches(todo, batch_size):
        records, ready, prompts = [], [], []
        for item in batch:
            try:
                prompts.append(Prompt(audio=audio_source(item), text=instruction, system=system))
                ready.append(item)
            except Exception as error:  # noqa: BLE001
                records.append(error_record(PERCEPTION, item, error))
        outputs: list[Any] = []
        if ready:
            try:
                outputs = speech_llm.generate(prompts, generation)
            except Exception:  # noqa: BLE001 - isolate the culprit
                outputs = []
                for item, prompt in zip(ready, prompts):
                    try:
                        outputs.append(speech_llm.generate([prompt], generation)[0])
                    except Exception as error:  # noqa: BLE001
                        outputs.append(error)
        for item, out in zip(ready, outputs):
            if isinstance(out, Exception):
                records.append(error_record(PERCEPTION, item, out))
                continue
            records.append(probe_record(item, out.text))
        writer.write_many(records)
        shown.advance(len(batch))


def probe_record(item: Item, transcript: str) -> dict[str, Any]:
    """The perception record of one item's transcript."""
    record = {"id": item.id, "subset": item.subset, "arm": PERCEPTION, "error": None,
              "transcript": transcript, "wer": word_error_rate(item.text_to_speak() or "", transcript)}
    if item.meta.get(KEY_PHRASE):
        record["key_heard"] = phrase_heard(transcript, str(item.meta[KEY_PHRASE]))
    return record


class SpeechArmDiagnostics:
    """The KL/JSD pass and the perception probe run on top of the speech arm's prompts, batch by batch.

    The speech arm's ``generate`` keeps its prompts' cache (:mod:`speechlm_eval.models.prompt_cache`); the speech
    LLM's logits over each fixed response and the transcript then cost only their own tokens, not the clip's audio
    tokens again. :meth:`answer` is :func:`~speechlm_eval.runner.answer_batch` for ``run_arm`` plus that work; it
    writes this process's diagnostics and perception records as each batch finishes. It is an acceleration only:
    whatever it leaves (an item whose prompt differs from the passes' own, a batch that failed, a reference answered
    after the speech arm) the separate passes, which run after the arms and skip recorded items, do as before.

    Use as a context manager (it holds the two record files open).
    """

    def __init__(self, run_dir: Path, speech_llm: SpeechLM, text_llm: SpeechLM | None, *,
                 reference_arm: str | None = None, system: str | None = None,
                 instruction: str = PROBE_INSTRUCTION, probe_max_new_tokens: int = 128, max_tokens: int = 256,
                 ) -> None:
        self.run = RunDir(run_dir)
        self.speech_llm, self.text_llm = speech_llm, text_llm
        self.reference_arm = reference_arm or (TEXT_LLM_TEXT if text_llm is not None else SPEECH_LLM_TEXT)
        self.system, self.instruction = system, instruction
        self.probe_max_new_tokens, self.max_tokens = probe_max_new_tokens, max_tokens
        self.shared = (shared_vocabulary(speech_llm.tokenizer, text_llm.tokenizer)  # type: ignore[attr-defined]
                       if text_llm is not None else None)
        self.responses: dict[str, dict[str, Any]] | None = None
        self._writers: dict[str, RecordWriter] = {}
        self._done: dict[str, set[str]] = {}
        self._written: dict[str, int] = {}
        self._pending: tuple[list[Item], list[Prompt], Any] | None = None

    def __enter__(self) -> "SpeechArmDiagnostics":
        state = process_state()
        for name in (DIAGNOSTICS, PERCEPTION):
            self._done[name] = self.run.completed_ids(name)
            self._written[name] = 0
            path = self.run.records_path(name, state.process_index, state.num_processes)
            self._writers[name] = RecordWriter(path)
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self._writers.values():
            writer.close()
        if any(self._written.values()) and process_state().is_main_process:
            logging.getLogger(__name__).info(
                "on the speech arm's prompts: %d KL/JSD record(s), %d transcript(s) (this process)",
                self._written[DIAGNOSTICS], self._written[PERCEPTION])

    def answer(self, plan: Any, batch: Sequence[Item], generation: GenerationConfig,
               audio_source: Callable[[Item], Any]) -> list[dict[str, Any]]:
        """The speech arm's records of ``batch``, and its diagnostics and perception records written on the way."""
        from speechlm_eval.runner import answer_batch

        if self.responses is None:  # read at the first batch: every process has finished the earlier arms by then
            self.responses = self.run.stream_records(self.reference_arm)
        self._pending = None

        def keep_prompts(items: list[Item], prompts: list[Prompt]) -> list[Any]:
            outputs, state = plan.model.generate_keeping_prompt(prompts, generation)
            self._pending = (items, prompts, state)
            return outputs

        records = answer_batch(plan, batch, generation, audio_source, generate=keep_prompts)
        if self._pending is not None:
            items, prompts, state = self._pending
            self._pending = None
            window = getattr(plan.model, "max_audio_seconds", None) if plan.truncate_audio else None
            usable = [k for k, (item, prompt) in enumerate(zip(items, prompts))
                      if item.has_text_equivalent and prompt.text is None and prompt.system == self.system
                      and not (window and len(prompt.audio) >= int(window * SAMPLING_RATE))]
            try:
                self._divergences(items, prompts, state, usable)
                self._probe(items, prompts, state, usable)
            except Exception as error:  # noqa: BLE001 - the separate passes redo what is left, with error records
                logging.getLogger(__name__).info("diagnostics on the speech arm's prompts stopped (%s); the separate "
                                                 "passes will run what is left", error)
        return records

    @torch.no_grad()
    def _divergences(self, items: list[Item], prompts: list[Prompt], state: Any, usable: list[int]) -> None:
        """KL/JSD records of the batch's rows whose fixed response is known (teacher-forced after the cached
        prompts; the text sides as in :func:`run_distribution_diagnostics`)."""
        assert self.responses is not None
        targets: list[list[int]] = [[] for _ in items]
        rows = []
        for k in usable:
            item = items[k]
            answer = self.responses.get(item.id, {})
            if item.id in self._done[DIAGNOSTICS] or answer.get("error") is not None or not answer.get("response"):
                continue
            ids = self.speech_llm.tokenizer(answer["response"], add_special_tokens=False)["input_ids"]  # type: ignore[attr-defined]
            if ids[: self.max_tokens]:
                targets[k] = ids[: self.max_tokens]
                rows.append(k)
        if not rows:
            return
        given_speech, _, _ = state.continuation_logits(targets)  # width: the chosen rows' longest (others have none)
        given_speech = given_speech[torch.tensor(rows, device=given_speech.device)]
        chosen = [items[k] for k in rows]
        records = _divergence_records(chosen, [Prompt(text=i.text, system=self.system) for i in chosen],
                                      [prompts[k] for k in rows], [targets[k] for k in rows], self.speech_llm,
                                      self.text_llm, self.shared, self.reference_arm, given_speech=given_speech)
        self._write(DIAGNOSTICS, records)

    @torch.no_grad()
    def _probe(self, items: list[Item], prompts: list[Prompt], state: Any, usable: list[int]) -> None:
        """Perception records of the batch's rows: transcripts generated after the cached clips."""
        rows = [k for k in usable if items[k].text_to_speak() and items[k].id not in self._done[PERCEPTION]]
        if not rows:
            return
        budgets = [probe_budget(spoken_tokens(self.speech_llm, items[k].text_to_speak() or ""),
                                self.probe_max_new_tokens) for k in rows]
        if len(rows) < len(items):
            state = state.select(rows)
        asked = [Prompt(audio=prompts[k].audio, text=self.instruction, system=self.system) for k in rows]
        outputs = state.generate(asked, GenerationConfig(max_new_tokens=max(budgets)), budgets=budgets)
        self._write(PERCEPTION, [probe_record(items[k], out.text) for k, out in zip(rows, outputs)])

    def _write(self, name: str, records: list[dict[str, Any]]) -> None:
        self._writers[name].write_many(records)
        self._done[name].update(r["id"] for r in records)
        self._written[name] += len(records)
