"""The on-disk TTS cache, with real espeak-ng audio: hits, layout, corruption recovery and concurrent processes."""

from __future__ import annotations

import json
import multiprocessing
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf

from speechlm_eval.speech import CachedTTS, EspeakEngine, TTSEngine, TTSError, cache_key, default_cache_root
from speechlm_eval.speech.cache import CorruptCacheEntry, entry_path, read_entry, write_entry

TEXT = "Which planet is the largest in our solar system?"


class CountingEngine:
    """A real engine (espeak-ng underneath) that counts how often it is asked to synthesise."""

    def __init__(self, inner: TTSEngine, postprocess: Callable[[np.ndarray], Any] = lambda a: a) -> None:
        self.inner = inner
        self.postprocess = postprocess
        self.calls: list[str] = []
        self.name, self.voice, self.rate, self.sampling_rate = inner.name, inner.voice, inner.rate, inner.sampling_rate

    def synthesize(self, text: str) -> np.ndarray:
        self.calls.append(text)
        return self.postprocess(self.inner.synthesize(text))

    def cache_key_fields(self) -> dict[str, Any]:
        return self.inner.cache_key_fields()


@pytest.fixture(scope="module")
def espeak() -> EspeakEngine:
    return EspeakEngine()


def test_key_is_canonical_over_field_order_and_sensitive_to_everything_else() -> None:
    fields = {"engine": "espeak-ng", "voice": "en-us", "rate": 160}
    key = cache_key(fields, TEXT)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(dict(reversed(list(fields.items()))), TEXT) == key
    assert cache_key({**fields, "rate": 161}, TEXT) != key
    assert cache_key({**fields, "pitch": 50}, TEXT) != key
    assert cache_key(fields, TEXT + " ") != key
    # Text is keyed exactly: two Unicode spellings of "é" are two entries.
    assert cache_key(fields, unicodedata.normalize("NFC", "café")) != cache_key(
        fields, unicodedata.normalize("NFD", "café")
    )


def test_key_rejects_fields_that_are_not_json() -> None:
    with pytest.raises(TTSError, match="JSON"):
        cache_key({"voice": object()}, TEXT)


def test_hit_returns_equal_array_without_calling_engine(espeak: EspeakEngine, tmp_path: Path) -> None:
    counting = CountingEngine(espeak)
    tts = CachedTTS(counting, tmp_path)
    first = tts.synthesize(TEXT)
    second = tts.synthesize(TEXT)
    assert counting.calls == [TEXT]
    assert (tts.hits, tts.misses) == (1, 1)
    assert second.dtype == np.float32 and np.array_equal(first, second)
    # A fresh wrapper (as another run would build) is served from disk too, bit for bit equal to a fresh synthesis.
    again = CountingEngine(espeak)
    assert np.array_equal(CachedTTS(again, tmp_path).synthesize(TEXT), espeak.synthesize(TEXT))
    assert again.calls == []


def test_cached_wrapper_has_the_engine_interface(espeak: EspeakEngine, tmp_path: Path) -> None:
    tts = CachedTTS(EspeakEngine(voice="en-gb", rate=170), tmp_path)
    assert isinstance(tts, TTSEngine)
    assert (tts.name, tts.voice, tts.rate, tts.sampling_rate) == ("espeak-ng", "en-gb", 170, 16000)
    assert tts.cache_key_fields() == tts.engine.cache_key_fields()


def test_layout_float_wav_and_sidecar(espeak: EspeakEngine, tmp_path: Path) -> None:
    tts = CachedTTS(espeak, tmp_path)
    audio = tts.synthesize(TEXT)
    key = cache_key(espeak.cache_key_fields(), TEXT)
    path = tmp_path / key[:2] / f"{key}.wav"
    assert tts.path_for(TEXT) == path == entry_path(tmp_path, key)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "FLOAT", audio.size)
    sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["text"] == TEXT and sidecar["engine"] == espeak.cache_key_fields()
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([key[:2], path.name, path.with_suffix(".json").name])


def test_different_engine_settings_miss(espeak: EspeakEngine, tmp_path: Path) -> None:
    CachedTTS(espeak, tmp_path).synthesize(TEXT)
    british = CountingEngine(EspeakEngine(voice="en-gb"))
    audio = CachedTTS(british, tmp_path).synthesize(TEXT)
    assert british.calls == [TEXT]
    assert not np.array_equal(audio, espeak.synthesize(TEXT))


def test_synthesize_many_keeps_order_and_reuses_entries(espeak: EspeakEngine, tmp_path: Path) -> None:
    counting = CountingEngine(espeak)
    texts = ["one apple", "two pears", "one apple", "three plums"]
    out = CachedTTS(counting, tmp_path).synthesize_many(texts)
    assert counting.calls == ["one apple", "two pears", "three plums"]
    assert np.array_equal(out[0], out[2])
    for text, audio in zip(texts, out):
        assert np.array_equal(audio, espeak.synthesize(text))


