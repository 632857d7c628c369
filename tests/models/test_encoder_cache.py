"""The audio encoder cache of a ``gap`` run: each clip encoded once and reused by the speech arm, the KL/JSD pass and
the perception probe, with records byte-identical to a run without it; off by itself where it cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.models import encoder_cache
from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.encoder_cache import EncoderCache, cached_audio_encoder
from speechlm_eval.models.registry import load_model

RECORDS = ("text_llm_text", "speech_llm_text", "speech_llm_speech", "diagnostics", "perception")


pytestmark = pytest.mark.usefixtures("one_thread")


def clips(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(8000 * (1 + i % 3)).astype(np.float32) * 0.1 for i in range(n)]


def test_generate_reuses_each_clip_encoding_and_answers_alike(tiny_pair) -> None:
    model = load_model(str(tiny_pair[0]))
    assert any(p.requires_grad for p in model.audio_encoder().parameters())  # as loaded for evaluation
    prompts = [Prompt(audio=a) for a in clips(4)]
    config = GenerationConfig(max_new_tokens=4)
    with torch.no_grad():
        plain = model.generate(prompts, config)
        with cached_audio_encoder(model, 2**30) as cache:
            first = model.generate(prompts[:3], config)
            again = model.generate([prompts[3], prompts[1], Prompt(audio=prompts[0].audio, text="and?")], config)
    assert first == plain[:3] and again[:2] == [plain[3], plain[1]]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.uncached_calls) == (2, 4, 0)
    features = cache.features.stats  # the log-mel features too: extracted once per clip
    assert (features.hits, features.misses, features.uncached_calls) == (2, 4, 0)
    assert "forward" not in vars(model.audio_encoder())  # uninstalled
    assert model.processor.feature_extractor is cache.features.extractor


def test_calls_autograd_would_record_are_not_cached(tiny_pair) -> None:
    model = load_model(str(tiny_pair[0]))
    encoder = model.audio_encoder()
    mels = model.processor.feature_extractor(clips(1), sampling_rate=16000, return_tensors="pt")["input_features"]
    with cached_audio_encoder(model, 2**30) as cache:
        encoder(mels), encoder(mels)  # grad enabled, weights need grad: encoded each time, outputs keep their graph
        assert encoder(mels).last_hidden_state.requires_grad
        with torch.no_grad():
            encoder(mels), encoder(mels)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.uncached_calls) == (1, 1, 3)


def test_off_where_it_cannot_apply(tiny_pair) -> None:
    text_llm = load_model(str(tiny_pair[1]))  # a causal LM: no audio encoder
    with cached_audio_encoder(text_llm, 2**30) as cache:
        assert cache is None
    speech = load_model(str(tiny_pair[0]))
    with cached_audio_encoder(speech, 0) as cache:
        assert cache is None
    speech.audio_encoder().train()
    with cached_audio_encoder(speech, 2**30) as cache:
        assert cache is None
    with cached_audio_encoder(object(), 2**30) as cache:  # a served model
        assert cache is None


@pytest.mark.slow
def test_gap_records_are_byte_identical_with_and_without_the_cache(tmp_path, monkeypatch) -> None:
    """The default organism run (its 3 arms, KL/JSD pass and probe), on 24 items: without the cache, with it, and
    with one so small that most clips are encoded again, mixing cached and fresh rows in a batch. The passes run
    separately here (``--no-reuse-prompt-cache``), so each of the three encodes the clips."""
    caches: list[EncoderCache] = []

    class Recorded(EncoderCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(encoder_cache, "EncoderCache", Recorded)
    runner = CliRunner()
    runs = {"off": ["--no-cache-audio-encoder"], "on": [], "small": ["--audio-cache-gib", str(2 * 120_000 / 2**30)]}
    for name, extra in runs.items():
        result = runner.invoke(app, ["gap", "--limit", "24", "--out", str(tmp_path / name), "--no-reuse-prompt-cache",
                                     *extra],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    on, small = caches
    assert on.stats.misses == 24 and on.stats.hits == 2 * 24 and on.stats.uncached_calls == 0  # encoded once each
    assert (on.features.stats.misses, on.features.stats.hits, on.features.stats.uncached_calls) == (24, 48, 0)
    assert 0 < small.features.stats.stored_bytes < on.features.stats.stored_bytes and small.features.stats.hits > 0
    assert 0 < small.stats.stored_bytes < on.stats.stored_bytes and small.stats.misses > 24 and small.stats.hits > 0
    for name in RECORDS:
        off = (tmp_path / "off" / "records" / f"{name}.jsonl").read_bytes()
        assert off and (tmp_path / "on" / "records" / f"{name}.jsonl").read_bytes() == off, name
        assert (tmp_path / "small" / "records" / f"{name}.jsonl").read_bytes() == off, name
