"""The espeak-ng text-to-speech engine: offline, fast (~25 ms a sentence) and deterministic; its 22.05 kHz output is
resampled to 16 kHz float32 mono. Registered as ``"espeak-ng"``."""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from math import gcd
from typing import Any

import numpy as np
import soundfile as sf

from speechlm_eval.speech.engine import OUTPUT_SAMPLING_RATE, TTSError

INSTALL_HINT = "install it with `apt-get install -y espeak-ng` (Debian/Ubuntu)"

# espeak-ng's documented ranges; outside them it silently clamps, which would make two different cache keys name the
# same audio, so we reject such values instead.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 99)

# Bumped whenever our post-processing of espeak-ng's output changes, so cached audio made the old way is not reused.
POSTPROCESS = "resample_poly/float32/v1"

_VERSION_RE = re.compile(r"text-to-speech:\s*(\S+)")


def find_espeak(binary: str = "espeak-ng") -> str:
    """The full path of the espeak-ng executable ``binary`` (a name on PATH or a path); TTSError if missing."""
    path = shutil.which(binary)
    if path is None:
        raise TTSError(f"espeak-ng executable {binary!r} not found; {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=None)
def espeak_version(path: str) -> str:
    """The version espeak-ng at ``path`` reports (e.g. ``"1.51"``), from ``espeak-ng --version``."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TTSError(f"could not run {path} --version: {exc}; {INSTALL_HINT}") from exc
    out = proc.stdout.decode("utf-8", "replace")
    match = _VERSION_RE.search(out)
    if proc.returncode != 0 or match is None:
        raise TTSError(f"unexpected output from {path} --version (exit {proc.returncode}): {out.strip()!r}")
    return match.group(1)


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV bytes to mono float32 samples and their sampling rate.

    espeak-ng streams to stdout, so its header carries placeholder sizes; libsndfile reads up to the real end.
    """
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError) as exc:  # LibsndfileError is a RuntimeError
        raise TTSError(f"espeak-ng produced undecodable audio ({len(data)} bytes): {exc}") from exc
    return audio.mean(axis=1, dtype=np.float32), int(sr)


def to_output_rate(audio: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Resample mono ``audio`` to 16 kHz float32 in [-1, 1] with a polyphase filter (22050 Hz → 16000 is 320/441)."""
    if sampling_rate != OUTPUT_SAMPLING_RATE:
        from scipy.signal import resample_poly  # on a cache miss only: scipy.signal costs ~1 s of every start-up

        g = gcd(OUTPUT_SAMPLING_RATE, sampling_rate)
        audio = resample_poly(audio.astype(np.float64), OUTPUT_SAMPLING_RATE // g, sampling_rate // g)
    # The filter can overshoot full scale slightly on loud transients.
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class EspeakEngine:
    """espeak-ng driven through its command-line binary.

    Args:
        voice: an espeak-ng voice, optionally with a variant (``"en-us"``, ``"en-gb"``, ``"en-us+f3"``); list them
            with ``espeak-ng --voices``.
        rate: speaking rate in words per minute, 80–450.
        pitch: base pitch, 0–99.
        binary: the executable's name on PATH or its path.
        timeout_s: seconds one synthesis may take before it is treated as hung.
    """

    voice: str = "en-us"
    rate: int = 160
    pitch: int = 50
    binary: str = "espeak-ng"
    timeout_s: float = 60.0
    name: str = field(default="espeak-ng", init=False)
    sampling_rate: int = field(default=OUTPUT_SAMPLING_RATE, init=False)
    version: str = field(default="", init=False)
    _path: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.voice or self.voice.startswith("-") or any(c.isspace() for c in self.voice):
            raise ValueError(f"invalid espeak-ng voice {self.voice!r}")
        _check_range("rate", self.rate, RATE_RANGE)
        _check_range("pitch", self.pitch, PITCH_RANGE)
        path = find_espeak(self.binary)
        # Frozen dataclass: these are derived once, at construction, so a missing binary fails fast.
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "version", espeak_version(path))

    def synthesize(self, text: str) -> np.ndarray:
        """Speak ``text``; returns float32 samples in [-1, 1], shape ``(n,)``, at 16 kHz."""
        if not text.strip():
            raise TTSError("cannot synthesise empty or whitespace-only text")
        if "\x00" in text:
            raise TTSError("cannot synthesise text containing a NUL character")
        audio = to_output_rate(*decode_wav(self._run(text)))
        if not np.any(audio):
            # e.g. punctuation only: a silent clip would be scored as if the model had heard a question.
            raise TTSError(f"espeak-ng produced only silence for {_preview(text)}")
        return audio

    def cache_key_fields(self) -> dict[str, Any]:
        """Everything besides the text that determines the audio."""
        return {
            "engine": self.name,
            "engine_version": self.version,
            "voice": self.voice,
            "rate": self.rate,
            "pitch": self.pitch,
            "sampling_rate": self.sampling_rate,
            "postprocess": POSTPROCESS,
        }

    def _run(self, text: str) -> bytes:
        # Text goes through stdin, never argv: no shell is involved, and text such as "-v x" or "--help" cannot be
        # parsed as an option. "-b 1" pins the input encoding to UTF-8 regardless of the locale.
        args = [self._path, "-v", self.voice, "-s", str(self.rate), "-p", str(self.pitch), "-b", "1", "--stdout"]
        try:
            proc = subprocess.run(
                args, input=text.encode("utf-8"), capture_output=True, timeout=self.timeout_s, check=False
            )
        except FileNotFoundError as exc:
            raise TTSError(f"espeak-ng executable {self._path!r} disappeared; {INSTALL_HINT}") from exc
        except subprocess.TimeoutExpired as exc:
            raise TTSError(f"espeak-ng took over {self.timeout_s} s for {_preview(text)}") from exc
        if proc.returncode != 0 or not proc.stdout:
            message = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip() or "no output"
            raise TTSError(
                f"espeak-ng failed (exit {proc.returncode}, voice {self.voice!r}) for {_preview(text)}: {message}"
            )
        return proc.stdout


def _check_range(what: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"espeak-ng {what} must be an integer in [{low}, {high}], got {value!r}")


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


