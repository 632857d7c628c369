"""The espeak-ng engine (run for real) and the TTS registry."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechlm_eval.speech import engine as engine_module
from speechlm_eval.speech import EspeakEngine, TTSEngine, TTSError, available_tts, get_tts, register_tts

PANGRAM = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def espeak() -> EspeakEngine:
    return EspeakEngine()


def seconds(audio: np.ndarray) -> float:
    return audio.size / 16000


def raw_espeak(text: str) -> tuple[np.ndarray, int]:
    """espeak-ng's own output, straight from the binary, for comparison with the engine's."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "160", "-p", "50", "--stdout", text], capture_output=True, check=True
    ).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float64")
    return audio, sr


def test_output_is_16k_float32_mono_in_range(espeak: EspeakEngine) -> None:
    audio = espeak.synthesize(PANGRAM)
    assert espeak.sampling_rate == 16000
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.all(np.abs(audio) <= 1.0)
    assert np.abs(audio).max() > 0.1  # real speech, not near-silence


@pytest.mark.parametrize("text", ["Hello there, my friend.", PANGRAM, "Please tell me which planet is the largest."])
def test_duration_is_plausible_per_word(espeak: EspeakEngine, text: str) -> None:
    per_word = seconds(espeak.synthesize(text)) / len(text.split())
    assert 0.3 <= per_word <= 0.6


def test_resampled_audio_matches_espeaks_native_output(espeak: EspeakEngine) -> None:
    raw, sr = raw_espeak(PANGRAM)
    assert sr == 22050  # the premise of the 320/441 resampling
    audio = espeak.synthesize(PANGRAM)
    # Same duration: a missing or wrong resampling would stretch the clip by 22050/16000.
    assert abs(seconds(audio) - raw.size / sr) < 1e-3
    # Same waveform: linearly interpolating the raw clip onto the 16 kHz grid gives a close (not identical) signal.
    grid = np.arange(audio.size) / 16000
    reference = np.interp(grid, np.arange(raw.size) / sr, raw)
    assert np.corrcoef(audio, reference)[0, 1] > 0.9


def test_deterministic(espeak: EspeakEngine) -> None:
    first = espeak.synthesize(PANGRAM)
    assert np.array_equal(first, espeak.synthesize(PANGRAM))
    assert np.array_equal(first, EspeakEngine().synthesize(PANGRAM))


def test_voices_rates_and_pitches_change_the_audio(espeak: EspeakEngine) -> None:
    base = espeak.synthesize(PANGRAM)
    for other in (EspeakEngine(voice="en-gb"), EspeakEngine(voice="en-us+f3"), EspeakEngine(pitch=80)):
        audio = other.synthesize(PANGRAM)
        assert not np.array_equal(audio, base), other
    slow, fast = EspeakEngine(rate=100).synthesize(PANGRAM), EspeakEngine(rate=300).synthesize(PANGRAM)
    assert seconds(slow) > 1.8 * seconds(fast)


def test_cache_key_fields_record_engine_version_and_settings() -> None:
    fields = EspeakEngine(voice="en-gb", rate=200, pitch=40).cache_key_fields()
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    assert re.match(r"\d+\.\d+", fields["engine_version"])
    assert f"text-to-speech: {fields['engine_version']}" in out
    assert fields["engine"] == "espeak-ng"
    assert (fields["voice"], fields["rate"], fields["pitch"], fields["sampling_rate"]) == ("en-gb", 200, 40, 16000)
    assert fields != EspeakEngine(voice="en-gb", rate=200, pitch=41).cache_key_fields()


@pytest.mark.parametrize(
    "text",
    [
        'He said "hello" and \'goodbye\'.',
        "--help",  # as an argument this would print espeak-ng's help instead of audio
        "-v nosuchvoice hello world",  # as arguments this would select a voice that does not exist
        "naïve café, résumé — 日本",
        "line one\nline two\n\nline three",
        "<speak>tags</speak> & ampersands; semi;colons | pipes > redirects",
    ],
)
def test_tricky_text_is_spoken_not_interpreted(espeak: EspeakEngine, text: str) -> None:
    audio = espeak.synthesize(text)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert seconds(audio) > 0.3 and np.abs(audio).max() > 0.1


def test_text_never_reaches_a_shell(espeak: EspeakEngine, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    espeak.synthesize(f"$(touch {target}) `touch {target}`; touch {target}")
    assert not target.exists()


def test_a_newline_separated_text_says_every_line(espeak: EspeakEngine) -> None:
    one = espeak.synthesize("line one")
    three = espeak.synthesize("line one\nline two\nline three")
    assert seconds(three) > 2.2 * seconds(one)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_raises(espeak: EspeakEngine, text: str) -> None:
    with pytest.raises(TTSError, match="empty"):
        espeak.synthesize(text)


def test_silent_output_raises(espeak: EspeakEngine) -> None:
    with pytest.raises(TTSError, match="silence"):
        espeak.synthesize("...")


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(TTSError, match=re.escape("apt-get install -y espeak-ng")):
        EspeakEngine(binary=str(tmp_path / "espeak-ng"))


def test_unknown_voice_raises_with_espeaks_reason() -> None:
    with pytest.raises(TTSError, match="nosuchvoice.*does not exist"):
        EspeakEngine(voice="nosuchvoice").synthesize("hello")


@pytest.mark.parametrize("options", [{"rate": 79}, {"rate": 451}, {"pitch": -1}, {"pitch": 100}, {"voice": "-x"}])
def test_out_of_range_options_are_rejected(options: dict) -> None:
    with pytest.raises(ValueError):
        EspeakEngine(**options)


def test_registry_builds_espeak_with_options() -> None:
    assert "espeak-ng" in available_tts()
    tts = get_tts("espeak-ng", voice="en-gb", rate=200)
    assert isinstance(tts, EspeakEngine) and isinstance(tts, TTSEngine)
    assert (tts.voice, tts.rate) == ("en-gb", 200)


def test_registry_unknown_name_lists_known_engines() -> None:
    with pytest.raises(TTSError, match="no-such-tts.*espeak-ng"):
        get_tts("no-such-tts")


def test_registry_accepts_plugins_and_refuses_silent_shadowing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "TTS_ENGINES", engine_module.TTS_ENGINES.copy())

    def slow_espeak(**options: object) -> EspeakEngine:
        return EspeakEngine(rate=100, **options)  # type: ignore[arg-type]

    register_tts("slow-espeak", slow_espeak)
    tts = get_tts("slow-espeak", voice="en-gb")
    assert (tts.voice, tts.rate) == ("en-gb", 100)
    register_tts("slow-espeak", slow_espeak)  # the same factory again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_tts("slow-espeak", EspeakEngine)
    register_tts("slow-espeak", EspeakEngine, replace=True)
    assert get_tts("slow-espeak").rate == 160
