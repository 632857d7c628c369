"""Batched answers equal one-at-a-time greedy answers, and the batch-size and probe-budget rules."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm_eval.diagnostics import PROBE_BUDGET_STEP, probe_budget
from speechlm_eval.gap import (AUTO_BATCH_CAP, CPU_BATCH_CAP, CPU_SEQUENCE_BOUND, ConfigError, bytes_per_row_token,
                               cpu_batch_size, parse_batch_size)
from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.registry import LoadOptions, load_model

TEXTS = ["Which of these animals is a mammal?", "Is the sentence plausible?", "Write a short poem about the sea.",
         "Transcribe the audio.", "The meeting moved to Thursday at noon.", "A. shark B. whale C. trout D. eel",
         "The capital of France is Paris.", "Answer the question."]


@pytest.fixture(scope="module")
def speech_llm(tiny_pair):
    import torch

    torch.set_num_threads(1)
    return load_model(str(tiny_pair[0]), LoadOptions(device="cpu"))


def sixteen_prompts(with_audio: bool) -> list[Prompt]:
    """16 prompts of different lengths (text, or clips of 0.5-3.5 s of noise with an instruction)."""
    rng = np.random.default_rng(0)
    if not with_audio:
        return [Prompt(text=" ".join(TEXTS[: 1 + k % len(TEXTS)])) for k in range(16)]
    return [Prompt(audio=(0.1 * rng.standard_normal(8000 + 3000 * k)).astype(np.float32), text=TEXTS[k % 8])
            for k in range(16)]


@pytest.mark.parametrize("with_audio", [False, True], ids=["text", "speech"])
def test_batch_of_16_answers_as_one_at_a_time(speech_llm, with_audio: bool) -> None:
    config = GenerationConfig(max_new_tokens=12)
    prompts = sixteen_prompts(with_audio)
    alone = [speech_llm.generate([p], config)[0] for p in prompts]
    together = speech_llm.generate(prompts, config)
    assert together == alone


def test_batch_size_accepts_numbers_and_auto() -> None:
    assert parse_batch_size(None) == "auto"
    assert parse_batch_size("AUTO") == "auto"
    assert parse_batch_size("16") == 16
    assert parse_batch_size(4) == 4
    for bad in ("0", "-2", "many"):
        with pytest.raises(ConfigError):
            parse_batch_size(bad)
    assert AUTO_BATCH_CAP >= 32


def test_probe_budget_follows_the_spoken_text() -> None:
    assert probe_budget(10, 256) == 32  # 2 * 10 + 8 = 28, rounded up to a step
    assert probe_budget(10, 24) == 24  # never above the run's limit
    assert probe_budget(500, 256) == 256
    assert probe_budget(0, 256) == PROBE_BUDGET_STEP


def qwen2_audio_7b_on_meta():
    """Qwen2-Audio-7B's shape (its config.json's text dimensions, bf16), built on the meta device: no memory, no
    weights, the real bytes per token."""
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    config = Qwen2AudioConfig(text_config={"model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096,
                                           "intermediate_size": 11008, "num_hidden_layers": 32,
                                           "num_attention_heads": 32, "num_key_value_heads": 32})
    with torch.device("meta"):
        return Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def test_cpu_auto_batch_follows_the_memory_estimate(speech_llm) -> None:
    gib = 1024**3
    big = qwen2_audio_7b_on_meta()
    per_token = bytes_per_row_token(big)
    # key/value cache of 32 layers in bf16 + one layer's float32 intermediates + a float32 logit row
    assert per_token == 2 * 32 * 32 * 128 * 2 + 4 * (4 * 4096 + 3 * 11008) + 4 * 156032
    per_row = (CPU_SEQUENCE_BOUND + 64) * per_token  # about 1.4 GiB a row
    assert 8 * per_row <= 12 * gib < 16 * per_row
    assert cpu_batch_size(big, 64, 12 * gib) == 8  # the largest power of two that fits
    assert cpu_batch_size(big, 64, 0.5 * gib) == 1  # never below one
    assert cpu_batch_size(speech_llm.model, 64, 12 * gib) == CPU_BATCH_CAP  # a tiny model gets the cap
