"""The one record every benchmark loader produces: an evaluation item, independent of any model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

# Optional ``Item.meta`` key: the words whose hearing decides the item (e.g. an entity's name). The perception probe
# then also reports whether the speech LLM's transcript contains them, beside the WER of the whole prompt.
KEY_PHRASE = "key_phrase"


@dataclass(frozen=True)
class AudioRef:
    """Where an item's audio comes from: a decoded array, encoded bytes, a file path, or a deferred read.

    Exactly one of ``array`` (float, shape ``(n_samples,)``, mono, at ``sampling_rate``), ``data`` (encoded bytes of
    a file such as WAV/FLAC), ``path`` or ``fetch`` is normally set. ``fetch`` reads the clip from its source when its
    batch runs and returns an eager AudioRef (a dataset row's cell), so a run does not hold every clip in memory;
    ``origin`` then names the source row and ``seconds`` its duration (read at load, for sorting batches). Decoding and
    validation live in :mod:`speechlm_eval.data.audio`.
    """

    array: np.ndarray | None = None
    sampling_rate: int | None = None
    data: bytes | None = None
    path: str | None = None
    fetch: Callable[[], "AudioRef"] | None = field(default=None, compare=False, repr=False)
    origin: str | None = None
    seconds: float | None = None

    def describe(self) -> str:
        """A short human-readable origin, for error messages."""
        if self.origin:
            return self.origin
        if self.path:
            return self.path
        if self.data is not None:
            return f"<{len(self.data)} encoded bytes>"
        if self.array is not None:
            return f"<array of {len(self.array)} samples at {self.sampling_rate} Hz>"
        return "<no audio>"


@dataclass(frozen=True)
class Item:
    """One evaluation item.

    Attributes:
        id: unique within a run, stable across runs (e.g. ``"openbookqa/test/17"`` or an MMAU UUID).
        subset: the benchmark subset it belongs to (e.g. ``"openbookqa"``, ``"mmau"``); selects the scorer.
        text: the query as text (VoiceBench's ``prompt``): the whole user turn of the text arms, and what TTS speaks
            when the item has no audio. ``None`` when the item has no text equivalent.
        audio: the spoken query (or, for audio-understanding items, the clip to reason about), if the source has one.
        audio_instruction: text sent *together with* the audio in the speech arm (MMAU's question and choices);
            ``None`` for VoiceBench, whose spoken audio is the whole user turn.
        choices: answer options, where the format has them.
        reference: the gold answer in the source's own format (a letter, ``"yes"``, an MMAU choice string, ...).
        meta: every other source column (e.g. ifeval's ``instruction_id_list``/``kwargs``, MMAU's ``task``).
        speak: what TTS should say when the item has no audio, if not ``text`` (bundled audio-understanding items).
    """

    id: str
    subset: str
    text: str | None
    audio: AudioRef | None = None
    audio_instruction: str | None = None
    choices: tuple[str, ...] = ()
    reference: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    speak: str | None = None

    def text_to_speak(self) -> str | None:
        """The text a TTS engine should synthesise for this item when it has no audio."""
        return self.speak if self.speak is not None else self.text

    @property
    def has_text_equivalent(self) -> bool:
        """True when the item can be asked as text, i.e. the text arms apply."""
        return self.text is not None and self.audio_instruction is None
