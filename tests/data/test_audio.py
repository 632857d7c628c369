"""decode_audio: mono float32 at 16 kHz, and AudioErrors that name the item, the origin and the cause."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm_eval.data.audio import AudioError, decode_audio
from speechlm_eval.data.item import AudioRef

from .fakes import TONE_HZ, tone, wav_bytes


def _peak_hz(samples: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / sr)[spectrum.argmax()])


def test_resamples_22050_to_16000_keeping_pitch() -> None:
    out = decode_audio(AudioRef(data=wav_bytes(tone(22_050, 22_050), 22_050)), item_id="x")
    assert out.dtype == np.float32 and out.shape == (16_000,)
    assert abs(_peak_hz(out, 16_000) - TONE_HZ) < 2


def test_16k_passes_through_unchanged() -> None:
    samples = tone(16_000, 1_000)
    out = decode_audio(AudioRef(data=wav_bytes(samples, 16_000)), item_id="x")
    np.testing.assert_array_equal(out, samples)


def test_stereo_is_mixed_by_mean(tmp_path) -> None:
    left, right = tone(16_000, 500), tone(16_000, 500, hz=1000.0)
    path = tmp_path / "stereo.wav"
    path.write_bytes(wav_bytes(np.stack([left, right], axis=1), 16_000))
    out = decode_audio(AudioRef(path=str(path)), item_id="x")
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


def test_array_ref_is_resampled() -> None:
    out = decode_audio(AudioRef(array=tone(8_000, 800), sampling_rate=8_000), item_id="x")
    assert out.shape == (1_600,)


def _error(ref: AudioRef) -> str:
    with pytest.raises(AudioError) as info:
        decode_audio(ref, item_id="openbookqa/test/9")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "openbookqa/test/9" in message
    return message


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.wav"
    message = _error(AudioRef(path=str(missing)))
    assert str(missing) in message and "not found" in message


def test_empty_file_and_empty_bytes(tmp_path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty" in _error(AudioRef(path=str(empty)))
    assert "empty" in _error(AudioRef(data=b""))


def test_zero_length_audio() -> None:
    assert "zero-length" in _error(AudioRef(data=wav_bytes(np.zeros(0, np.float32), 16_000)))


def test_corrupt_bytes_and_unsupported_format(tmp_path) -> None:
    message = _error(AudioRef(data=b"RIFF\x00\x00\x00\x00garbage", path="clip.wav"))
    assert "clip.wav" in message and "format" in message
    text_file = tmp_path / "notes.wav"
    text_file.write_text("just some text, not audio")
    assert str(text_file) in _error(AudioRef(path=str(text_file)))


def test_nan_and_inf_samples() -> None:
    with_nan = tone(16_000, 100)
    with_nan[10] = np.nan
    assert "NaN" in _error(AudioRef(data=wav_bytes(with_nan, 16_000)))
    with_inf = tone(16_000, 100)
    with_inf[3] = np.inf
    assert "infinite" in _error(AudioRef(array=with_inf, sampling_rate=16_000))


def test_no_audio_at_all() -> None:
    assert "no audio" in _error(AudioRef())


def test_clip_seconds_reads_the_header_only(tmp_path) -> None:
    from speechlm_eval.data.audio import clip_seconds

    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(tone(22050, 16538), 22050))
    assert clip_seconds(AudioRef(path=str(path))) == pytest.approx(16538 / 22050)
    assert clip_seconds(AudioRef(data=wav_bytes(tone(16000, 32000), 16000))) == pytest.approx(2.0)
    assert clip_seconds(AudioRef(array=np.zeros(8000, np.float32), sampling_rate=16000)) == 0.5
    assert clip_seconds(AudioRef(data=b"not audio")) is None
    assert clip_seconds(AudioRef(path=str(tmp_path / "missing.wav"))) is None
    assert clip_seconds(AudioRef()) is None
