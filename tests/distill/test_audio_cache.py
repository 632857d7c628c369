"""The frozen audio encoder's per-clip cache (and the log-mel feature cache beside it): the same outputs as encoding every time, fewer encoder rows run, and
distillation with and without it gives the same losses to float tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm_eval.models.encoder_cache import EncoderCache
from speechlm_eval.distill.config import DistillConfig
from speechlm_eval.distill.train import distill
from speechlm_eval.models.registry import load_model

SMALL = {"max_examples": 12, "batch_size": 4, "max_response_tokens": 16, "lr": 1e-2, "epochs": 2, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def features(student, clips: list[np.ndarray]) -> torch.Tensor:
    """Log-mel features ``(n_clips, mel_bins, frames)`` as the student's processor makes them."""
    extractor = student.processor.feature_extractor
    return extractor(clips, sampling_rate=16000, return_tensors="pt")["input_features"]


def test_cached_rows_equal_fresh_encoding_in_any_batch(tiny_pair) -> None:
    student = load_model(str(tiny_pair[0]))
    encoder = student.audio_encoder().eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000 * (1 + i % 3)).astype(np.float32) * 0.1 for i in range(5)]
    mels = features(student, clips)
    with torch.no_grad():
        reference = encoder(mels).last_hidden_state  # (5, frames, hidden), no cache
        cache = EncoderCache(encoder, max_bytes=2**30)
        with cache.installed():
            first = encoder(mels[[0, 1, 2]])  # all encoded
            mixed = encoder(mels[[4, 2, 0, 3]])  # two cached rows, two new ones
            again = encoder(mels[[3, 1]])  # all cached
    assert type(first) is type(mixed) is type(again)
    torch.testing.assert_close(first.last_hidden_state, reference[[0, 1, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.last_hidden_state, reference[[4, 2, 0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.last_hidden_state, reference[[3, 1]], rtol=1e-5, atol=1e-5)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.uncached_calls) == (4, 5, 0)
    assert "forward" not in vars(encoder)  # uninstalled: the encoder's own forward again


def test_the_cache_stays_out_of_training_mode_and_of_a_trained_encoder(tiny_pair) -> None:
    student = load_model(str(tiny_pair[0]))
    encoder = student.audio_encoder()
    encoder.requires_grad_(False)
    mels = features(student, [np.zeros(16000, dtype=np.float32)])
    cache = EncoderCache(encoder, max_bytes=2**30)
    with torch.no_grad(), cache.installed():
        encoder.train()  # dropout would make outputs differ call to call: not cached
        encoder(mels)
        encoder.eval()
        encoder(mels)
        encoder(mels)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.uncached_calls) == (1, 1, 1)
    full = EncoderCache(encoder, max_bytes=0)  # no room: every call encodes
    with torch.no_grad(), full.installed():
        encoder(mels), encoder(mels)
    assert full.stats.misses == 2 and full.stats.stored_bytes == 0
    encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="trained"):
        EncoderCache(encoder, max_bytes=2**30)


def test_distillation_with_and_without_the_cache_gives_the_same_losses(tiny_pair, tmp_path) -> None:
    speech, text = tiny_pair
    rows = {}
    for cached in (False, True):
        out = tmp_path / f"cached{cached}"
        distill(DistillConfig(student=str(speech), teacher=str(text), out=out, channels="tt,st,st_prefix",
                              cache_audio_encoder=cached, **SMALL))
        rows[cached] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        manifest = json.loads((out / "manifest.json").read_text())
        if cached:
            stats, n = manifest["audio_encoder_cache"], manifest["data"]["examples"]
            # Each clip is encoded once (epoch 1, st); st_prefix in epoch 1 and both channels in epoch 2 read it.
            assert (stats["misses"], stats["hits"], stats["uncached_calls"]) == (n, 3 * n, 0)
            features = manifest["audio_feature_cache"]  # and its log-mel features are extracted once
            assert (features["misses"], features["hits"], features["uncached_calls"]) == (n, 3 * n, 0)
        else:
            assert "audio_encoder_cache" not in manifest and "audio_feature_cache" not in manifest
    assert len(rows[True]) == len(rows[False])
    for plain, cached in zip(rows[False], rows[True]):
        for key in ("loss_tt", "loss_st", "loss_st_prefix", "grad_norm"):
            assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), (key, plain["step"])
