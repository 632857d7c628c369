"""The interface every text-to-speech engine implements, and a by-name registry so users can plug in new engines
without touching the core."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

OUTPUT_SAMPLING_RATE = 16000
"""Every engine returns audio at this rate (Hz), whatever its native rate: the speech models expect 16 kHz."""


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

_REGISTRY: dict[str, TTSFactory] = {}


def register_tts(name: str, factory: TTSFactory, *, replace: bool = False) -> None:
    """Make ``get_tts(name, **options)`` call ``factory(**options)``.

    Registering a different factory under a taken name raises ``ValueError`` unless ``replace=True``, so two plugins
    cannot silently shadow each other.
    """
    current = _REGISTRY.get(name)
    if current is not None and current is not factory and not replace:
        raise ValueError(f"a TTS engine named {name!r} is already registered ({current!r}); pass replace=True")
    _REGISTRY[name] = factory


def available_tts() -> list[str]:
    """Names of the registered TTS engines, sorted."""
    return sorted(_REGISTRY)


def get_tts(name: str, **options: Any) -> TTSEngine:
    """Build the engine registered as ``name`` with ``options`` (e.g. ``get_tts("espeak-ng", voice="en-gb")``)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(available_tts()) or "none"
        raise TTSError(f"unknown TTS engine {name!r}; registered engines: {known}")
    return factory(**options)


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
