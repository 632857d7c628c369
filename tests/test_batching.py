"""Batched answers equal one-at-a-time greedy answers, and the batch-size and probe-budget rules."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm_eval.diagnostics import PROBE_BUDGET_STEP, probe_budget
from speechlm_eval.gap import AUTO_BATCH_CAP, ConfigError, parse_batch_size
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
