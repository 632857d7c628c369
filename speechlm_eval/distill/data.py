"""Distillation data: Open-Orca-format rows, the filter that keeps what can be spoken, the spoken questions (TTS),
the target responses (dataset or teacher), and the check that no distillation question is an evaluation item.

Every threshold here is *our reading* (the paper only says items that cannot be spoken sensibly were filtered); the
defaults are listed in :data:`FILTER_DEFAULTS` so the run manifest and report can show them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.progress import stage

FIELDS = ("id", "system_prompt", "question", "response")
BUNDLED = "bundled"

# Our reading, not the paper's: how long a spoken question may be and what counts as unspeakable.
FILTER_DEFAULTS: dict[str, Any] = {
    "max_words": 60,  # question words; espeak-ng at 160 wpm speaks 60 words in ~23 s, inside a 30 s audio window
    "max_chars": 400,  # question characters
    "max_response_words": 400,  # longer responses are dropped (targets are also cut to max_response_tokens)
    "max_symbol_ratio": 0.08,  # share of code/math symbols among the question's non-space characters
    "max_non_latin_ratio": 0.3,  # share of letters outside Latin script (an English voice cannot read them)
}
FILTER_REASONS = ("code", "table", "not_speakable", "too_long")


class DistillDataError(ValueError):
    """Distillation data that cannot be used as given: a missing field, a bad row, an unreadable source."""


class LeakageError(ValueError):
    """A distillation question is also an evaluation item: training on it would inflate the measured recovery."""


@dataclass(frozen=True, eq=False)
class DistillExample:
    """One distillation example (an Open-Orca row).

    Attributes:
        id: unique, stable id; Open-Orca's prefix names the FLAN sub-mix (``flan.``, ``niv.``, ``cot.``, ``t0.``).
        system_prompt: the system message ("" = the chat template's default system turn).
        question: the user's query: read as text by the teacher and in T→T, spoken by TTS for S→T.
        response: the target reply the losses are computed on (dataset response or the teacher's own generation).
        audio: the spoken question, 16 kHz mono float32, shape ``(n_samples,)``; ``None`` until synthesised.
    """

    id: str
    system_prompt: str
    question: str
    response: str
    audio: np.ndarray | None = None

    def to_row(self) -> dict[str, str]:
        """The JSON-safe fields (no audio)."""
        return {"id": self.id, "system_prompt": self.system_prompt, "question": self.question,
                "response": self.response}


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_distill_data(source: str | Path, max_examples: int | None = None, seed: int = 0) -> list[DistillExample]:
    """Read distillation rows from ``source``.

    Args:
        source: ``"bundled"`` (the ~40-row sample shipped with the package), a local ``.jsonl`` or ``.parquet`` file,
            or a Hugging Face hub dataset id in Open-Orca's format (e.g. ``Open-Orca/OpenOrca``) or a local dataset
            directory, either streamed through ``datasets`` (split ``train``).
        max_examples: read at most this many rows (before filtering); ``None`` = all. From a local file the rows are a
            seeded random subset kept in file order; from the hub, the first rows of a seeded buffer shuffle.
        seed: the subset / shuffle seed.

    Raises:
        DistillDataError: an unreadable file, a row without one of ``id``, ``system_prompt``, ``question``,
            ``response`` (the message names file, row and field), a non-string field, or a repeated id.
    """
    if max_examples is not None and max_examples < 1:
        raise DistillDataError(f"max_examples must be at least 1, got {max_examples}")
    source = str(source)
    if source == BUNDLED:
        path = resources.files("speechlm_eval.distill") / "bundled_orca.jsonl"
        rows = list(_jsonl_rows(path.read_text(encoding="utf-8").splitlines(), "bundled_orca.jsonl"))
        examples = _subset([_example(r, "bundled_orca.jsonl", i) for i, r in rows], max_examples, seed)
    elif source.endswith((".jsonl", ".parquet")) or Path(source).expanduser().is_file():
        examples = _subset(_read_local(Path(source).expanduser()), max_examples, seed)
    else:  # a hub id, or a local dataset directory (``datasets`` reads both the same way)
        examples = _read_hub(source, max_examples, seed)
    _check_unique_ids(examples, source)
    return examples


def _read_local(path: Path) -> list[DistillExample]:
    if not path.is_file():
        raise DistillDataError(f"distillation data file {path} does not exist")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_example(row, str(path), i) for i, row in _jsonl_rows(lines, str(path))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for bad files
            raise DistillDataError(f"cannot read parquet file {path}: {error}") from error
        missing = [f for f in FIELDS if f not in table.column_names]
        if missing:
            raise DistillDataError(f"{path}: missing field(s) {missing}; columns are {table.column_names}")
        return [_example(row, str(path), i) for i, row in enumerate(table.select(list(FIELDS)).to_pylist(), 1)]
    raise DistillDataError(f"{path}: distillation data must be a .jsonl or .parquet file")


def _jsonl_rows(lines: Sequence[str], origin: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DistillDataError(f"{origin}: row {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DistillDataError(f"{origin}: row {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _example(row: Mapping[str, Any], origin: str, number: int) -> DistillExample:
    for name in FIELDS:
        if name not in row:
            raise DistillDataError(f"{origin}: row {number}: missing field {name!r} (need {', '.join(FIELDS)})")
        value = row[name]
        if name == "system_prompt" and value is None:
            continue
        if not isinstance(value, str):
            got = type(value).__name__
            raise DistillDataError(f"{origin}: row {number}: field {name!r} must be a string, got {got}")
    if not row["id"].strip() or not row["question"].strip() or not row["response"].strip():
        raise DistillDataError(f"{origin}: row {number}: 'id', 'question' and 'response' must not be empty")
    return DistillExample(str(row["id"]), row["system_prompt"] or "", row["question"], row["response"])


def _read_hub(dataset_id: str, max_examples: int | None, seed: int) -> list[DistillExample]:
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split="train", streaming=True)
    except Exception as error:  # hub/network errors come in many types: re-raise naming the source
        raise DistillDataError(f"cannot open hub dataset {dataset_id!r}: {error}") from error
    missing = [f for f in FIELDS if stream.column_names is not None and f not in stream.column_names]
    if missing:
        raise DistillDataError(f"{dataset_id}: missing field(s) {missing}; columns are {stream.column_names}")
    stream = stream.shuffle(seed=seed, buffer_size=10_000)
    if max_examples is not None:
        stream = stream.take(max_examples)
    return [_example(row, dataset_id, i) for i, row in enumerate(stream, 1)]


def _subset(examples: list[DistillExample], max_examples: int | None, seed: int) -> list[DistillExample]:
    if max_examples is None or max_examples >= len(examples):
        return examples
    chosen = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_examples])
    return [examples[i] for i in chosen]


def _check_unique_ids(examples: Sequence[DistillExample], origin: str) -> None:
    repeated = [i for i, n in Counter(e.id for e in examples).items() if n > 1]
    if repeated:
        raise DistillDataError(f"{origin}: repeated id(s) {repeated[:5]}; ids key the teacher cache and must be unique")


# ---------------------------------------------------------------------------------------------------------------------
# What can be spoken

_FENCE = re.compile(r"```|~~~")
_CODE_LINE = re.compile(
    r"(^|\n|:\s)\s*(def |class \w+|import \w+|from \w+ import|#include|function\s*\w*\(|public static|"
    r"SELECT .+ FROM|console\.log|print\(|return [^.]*;|for\s*\(.*;.*;|<\?php|<html|<div)"
)
_BRACED = re.compile(r"\{[^{}]*[:;=][^{}]*\}")  # JSON objects, code blocks, CSS rules
_TABLE = re.compile(r"\|\s*:?-{3,}:?\s*\||^\s*\|.*\|.*\|\s*$", re.MULTILINE)
_URL = re.compile(r"https?://|www\.\w|\b\w+\.(com|org|net|html)\b", re.IGNORECASE)
_LATEX = re.compile(r"\$[^$]+\$|\\(frac|sqrt|sum|int|alpha|beta|cdot|times|left|right)\b")
_CODE_SYMBOLS = set("{}[]<>;=_\\|^$#@~`*/+")


def symbol_ratio(text: str) -> float:
    """Share of the non-space characters of ``text`` that are code or math symbols."""
    chars = [c for c in text if not c.isspace()]
    return sum(c in _CODE_SYMBOLS for c in chars) / len(chars) if chars else 0.0


def non_latin_ratio(text: str) -> float:
    """Share of the letters of ``text`` that are not Latin script."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum("LATIN" not in unicodedata.name(c, "") for c in letters) / len(letters)


def unspeakable_reason(
    example: DistillExample,
    *,
    max_words: int = FILTER_DEFAULTS["max_words"],
    max_chars: int = FILTER_DEFAULTS["max_chars"],
    max_response_words: int | None = FILTER_DEFAULTS["max_response_words"],
    max_symbol_ratio: float = FILTER_DEFAULTS["max_symbol_ratio"],
    max_non_latin_ratio: float = FILTER_DEFAULTS["max_non_latin_ratio"],
) -> str | None:
    """Why ``example`` cannot be used as a spoken query (one of :data:`FILTER_REASONS`), or ``None`` when it can.

    Code and tables are looked for in the question *and* the response (a code answer to a spoken question is not a
    reply a voice assistant gives); URLs, math, foreign scripts and length only matter in the question, which is spoken.
    """
    question, response = example.question, example.response
    both = question + "\n" + response
    if (
        _FENCE.search(both)
        or _CODE_LINE.search(both)
        or _BRACED.search(both)
        or symbol_ratio(response) > 2 * max_symbol_ratio
    ):
        return "code"
    if _TABLE.search(both):
        return "table"
    if (
        _URL.search(question)
        or _LATEX.search(question)
        or symbol_ratio(question) > max_symbol_ratio
        or non_latin_ratio(question) > max_non_latin_ratio
    ):
        return "not_speakable"
    if len(question.split()) > max_words or len(question) > max_chars:
        return "too_long"
    if max_response_words is not None and len(response.split()) > max_response_words:
        return "too_long"
    return None


def filter_speakable(
    examples: Iterable[DistillExample], **thresholds: Any
) -> tuple[list[DistillExample], dict[str, int]]:
    """Keep the examples whose question can be spoken sensibly (see :func:`unspeakable_reason`).

    Args:
        examples: the candidates.
        **thresholds: overrides of :data:`FILTER_DEFAULTS` (``max_words``, ``max_chars``, ``max_response_words``,
            ``max_symbol_ratio``, ``max_non_latin_ratio``).

    Returns:
        ``(kept, counts)``; ``counts`` has ``total``, ``kept`` and one entry per reason in :data:`FILTER_REASONS`
        (zero when nothing was dropped for it). The first matching reason counts.
    """
    unknown = set(thresholds) - set(FILTER_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown filter threshold(s) {sorted(unknown)}; known: {sorted(FILTER_DEFAULTS)}")
    counts = {"total": 0, "kept": 0, **{reason: 0 for reason in FILTER_REASONS}}
    kept = []
    for example in examples:
        counts["total"] += 1
        reason = unspeakable_reason(example, **thresholds)
        if reason is None:
            kept.append(example)
            counts["kept"] += 1
        else:
            counts[reason] += 1
    return kept, counts


# ---------------------------------------------------------------------------------------------------------------------
# Speech and targets


def synthesize_questions(
    examples: Sequence[DistillExample], tts: Any, max_seconds: float | None, *, keep_audio: bool = True
) -> tuple[list[DistillExample], dict[str, int]]:
    """Speak each question with ``tts`` and drop the clips the student's audio window would truncate.

    Args:
        examples: the (filtered) examples.
        tts: a TTS engine, normally ``CachedTTS(get_tts("espeak-ng", ...))``, outputting 16 kHz float32.
        max_seconds: the student's audio window (``model.max_audio_seconds``); ``None`` = no limit.
        keep_audio: attach the audio to the returned examples; ``False`` keeps memory flat for large sets (the
            training loop re-reads each clip from the TTS cache per batch).

    Returns:
        ``(kept, counts)`` with ``counts = {"audio_too_long": n}``.
    """
    kept, too_long = [], 0
    with stage("distill data: TTS", total=len(examples), unit="questions") as shown:
        for example in examples:
            audio = tts.synthesize(example.question)
            shown.advance()
            if max_seconds is not None and len(audio) / SAMPLING_RATE > max_seconds + 1e-9:
                too_long += 1
                continue
            kept.append(replace(example, audio=audio if keep_audio else None))
    return kept, {"audio_too_long": too_long}


def attach_audio(examples: Sequence[DistillExample], tts: Any) -> list[DistillExample]:
    """The examples with their spoken question attached (a cache read when they were synthesised before)."""
    return [e if e.audio is not None else replace(e, audio=tts.synthesize(e.question)) for e in examples]


def teacher_targets(
    examples: Sequence[DistillExample], teacher: Any, *, max_new_tokens: int, batch_size: int = 8
) -> tuple[list[DistillExample], dict[str, int]]:
    """Replace each response by the teacher's own greedy reply to the text question (``--targets teacher``).

    Args:
        teacher: a loaded text model (``SpeechLM`` adapter with ``.generate``).

    Returns:
        ``(examples, counts)``; replies that are empty after stripping are dropped and counted as ``empty_target``.
    """
    from speechlm_eval.models.base import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens)
    out, empty = [], 0
    with stage("distill data: teacher targets", total=len(examples), unit="examples") as shown:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            generations = teacher.generate([text_prompt(e) for e in batch], config)
            for example, generation in zip(batch, generations):
                if generation.text.strip():
                    out.append(replace(example, response=generation.text))
                else:
                    empty += 1
            shown.advance(len(batch))
    return out, {"empty_target": empty}


def text_prompt(example: DistillExample):
    """The text query as a model prompt (the teacher's input, and the student's in T→T)."""
    from speechlm_eval.models.base import Prompt

    return Prompt(text=example.question, system=example.system_prompt or None)


def speech_prompt(example: DistillExample, system_with_audio: bool = True):
    """The spoken query as a model prompt (the student's input in S→T); the system prompt stays text: its system
    turn, or, for a student that takes no system turn beside audio (``system_with_audio`` false: Voxtral), text in
    the user turn after the audio."""
    from speechlm_eval.models.base import Prompt

    if example.audio is None:
        raise ValueError(f"example {example.id!r} has no audio; synthesise its question first")
    if not system_with_audio:
        return Prompt(audio=example.audio, text=example.system_prompt or None)
    return Prompt(audio=example.audio, system=example.system_prompt or None)


# ---------------------------------------------------------------------------------------------------------------------
# Leakage


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what two queries must share to count as the same."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(text.split())


def check_no_leakage(examples: Iterable[DistillExample], eval_items: Iterable[Any], *, show: int = 5) -> None:
    """Raise :class:`LeakageError` when a distillation question equals an evaluation item's query.

    ``eval_items`` are :class:`speechlm_eval.data.item.Item` s; an item's ``text`` and (when set) the text its audio
    speaks are compared after :func:`normalize_text`. The message lists the first ``show`` overlapping id pairs.
    """
    queries: dict[str, str] = {}
    for item in eval_items:
        for text in (item.text, getattr(item, "speak", None)):
            if text:
                queries.setdefault(normalize_text(text), item.id)
    overlaps = [(e.id, queries[key]) for e in examples if (key := normalize_text(e.question)) in queries]
    if overlaps:
        listed = ", ".join(f"{d} = {v}" for d, v in overlaps[:show])
        more = f" and {len(overlaps) - show} more" if len(overlaps) > show else ""
        raise LeakageError(
            f"{len(overlaps)} distillation question(s) are evaluation items (distill id = eval id): {listed}{more}; "
            "remove them from the distillation data"
        )


def write_examples(path: Path, examples: Iterable[DistillExample]) -> None:
    """Write examples (without audio) as JSONL, atomically."""
    from speechlm_eval.records import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(e.to_row(), ensure_ascii=False) + "\n" for e in examples))
