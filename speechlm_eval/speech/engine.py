"""The interface every text-to-speech engine implements, and a lazy by-name table so users can plug in new engines
without touching the core."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.registry import Registry

OUTPUT_SAMPLING_RATE = SAMPLING_RATE  # every engine returns 16 kHz audio, whatever its native rate


class TTSError(RuntimeError):
    """Speech synthesis failed or cannot start; the message says why and, where possible, what to do."""


@runtime_checkable
class TTSEngine(Protocol):
    """Turns text into 16 kHz mono float32 speech.

    Read-only attributes (plain attributes or properties both satisfy them):
        name: the registry name of the engine (e.g. ``"espeak-ng"``).
        voice: the engine's voice identifier (e.g. ``"en-us"``).
        rate: speaking rate in the engine's own unit (words per minute for espeak-ng).
        sampling_rate: always :data:`OUTPUT_SAMPLING_RATE` (16000).
    """

    @property
    def name(self) -> str: ...

    @property
    def voice(self) -> str: ...

    @property
    def rate(self) -> int: ...

    @property
    def sampling_rate(self) -> int: ...

    def synthesize(self, text: str) -> np.ndarray:
        """Speak ``text``; returns float32 samples in [-1, 1], shape ``(n,)``, at ``sampling_rate``.

        Raises :class:`TTSError` when the text cannot be spoken (e.g. it is empty) or the engine fails.
        """
        ...

    def cache_key_fields(self) -> dict[str, Any]:
        """Everything that determines the audio besides the text (engine, engine version, voice, rate, pitch, ...),
        as JSON-serialisable values: two engines with equal fields must produce identical audio for the same text."""
        ...


TTSFactory = Callable[..., TTSEngine]

# An engine is one file defining its factory plus one row here; each is imported when first asked for.
TTS_ENGINES: Registry[TTSFactory] = Registry(
    "TTS engine",
    {"espeak-ng": "speechlm_eval.speech.espeak:EspeakEngine"},
    unknown=lambda name, known: TTSError(f"unknown TTS engine {name!r}; registered engines: {', '.join(known) or 'none'}"),
)


def register_tts(name: str, factory: TTSFactory | str, *, replace: bool = False) -> None:
    """Make ``get_tts(name, **options)`` call ``factory(**options)`` (``factory`` may be a ``"module:object"`` row).

    Registering a different factory under a taken name raises ``ValueError`` unless ``replace=True``, so two plugins
    cannot silently shadow each other.
    """
    TTS_ENGINES.register(name, factory, replace=replace)


def available_tts() -> list[str]:
    """Names of the registered TTS engines, sorted."""
    return TTS_ENGINES.names()


def get_tts(name: str, **options: Any) -> TTSEngine:
    """Build the engine registered as ``name`` with ``options`` (e.g. ``get_tts("espeak-ng", voice="en-gb")``)."""
    return TTS_ENGINES.get(name)(**options)


def check_engine_audio(audio: object, engine_name: str) -> np.ndarray:
    """Return ``audio`` if it obeys the engine contract (1-D float32, finite, non-empty), else raise TTSError.

    Used where audio from arbitrary (plug-in) engines enters the pipeline, so a faulty engine fails loudly at the
    source instead of as a shape error deep inside a model.
    """
    if not isinstance(audio, np.ndarray) or audio.dtype != np.float32 or audio.ndim != 1:
        got = f"{type(audio).__name__}" + (f" {audio.dtype} {audio.shape}" if isinstance(audio, np.ndarray) else "")
        raise TTSError(f"TTS engine {engine_name!r} must return a 1-D float32 numpy array, got {got}")
    if audio.size == 0:
        raise TTSError(f"TTS engine {engine_name!r} returned no samples")
    if not np.all(np.isfinite(audio)):
        raise TTSError(f"TTS engine {engine_name!r} returned non-finite samples")
    return audio
