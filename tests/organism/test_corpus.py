"""Organism training text: tokenizer round trip, and training prompts token-identical to what the adapters send."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from speechlm_eval.diagnostics import PROBE_INSTRUCTION
from speechlm_eval.models.base import Prompt
from speechlm_eval.models.hf_causal import CausalLMModel
from speechlm_eval.models.qwen2_audio import Qwen2AudioModel, audio_token_count
from speechlm_eval.organism.builder import make_processor
from speechlm_eval.organism.clips import HELD_OUT_VOICE, featurise, synthesize
from speechlm_eval.organism.corpus import (
    IGNORE_INDEX,
    asr_template,
    collate,
    encode_text_example,
    mcq_example,
    repeat_example,
    response_ids,
    spoken_qa_template,
)
from speechlm_eval.organism.train_speech import SpeechLLMSpec, new_speech_llm
from speechlm_eval.organism.train_text import TextLLMSpec, new_text_llm
from speechlm_eval.data.organism_world import LETTERS, WorldSpec, make_world

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def world():
    return make_world(0, WorldSpec(n_adjectives=6, n_nouns=6, names_per_word=3))


@pytest.fixture(scope="module")
def processor(world):
    return make_processor(world, vocab_size=600, chunk_seconds=6, seed=0)


def test_tokenizer_round_trips_and_keeps_world_words_whole(world, processor) -> None:
    tokenizer = processor.tokenizer
    for mcq in world.eval_mcqs:
        ids = tokenizer(mcq.prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == mcq.prompt
    for word in world.words:
        assert len(tokenizer.tokenize(" " + word)) == 1, word
    for answer in LETTERS + tuple(f.value for f in world.facts):
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1, answer


def test_text_examples_match_the_text_adapter_prompt(world, processor) -> None:
    tokenizer = processor.tokenizer
    adapter = CausalLMModel("t", new_text_llm(tokenizer, TextLLMSpec(hidden_size=16, ffn_size=32), 0), tokenizer)
    for example in (mcq_example(world.eval_mcqs[0]), repeat_example(world.eval_mcqs[1].prompt)):
        prompt_ids, reply_ids = encode_text_example(tokenizer, example)
        encoded = adapter.encode([Prompt(text=example.prompt)])
        assert encoded["input_ids"][0].tolist() == prompt_ids
        assert tokenizer.decode(reply_ids) == example.response + "<|im_end|>"


def test_collate_labels_only_the_response() -> None:
    batch = collate([([1, 2, 3], [7, 8]), ([4], [9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [7, 8], [IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]


@needs_espeak
def test_audio_prompts_and_features_match_the_processor(world, processor) -> None:
    """The pre-expanded ASR / spoken-QA ids and the cached features equal what Qwen2AudioProcessor builds."""
    clips = synthesize([m.prompt for m in world.eval_mcqs[:2]], [HELD_OUT_VOICE] * 2)
    features, n_frames = featurise(processor.feature_extractor, clips)
    text_llm = new_text_llm(processor.tokenizer, TextLLMSpec(hidden_size=16, ffn_size=32), 0)
    speech_llm = new_speech_llm(text_llm, processor.tokenizer, SpeechLLMSpec(encoder_layers=1, d_model=16), 0)
    adapter = Qwen2AudioModel("s", speech_llm, processor)
    for template, text in ((asr_template(processor), PROBE_INSTRUCTION), (spoken_qa_template(processor), None)):
        encoded = adapter.encode([Prompt(audio=c, text=text) for c in clips])
        for row, clip in enumerate(clips):
            real = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
            n_audio = real.count(template.audio_token_id)
            assert real == template.ids(n_audio)
            assert n_audio == audio_token_count(int(n_frames[row]), hop_length=1)
        assert torch.allclose(encoded["input_features"], features.float(), atol=2e-3)
        assert torch.equal(encoded["feature_attention_mask"].sum(-1), n_frames)
    assert response_ids(processor.tokenizer, "B")[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert np.all(np.abs(clips[0]) <= 1.0)
