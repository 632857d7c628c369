"""A content-addressed on-disk cache of synthesised speech, safe for several processes at once, and ``CachedTTS``,
which puts it in front of any TTS engine.

Layout: ``root/ab/abcdef….wav`` (16 kHz mono 32-bit FLOAT WAV, so a cached read equals a fresh synthesis bit for bit)
next to ``abcdef….json`` (the text and engine fields, for humans; never read back). The key is the sha256 of a
canonical JSON of the engine's ``cache_key_fields()`` and the text.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import soundfile as sf

from speechlm_eval.paths import cache_root
from speechlm_eval.records import write_atomic
from speechlm_eval.speech.engine import OUTPUT_SAMPLING_RATE, TTSEngine, TTSError, check_engine_audio

log = logging.getLogger(__name__)

WAV_SUBTYPE = "FLOAT"


class CorruptCacheEntry(Exception):
    """A cache file exists but is not a complete, valid entry (truncated, garbage, wrong format)."""


def default_cache_root() -> Path:
    """``tts/`` under the cache root (:func:`speechlm_eval.paths.cache_root`)."""
    return cache_root() / "tts"


def cache_key(engine_fields: Mapping[str, Any], text: str) -> str:
    """sha256 hex digest of the canonical JSON (sorted keys, no whitespace, UTF-8) of ``engine_fields`` and ``text``."""
    try:
        canonical = json.dumps(
            {"engine": dict(engine_fields), "text": text},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise TTSError(f"cache_key_fields() must be JSON-serialisable: {exc}") from exc
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def entry_path(root: str | os.PathLike[str], key: str) -> Path:
    """Where the audio of ``key`` lives: ``root/<first two hex digits>/<key>.wav`` (sharded to keep folders small)."""
    return Path(root) / key[:2] / f"{key}.wav"


def read_entry(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The cached audio at ``path`` (float32, shape ``(n,)``), ``None`` if absent; CorruptCacheEntry if invalid."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    _check_riff_size(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate != OUTPUT_SAMPLING_RATE or f.channels != 1 or f.subtype != WAV_SUBTYPE:
                raise CorruptCacheEntry(f"{path}: {f.samplerate} Hz, {f.channels} channels, {f.subtype}")
            expected = f.frames
            audio = f.read(dtype="float32")
    except (RuntimeError, ValueError) as exc:  # LibsndfileError is a RuntimeError
        raise CorruptCacheEntry(f"{path}: {exc}") from exc
    if audio.ndim != 1 or audio.size == 0 or audio.size != expected or not np.all(np.isfinite(audio)):
        raise CorruptCacheEntry(f"{path}: {audio.size} of {expected} samples, or non-finite values")
    return audio


def write_entry(path: str | os.PathLike[str], audio: np.ndarray, info: Mapping[str, Any]) -> None:
    """Store ``audio`` at ``path`` (FLOAT WAV) and ``info`` beside it (``.json``), each atomically.

    Two processes writing the same key write identical bytes, so whichever ``os.replace`` lands last is fine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sf.write(buffer, audio, OUTPUT_SAMPLING_RATE, subtype=WAV_SUBTYPE, format="WAV")
    # Sidecar first: whoever sees the audio can then also find its description. No fsync: a file left torn by a
    # power cut is caught by read_entry's checks and re-synthesised, which is cheaper than syncing every entry.
    sidecar = json.dumps(dict(info), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    write_atomic(path.with_suffix(".json"), sidecar, durable=False)
    write_atomic(path, buffer.getvalue(), durable=False)


def discard_entry(path: str | os.PathLike[str]) -> None:
    """Remove a (corrupt) entry and its sidecar; missing files are fine (another process may have got there first)."""
    path = Path(path)
    for p in (path, path.with_suffix(".json")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a later write replaces it anyway, or warns in turn
            log.warning("could not remove TTS cache file %s: %s", p, exc)


class CachedTTS:
    """Any TTS engine with an on-disk cache in front; same interface as the engine it wraps.

    Args:
        engine: the engine that synthesises on a cache miss.
        root: cache directory; default :func:`default_cache_root`.

    ``hits`` and ``misses`` count how each ``synthesize`` call was served.
    """

    def __init__(self, engine: TTSEngine, root: str | os.PathLike[str] | None = None) -> None:
        if engine.sampling_rate != OUTPUT_SAMPLING_RATE:
            raise TTSError(f"TTS engine {engine.name!r} outputs {engine.sampling_rate} Hz, not {OUTPUT_SAMPLING_RATE}")
        self.engine = engine
        self.root = Path(root) if root is not None else default_cache_root()
        # Read once: the fields may be costly to compute (espeak-ng's version) and must not drift mid-run.
        self._fields = dict(engine.cache_key_fields())
        cache_key(self._fields, "")  # fail now, not on the first miss, if the fields are not JSON
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def voice(self) -> str:
        return self.engine.voice

    @property
    def rate(self) -> int:
        return self.engine.rate

    @property
    def sampling_rate(self) -> int:
        return self.engine.sampling_rate

    def cache_key_fields(self) -> dict[str, Any]:
        return dict(self._fields)

    def path_for(self, text: str) -> Path:
        """Where the audio of ``text`` is (or will be) cached."""
        return entry_path(self.root, cache_key(self._fields, text))

    def synthesize(self, text: str) -> np.ndarray:
        """The cached audio of ``text`` if there is a valid entry, else the engine's, stored for next time."""
        path = self.path_for(text)
        cached = self._load(path)
        if cached is not None:
            self.hits += 1
            return cached
        audio = check_engine_audio(self.engine.synthesize(text), self.engine.name)
        info = {
            "key": path.stem,
            "text": text,
            "engine": self._fields,
            "n_samples": int(audio.size),
            "sampling_rate": OUTPUT_SAMPLING_RATE,
            "subtype": WAV_SUBTYPE,
        }
        try:
            write_entry(path, audio, info)
        except OSError as exc:
            # The cache only saves time: an unwritable cache (read-only, disk full) must not stop an evaluation.
            log.warning("could not write TTS cache entry %s: %s", path, exc)
        self.misses += 1
        return audio

    def synthesize_many(self, texts: Iterable[str]) -> list[np.ndarray]:
        """``synthesize`` each text, in order."""
        return [self.synthesize(text) for text in texts]

    def _load(self, path: Path) -> np.ndarray | None:
        try:
            return read_entry(path)
        except CorruptCacheEntry as exc:
            log.warning("discarding corrupt TTS cache entry, will re-synthesise: %s", exc)
            discard_entry(path)
            return None
        except OSError as exc:  # e.g. permission denied: synthesise instead, as on a miss
            log.warning("could not read TTS cache entry %s: %s", path, exc)
            return None


def _check_riff_size(data: bytes) -> None:
    # libsndfile reads a truncated WAV without complaint (it trusts the file size over the header), so compare the
    # RIFF size written at close with the bytes actually present.
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise CorruptCacheEntry(f"not a WAV file ({len(data)} bytes)")
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 != len(data):
        raise CorruptCacheEntry(f"WAV header says {riff_size + 8} bytes, file has {len(data)} (truncated?)")
