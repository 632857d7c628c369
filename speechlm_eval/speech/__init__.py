"""Speech synthesis for items that have text but no audio: a TTS engine interface and lazy table, the espeak-ng
engine, and a content-addressed on-disk cache (``CachedTTS``) in front of any engine."""

from speechlm_eval.speech.cache import CachedTTS, CorruptCacheEntry, cache_key, default_cache_root
from speechlm_eval.speech.engine import (
    OUTPUT_SAMPLING_RATE,
    TTSEngine,
    TTSError,
    available_tts,
    get_tts,
    register_tts,
)
from speechlm_eval.speech.espeak import EspeakEngine

__all__ = [
    "OUTPUT_SAMPLING_RATE",
    "CachedTTS",
    "CorruptCacheEntry",
    "EspeakEngine",
    "TTSEngine",
    "TTSError",
    "available_tts",
    "cache_key",
    "default_cache_root",
    "get_tts",
    "register_tts",
]
