"""Turn an item's AudioRef into a validated float32 mono waveform at 16 kHz, or an AudioError naming the item."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.data.item import AudioRef


# libsndfile error codes (sndfile.h) that say *why* a file could not be opened.
_LIBSNDFILE_CAUSES = {
    1: "unrecognised or unsupported audio format",
    3: "malformed (corrupt) audio file",
    4: "unsupported audio encoding",
}


class AudioError(ValueError):
    """An item's audio is missing, empty, undecodable, in an unsupported format, or holds NaN/inf samples."""


def _fail(item_id: str, ref: AudioRef, cause: str) -> AudioError:
    origin = ref.describe()
    if ref.path and ref.data is not None:
        origin += f" ({len(ref.data)} encoded bytes)"  # path is only the original file name here
    return AudioError(f"item {item_id}: audio {origin}: {cause}")


def _mono(samples: np.ndarray, item_id: str, ref: AudioRef) -> np.ndarray:
    """(n,) or (n, channels) -> (n,) float32; channels are averaged."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise _fail(item_id, ref, f"expected a 1-D or (samples, channels) array, got shape {samples.shape}")
    return samples.astype(np.float32, copy=False)


def _sndfile_source(ref: AudioRef, item_id: str) -> Any:
    """What soundfile should open: a file-like over the bytes, or a checked path."""
    if ref.data is not None:
        if len(ref.data) == 0:
            raise _fail(item_id, ref, "empty audio data (0 bytes)")
        return io.BytesIO(ref.data)
    if ref.path:
        path = Path(ref.path)
        if not path.exists():
            raise _fail(item_id, ref, "file not found")
        if not path.is_file():
            raise _fail(item_id, ref, "not a regular file")
        if path.stat().st_size == 0:
            raise _fail(item_id, ref, "empty file (0 bytes)")
        return str(path)
    raise _fail(item_id, ref, "no audio (no array, no bytes, no path)")


def materialise(ref: AudioRef, item_id: str) -> AudioRef:
    """A deferred AudioRef read from its source (an eager one as it is); a failed read is the item's AudioError."""
    if ref.fetch is None:
        return ref
    try:
        return ref.fetch()
    except Exception as err:  # noqa: BLE001 - a row that cannot be read is this item's error, not the run's
        raise _fail(item_id, ref, f"cannot read the clip from its source ({type(err).__name__}: {err})") from err


def _read(ref: AudioRef, item_id: str) -> tuple[np.ndarray, int]:
    ref = materialise(ref, item_id)
    if ref.array is not None:
        if not ref.sampling_rate:
            raise _fail(item_id, ref, "array given without a sampling rate")
        return _mono(np.asarray(ref.array, dtype=np.float32), item_id, ref), int(ref.sampling_rate)
    source = _sndfile_source(ref, item_id)
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except sf.LibsndfileError as err:
        cause = _LIBSNDFILE_CAUSES.get(err.code, "cannot decode audio")
        raise _fail(item_id, ref, f"{cause} (libsndfile: {err.error_string})") from err
    except Exception as err:  # anything else libsndfile/soundfile raises on bad input is still a per-item error
        raise _fail(item_id, ref, f"cannot decode audio ({type(err).__name__}: {err})") from err
    return _mono(samples, item_id, ref), int(rate)


def decode_audio(ref: AudioRef, *, item_id: str, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """Decode, mix to mono, check and resample (soxr) an item's audio.

    Returns:
        float32 array of shape ``(n,)`` at ``target_sr``.
    Raises:
        AudioError: missing file, empty or zero-length audio, undecodable/corrupt data, unsupported format, NaN/inf
            samples; the message names the item id, the origin (``ref.describe()``) and the cause.
    """
    samples, rate = _read(ref, item_id)
    if samples.size == 0:
        raise _fail(item_id, ref, "zero-length audio (0 samples)")
    if rate <= 0:
        raise _fail(item_id, ref, f"invalid sampling rate {rate}")
    if not np.isfinite(samples).all():
        raise _fail(item_id, ref, "audio contains NaN or infinite samples")
    if rate != target_sr:
        samples = soxr.resample(samples, rate, target_sr)
    return np.ascontiguousarray(samples, dtype=np.float32)


def clip_seconds(ref: AudioRef) -> float | None:
    """The clip's duration from its array or its file header, without decoding it; ``None`` when it cannot be told
    (no audio, an unreadable file: the item fails later, when its audio is decoded, with its own error)."""
    if ref.seconds is not None:
        return ref.seconds
    if ref.array is not None:
        return len(ref.array) / ref.sampling_rate if ref.sampling_rate else None
    if ref.fetch is not None:
        return None
    try:
        source = io.BytesIO(ref.data) if ref.data else ref.path
        if source is None:
            return None
        info = sf.info(source)
    except Exception:  # noqa: BLE001 - an unreadable clip is reported when it is decoded, not here
        return None
    return info.frames / info.samplerate if info.samplerate else None
