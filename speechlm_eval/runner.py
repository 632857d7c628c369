"""The gap runner: every item answered three ways (arms), written as per-item records as batches finish.

Arms: ``text_llm_text`` (text LLM, text prompt), ``speech_llm_text`` (speech LLM, same text),
``speech_llm_speech`` (speech LLM, the item's audio, or TTS of its text when the source has no audio).
Runs resume after a kill, and shard over processes under torchrun / accelerate launch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.data.audio import clip_seconds
from speechlm_eval.data.item import Item
from speechlm_eval.distributed import process_state, shard
from speechlm_eval.models.base import GenerationConfig, Prompt, SpeechLM
from speechlm_eval.progress import stage
from speechlm_eval.records import RecordWriter
from speechlm_eval.rundir import ARM_BY_NAME, ARMS, RunDir

# (item) -> 16 kHz float32 audio for the speech arm; raises with a clear message when it cannot.
AudioSource = Callable[[Item], Any]


@dataclass
class ArmPlan:
    """One arm: which model answers, which items apply, and how a prompt is built."""

    name: str
    model: SpeechLM
    items: list[Item]
    with_audio: bool
    system: str | None = None  # the system turn every prompt of the run carries (None: the template's default)
    truncate_audio: bool = False  # cut clips to the encoder window (flagged in the record) instead of refusing them


def arms_for(items: Sequence[Item], speech_llm: SpeechLM, text_llm: SpeechLM | None,
             arms: Sequence[str] = ARMS, system: str | None = None, truncate_audio: bool = False) -> list[ArmPlan]:
    """The arm plans for these items. Items without a text equivalent (MMAU) only get the speech arm."""
    texty = [i for i in items if i.has_text_equivalent]
    models = {"speech_llm": speech_llm, "text_llm": text_llm}
    plans = []
    for name in arms:
        if name not in ARM_BY_NAME:
            raise ValueError(f"unknown arm {name!r}; arms are {ARMS}")
        arm = ARM_BY_NAME[name]
        if models[arm.model] is not None:
            # Audio arms take every item; text arms only those with a text equivalent (not MMAU).
            plans.append(ArmPlan(name, models[arm.model], list(items) if arm.audio else texty, with_audio=arm.audio,
                                 system=system, truncate_audio=truncate_audio and arm.audio))
    return plans


def build_prompt(item: Item, with_audio: bool, audio_source: AudioSource, system: str | None = None) -> Prompt:
    """The prompt an arm sends: the text alone, or the audio (+ the item's instruction for audio-understanding items),
    with the run's system turn."""
    if not with_audio:
        if item.text is None:
            raise ValueError(f"item {item.id} has no text prompt")
        return Prompt(text=item.text, system=system)
    return Prompt(audio=audio_source(item), text=item.audio_instruction, system=system)


@dataclass
class ArmProgress:
    """What one arm did in this process (for the summary line; never written into results)."""

    name: str
    total: int
    skipped: int = 0
    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    new_tokens: int = 0

    def rate(self, elapsed: float) -> str:
        """``"12.3 items/s · 98 tok/s"`` so far (one request per item for a served model, so items/s = requests/s)."""
        if elapsed <= 0:
            return ""
        return f"{self.done / elapsed:.1f} items/s · {self.new_tokens / elapsed:.0f} tok/s"


def run_arm(
    plan: ArmPlan,
    run_dir: Path,
    *,
    generation: GenerationConfig,
    batch_size: int,
    audio_source: AudioSource,
    progress: bool = True,
    answer: Callable[..., list[dict[str, Any]]] | None = None,
) -> ArmProgress:
    """Answer this process's share of the arm's pending items, appending a record per item as each batch finishes;
    ``progress`` shows the arm's progress (:func:`speechlm_eval.progress.stage`) on the main process.

    ``answer``: what turns a batch into records, called as :func:`answer_batch` is (the default); a caller may do
    more with each batch (``gap``'s diagnostics on top of the speech arm's prompts)."""
    answer = answer or answer_batch
    state = process_state()
    rank, world = state.process_index, state.num_processes
    run = RunDir(run_dir)
    done = run.completed_ids(plan.name)
    # Every process must shard the same pending list: none may append this arm's records before all have read them
    # (a rank that read another's fresh records would shard a shorter list, and items would fall between shards).
    state.wait_for_everyone()
    pending = [i for i in plan.items if i.id not in done]
    mine = shard(sorted_for_batching(pending, plan), rank, world)
    stats = ArmProgress(plan.name, total=len(mine), skipped=len(plan.items) - len(pending))
    start = time.perf_counter()
    shown = stage(plan.name, total=len(mine), enabled=progress and state.is_main_process)
    with shown, RecordWriter(run.records_path(plan.name, rank, world)) as writer:
        for batch in batches(mine, batch_size):
            records = answer(plan, batch, generation, audio_source)
            writer.write_many(records)
            stats.done += len(records)
            stats.errors += sum(r["error"] is not None for r in records)
            stats.new_tokens += sum(int(r.get("n_new_tokens") or 0) for r in records)
            rate = stats.rate(time.perf_counter() - start)
            shown.advance(len(records), postfix=f"{rate} · {stats.errors} errors" if stats.errors else rate)
    stats.seconds = time.perf_counter() - start
    return stats


def sorted_for_batching(items: Sequence[Item], plan: ArmPlan) -> list[Item]:
    """Longest prompts first (padding waste is smallest when similar lengths share a batch; OOM shows up at once).

    Text arms sort by tokenised prompt length; the speech arm by audio length, known from a decoded clip or, for
    audio still to be synthesised or decoded, estimated from the text spoken (TTS duration grows with it), then by
    the instruction's length."""
    def length(item: Item) -> tuple[float, int]:
        text = item.audio_instruction if plan.with_audio else item.text
        try:
            tokens = plan.model.prompt_length(Prompt(text=text or "", audio=None))
        except Exception:  # noqa: BLE001 - a prompt that cannot even be tokenised fails later with its own record
            tokens = 0
        return (audio_length(item) if plan.with_audio else 0.0, tokens)

    return sorted(items, key=lambda it: tuple(-v for v in length(it)))  # stable: ties keep item order


def audio_length(item: Item) -> float:
    """Seconds of the item's clip (its array, or its file's header: nothing is decoded), else the characters TTS will
    speak (the same order: TTS duration grows with the text), else 0 (a clip whose header cannot be read)."""
    if item.audio is None:
        return float(len(item.text_to_speak() or ""))
    return clip_seconds(item.audio) or 0.0


def batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def largest_fitting_batch(model: SpeechLM, items: Sequence[Item], audio_source: AudioSource, cap: int,
                          new_tokens: int, *, with_audio: bool) -> int:
    """The largest power of two up to ``cap`` at which the heaviest batch of ``items`` fits in the model's memory
    (lm-eval's ``--batch_size auto``: start at the cap, halve on out-of-memory).

    The trial is one teacher-forced forward pass of the longest prompts (audio when ``with_audio``) followed by
    ``new_tokens`` continuation tokens, with their logits (the KL/JSD pass's memory, which exceeds generation's);
    ``1`` when even a single prompt does not fit.
    """
    import torch

    plan = ArmPlan("auto", model, [i for i in items if with_audio or i.has_text_equivalent], with_audio=with_audio)
    heaviest = sorted_for_batching(plan.items, plan)[:cap]
    if not heaviest:
        return cap
    prompts = [build_prompt(item, with_audio, audio_source) for item in heaviest]
    pad = int(getattr(getattr(model, "tokenizer", None), "pad_token_id", None) or 0)
    size = cap
    while size > 1:
        trial = [prompts[k % len(prompts)] for k in range(size)]
        try:
            with torch.no_grad():
                model.continuation_logits(trial, [[pad] * new_tokens] * size)
            return size
        except torch.OutOfMemoryError:
            size //= 2
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 1


def answer_batch(plan: ArmPlan, batch: Sequence[Item], generation: GenerationConfig, audio_source: AudioSource,
                 *, generate: Callable[[list[Item], list[Prompt]], list[Any]] | None = None) -> list[dict[str, Any]]:
    """Records for one batch. A prompt that cannot be built, or a batch that fails, never loses the other items:
    a failing batch is retried item by item so only the culprit gets an error record.

    ``generate``: answers the whole batch's ready items and prompts (default: ``plan.model.generate`` with
    ``generation``); the item-by-item retry always calls ``plan.model.generate``."""
    records: list[dict[str, Any]] = []
    ready: list[tuple[Item, Prompt]] = []
    truncated: dict[str, float] = {}
    for item in batch:
        try:
            prompt = build_prompt(item, plan.with_audio, audio_source, plan.system)
            if plan.truncate_audio:
                prompt, seconds = truncate_to_window(prompt, plan.model.max_audio_seconds)
                if seconds is not None:
                    truncated[item.id] = seconds
            ready.append((item, prompt))
        except Exception as error:  # noqa: BLE001 - any per-item input problem becomes that item's error record
            records.append(error_record(plan.name, item, error))
    if not ready:
        return records
    try:
        if generate is not None:
            outputs = generate([i for i, _ in ready], [p for _, p in ready])
        else:
            outputs = plan.model.generate([p for _, p in ready], generation)
        records.extend(answer_record(plan.name, item, out) for (item, _), out in zip(ready, outputs))
    except Exception as batch_error:  # noqa: BLE001
        if len(ready) == 1:
            records.append(error_record(plan.name, ready[0][0], batch_error))
        else:
            for item, prompt in ready:
                try:
                    (out,) = plan.model.generate([prompt], generation)
                    records.append(answer_record(plan.name, item, out))
                except Exception as error:  # noqa: BLE001
                    records.append(error_record(plan.name, item, error))
    for record in records:
        if record["id"] in truncated and record.get("error") is None:
            record["audio_truncated_from_s"] = round(truncated[record["id"]], 3)
    return records


def truncate_to_window(prompt: Prompt, max_seconds: float | None) -> tuple[Prompt, float | None]:
    """The prompt with its clip cut to the encoder window (as VoiceBench's feature extractors silently do), and the
    clip's original length in seconds when it was cut."""
    if prompt.audio is None or max_seconds is None:
        return prompt, None
    limit = int(max_seconds * SAMPLING_RATE)
    if len(prompt.audio) <= limit:
        return prompt, None
    return dataclasses.replace(prompt, audio=prompt.audio[:limit]), len(prompt.audio) / SAMPLING_RATE


def answer_record(arm: str, item: Item, out: Any) -> dict[str, Any]:
    return {
        "id": item.id,
        "subset": item.subset,
        "arm": arm,
        "response": out.text,
        "error": None,
        "n_prompt_tokens": out.n_prompt_tokens,
        "n_new_tokens": out.n_new_tokens,
        "finish_reason": out.finish_reason,
    }


def error_record(arm: str, item: Item, error: BaseException) -> dict[str, Any]:
    return {
        "id": item.id,
        "subset": item.subset,
        "arm": arm,
        "response": None,
        "error": {"type": type(error).__name__, "message": f"item {item.id}: {error}"},
    }