def test_faulty_engine_output_is_refused_and_not_cached(espeak: EspeakEngine, tmp_path: Path) -> None:
    float64_engine = CountingEngine(espeak, postprocess=lambda a: a.astype(np.float64))
    with pytest.raises(TTSError, match="float32"):
        CachedTTS(float64_engine, tmp_path).synthesize(TEXT)
    assert not any(tmp_path.rglob("*.wav"))


def test_unwritable_cache_still_returns_audio(espeak: EspeakEngine, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("in the way")
    counting = CountingEngine(espeak)
    tts = CachedTTS(counting, not_a_dir)
    assert np.array_equal(tts.synthesize(TEXT), espeak.synthesize(TEXT))
    assert np.array_equal(tts.synthesize(TEXT), espeak.synthesize(TEXT))
    assert counting.calls == [TEXT, TEXT]  # nothing could be cached, so both calls synthesised


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPEECHLM_EVAL_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c" / "tts"
    monkeypatch.delenv("SPEECHLM_EVAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "speechlm_eval" / "tts"
    assert CachedTTS(EspeakEngine()).root == default_cache_root()


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_to_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _pcm16(path: Path) -> None:
    audio, sr = sf.read(str(path), dtype="float32")
    sf.write(str(path), audio, sr, subtype="PCM_16", format="WAV")


def _append_junk(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 100)


@pytest.mark.parametrize("corrupt", [_truncate_half, _truncate_to_header, _empty, _garbage, _pcm16, _append_junk])
def test_corrupt_entry_is_replaced_not_crashed_on(
    espeak: EspeakEngine, tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    counting = CountingEngine(espeak)
    tts = CachedTTS(counting, tmp_path)
    original = tts.synthesize(TEXT)
    path = tts.path_for(TEXT)
    corrupt(path)
    with pytest.raises(CorruptCacheEntry):
        read_entry(path)
    recovered = tts.synthesize(TEXT)
    assert counting.calls == [TEXT, TEXT]
    assert np.array_equal(recovered, original)
    assert np.array_equal(read_entry(path), original)  # the entry on disk is whole again


def test_missing_entry_reads_as_none(tmp_path: Path) -> None:
    assert read_entry(tmp_path / "ab" / "absent.wav") is None


# --- two processes at once -------------------------------------------------------------------------------------


def _synthesize_in_child(root: str, texts: list[str], barrier: Any, results: Any) -> None:
    tts = CachedTTS(EspeakEngine(), root)
    barrier.wait()  # both processes start synthesising at the same moment, so the shared texts collide
    results.put({text: tts.synthesize(text) for text in texts})


def test_two_processes_share_one_cache(espeak: EspeakEngine, tmp_path: Path) -> None:
    shared = [f"Shared sentence number {i}." for i in range(6)]
    own = [[f"First process only, item {i}." for i in range(3)], [f"Second process only, item {i}." for i in range(3)]]
    plans = [shared + own[0], list(reversed(shared)) + own[1]]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_synthesize_in_child, args=(str(tmp_path), plan, barrier, results)) for plan in plans]
    for p in procs:
        p.start()
    outputs = [results.get(timeout=60) for _ in procs]  # drain before join: a full pipe would block the child
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for text in shared:
        assert np.array_equal(outputs[0][text], outputs[1][text])
    every_text = shared + own[0] + own[1]
    wavs = sorted(tmp_path.rglob("*.wav"))
    assert len(wavs) == len(every_text)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    reader = CachedTTS(espeak, tmp_path)
    for text in every_text:
        fresh = espeak.synthesize(text)
        assert np.array_equal(read_entry(reader.path_for(text)), fresh)
        assert json.loads(reader.path_for(text).with_suffix(".json").read_text(encoding="utf-8"))["text"] == text
        assert any(np.array_equal(out[text], fresh) for out in outputs if text in out)


def _rewrite_repeatedly(path: str, audio: np.ndarray, seconds: float, started: Any) -> None:
    started.set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        write_entry(path, audio, {"text": "rewritten"})


def test_reader_never_sees_a_partial_entry_while_another_process_writes(espeak: EspeakEngine, tmp_path: Path) -> None:
    audio = espeak.synthesize(" ".join([TEXT] * 3))  # ~8 s of audio, so a non-atomic write has a wide window
    path = tmp_path / "ab" / "abcd.wav"
    write_entry(path, audio, {"text": "first"})
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_rewrite_repeatedly, args=(str(path), audio, 1.0, started))
    writer.start()
    assert started.wait(timeout=60)
    reads, failures = 0, []
    while writer.is_alive():
        try:
            got = read_entry(path)
            assert got is not None and np.array_equal(got, audio)
        except (CorruptCacheEntry, AssertionError) as exc:
            failures.append(repr(exc))
        reads += 1
    writer.join()
    assert writer.exitcode == 0
    assert reads > 50  # the reads really overlapped the writes
    assert failures == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
