"""A batch's prompt cache continued after ``generate`` (models/prompt_cache.py): teacher-forced logits and new answers
equal to encoding the prompts again, on a tiny real-shaped Qwen2-Audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.hf_runtime import unpadded_rows
from speechlm_eval.models.registry import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def clips(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal(4000 * (1 + i % 4)).astype(np.float32) * 0.1 for i in range(n)]


@pytest.fixture(scope="module")
def speech(tiny_pair):
    return load_model(str(tiny_pair[0]))


def test_answers_are_those_of_generate(speech) -> None:
    prompts = [Prompt(audio=a) for a in clips(5)]
    config = GenerationConfig(max_new_tokens=6)
    answers, state = speech.generate_keeping_prompt(prompts, config)
    assert answers == speech.generate(prompts, config)
    assert state.input_ids.shape[0] == 5 and state.cache.get_seq_length() >= state.input_ids.shape[1]


def test_continuation_logits_equal_a_fresh_forward(speech) -> None:
    """Different lengths, an empty continuation, and the left padding of clips of four lengths."""
    prompts = [Prompt(audio=a, system="Be brief.") for a in clips(5)]
    continuations = [[11, 12, 13], [14], [], [15, 16, 17, 18, 19], [20, 21]]
    _, state = speech.generate_keeping_prompt(prompts, GenerationConfig(max_new_tokens=4))
    with torch.no_grad():
        fresh, fresh_targets, fresh_mask = speech.continuation_logits(prompts, continuations)
    logits, targets, mask = state.continuation_logits(continuations)
    assert torch.equal(mask, fresh_mask) and torch.equal(targets[mask], fresh_targets[mask])
    assert logits.shape == fresh.shape
    assert torch.allclose(logits[mask], fresh[mask], atol=1e-4, rtol=0)
    assert state.cache.get_seq_length() > state.input_ids.shape[1]  # extended: the next use cuts it back


def test_new_prompts_after_the_cache_answer_as_from_scratch(speech) -> None:
    """After a teacher-forced pass on the same state, a subset of rows asked another instruction about the same
    clips, each with its own budget, answers as one-at-a-time generate with that budget does."""
    audio = clips(6)
    _, state = speech.generate_keeping_prompt([Prompt(audio=a) for a in audio], GenerationConfig(max_new_tokens=3))
    state.continuation_logits([[5, 6]] * 6)
    rows, budgets = [0, 2, 3, 5], [7, 2, 5, 7]
    asked = [Prompt(audio=audio[k], text="Transcribe the speech in the audio exactly.") for k in rows]
    state = state.select(rows)
    encoded = speech.encode(asked)  # the processor's ids, which the state builds without reading the clips
    assert state.same_clip_rows(asked) == unpadded_rows(encoded["input_ids"], encoded["attention_mask"])
    assert state.same_clip_rows([Prompt(audio=audio[1], text="x")] * 4) is None  # another clip: encode instead
    answers = state.generate(asked, GenerationConfig(max_new_tokens=7), budgets=budgets)
    alone = [speech.generate([p], GenerationConfig(max_new_tokens=b))[0] for p, b in zip(asked, budgets)]
    assert answers == alone
    assert [a.n_new_tokens <= b for a, b in zip(answers, budgets)] == [True] * 4


def test_a_family_that_does_not_reuse_its_cache_says_so(tiny_pair) -> None:
    text_llm = load_model(str(tiny_pair[1]))
    assert not text_llm.reuses_prompt_cache
    with pytest.raises(NotImplementedError, match="not reused"):
        text_llm.generate_keeping_prompt([Prompt(text="hi")], GenerationConfig(max_new_tokens=2))


def test_a_new_prompt_that_differs_before_its_audio_is_refused(speech) -> None:
    """Another system turn: the audio tokens would have to run again without their features, so the state refuses
    (the caller encodes the prompt anew)."""
    audio = clips(2)
    _, state = speech.generate_keeping_prompt([Prompt(audio=a) for a in audio], GenerationConfig(max_new_tokens=2))
    assert state.audio_token_ids  # read from the model's config
    with pytest.raises(ValueError, match="before its audio ends"):
        state.generate([Prompt(audio=a, system="Another system turn.") for a in audio], GenerationConfig())
