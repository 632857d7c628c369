"""The Audio Flamingo 3 family on a tiny offline checkpoint (tests/fixtures/tiny_audioflamingo3.py): detection,
the hub prompt format, multi-window audio, batching, teacher-forced logits, bad input, distillation's modules, and
``gap`` end to end."""

from __future__ import annotations

import pytest
import torch

from speechlm_eval.backbone import backbone_identity
from speechlm_eval.models import audioflamingo3
from speechlm_eval.models.base import ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import TinySpec
from tests.fixtures.tiny_audioflamingo3 import build_tiny_af3_pair
from tests.fixtures.tiny_models import CORPUS
from tests.models.family_contract import (
    GREEDY,
    assert_batched_equals_single,
    assert_continuation_logits_contract,
    assert_distill_modules,
    assert_distill_runs_to_a_report,
    assert_gap_run_is_complete,
    assert_prompt_cache_matches,
    assert_the_audio_reaches_the_model,
    clip,
    contract_prompts,
    run_gap,
)

CPU = LoadOptions(device="cpu")
# The hub checkpoint's processor template: default system turn, one <sound> then the text, whatever the parts' order.
AF3_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "{body}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def af3_pair(tmp_path_factory):
    """(text_dir, speech_dir); the encoder window is 5 s and the processor takes up to 10 s (2 windows)."""
    return build_tiny_af3_pair(CORPUS, tmp_path_factory.mktemp("af3"), TinySpec(vocab_size=400))


@pytest.fixture(scope="module")
def af3(af3_pair):
    return load_model(str(af3_pair[1]), CPU)


def test_family_is_detected_and_loaded(af3_pair, af3):
    text_dir, speech_dir = af3_pair
    assert '"model_type": "audioflamingo3"' in (speech_dir / "config.json").read_text()
    assert detect_family(str(speech_dir), CPU).name == "audioflamingo3"
    assert detect_family(str(text_dir), CPU).name == "hf-causal"
    assert type(af3.model).__name__ == "AudioFlamingo3ForConditionalGeneration"
    assert type(af3.processor).__name__ == "AudioFlamingo3Processor"
    described = af3.describe()
    assert described["family"] == "audioflamingo3" and described["max_audio_seconds"] == 10.0


def test_prompt_format_is_the_checkpoints(af3):
    assert af3.chat_text(Prompt(audio=clip(1))) == AF3_PROMPT.format(body="<sound>")
    assert af3.chat_text(Prompt(text="Who are you?")) == AF3_PROMPT.format(body="Who are you?")
    assert af3.chat_text(Prompt(audio=clip(1), text="Which choice?")) == AF3_PROMPT.format(body="<sound>Which choice?")
    assert af3.chat_text(Prompt(text="hi", system="Be brief.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert af3.default_system_prompt() == "You are a helpful assistant."


def test_audio_tokens_match_the_processor_across_windows(af3):
    audio_id = af3.tokenizer.convert_tokens_to_ids("<sound>")
    # 1 s: 100 frames -> 50 -> 25; 2.5 s: 62; 6.25 s spans two 5 s windows: 500 + 125 frames -> 156.
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which?"), Prompt(audio=clip(6.25, 2))]
    inputs = af3.encode(prompts)
    counts = (inputs["input_ids"] == audio_id).sum(-1).tolist()
    assert counts == [25, 62, 156]
    assert counts == [af3.audio_token_count(len(p.audio)) for p in prompts]
    assert inputs["input_features"].shape == (4, 128, 500)  # one row per 5 s window: 1 + 1 + 2
    assert inputs["attention_mask"].sum(-1).tolist() == [af3.prompt_length(p) for p in prompts]
    for n in (480, 481, 641, 80_000, 80_001, 80_200, 80_321, 159_999, 160_000):
        encoded = af3.encode([Prompt(audio=clip(n / 16000))])
        assert int((encoded["input_ids"] == audio_id).sum()) == audioflamingo3.audio_token_count(n, af3.processor), n


def test_every_window_is_padded_to_the_encoder_window(af3):
    # A batch of short clips still fills whole 5 s windows (the encoder's positional table is one window long).
    inputs = af3.encode([Prompt(audio=clip(0.5)), Prompt(audio=clip(1.0, 1))])
    assert inputs["input_features"].shape == (2, 128, 500)
    assert inputs["input_features_mask"].sum(-1).tolist() == [50, 100]
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding


def test_text_and_audio_prompts_generate(af3):
    for prompt in (Prompt(text="Which animal is a mammal?"), Prompt(audio=clip(1.5, 3)),
                   Prompt(audio=clip(7.0, 4), text="Which choice?")):
        generation = af3.generate([prompt], GREEDY)[0]
        assert generation.n_new_tokens > 0 and generation.n_prompt_tokens == af3.prompt_length(prompt)


def test_batched_generation_equals_one_at_a_time(af3):
    assert_batched_equals_single(af3, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 3, 6)])
    assert_batched_equals_single(af3, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(6.0, 2)),
                                       Prompt(audio=clip(0.3, 3), text="ok?")])


def test_the_audio_reaches_the_model(af3):
    assert_the_audio_reaches_the_model(af3)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_shapes_and_masks(af3, with_audio):
    assert_continuation_logits_contract(af3, contract_prompts(with_audio))


def test_gradients_reach_the_audio_encoder(af3):
    logits, _, mask = af3.continuation_logits([Prompt(audio=clip(1.0, 8))], ["B. whale"])
    logits[mask].float().logsumexp(-1).sum().backward()
    assert af3.projector().linear_1.weight.grad is not None
    assert af3.audio_encoder().conv1.weight.grad is not None
    af3.model.zero_grad(set_to_none=True)


def test_too_long_or_too_short_audio_is_refused(af3):
    with pytest.raises(ModelInputError, match="encoder window"):
        af3.generate([Prompt(audio=clip(10.5))], GREEDY)  # the processor would truncate it to 10 s
    with pytest.raises(ModelInputError, match="too short"):
        af3.generate([Prompt(audio=clip(0.0125))], GREEDY)  # 200 samples: 2 mel frames, no audio token
    assert af3.generate([Prompt(audio=clip(0.03))], GREEDY)[0].n_new_tokens > 0  # 3 frames: one audio token
    assert af3.generate([Prompt(audio=clip(10.0))], GREEDY)[0].n_new_tokens > 0  # exactly two windows


def test_distillation_finds_the_modules_and_lora_targets(af3):
    assert_distill_modules(af3, "AudioFlamingo3Encoder", "AudioFlamingo3MultiModalProjector", "Qwen2Model")
    assert af3.language_model() is af3.model.model.language_model


def test_the_tiny_text_llm_is_recognised_as_the_backbone(af3, af3_pair):
    text = load_model(str(af3_pair[0]), CPU)
    identity = backbone_identity(af3, text)
    assert identity["label"] == "backbone", identity["reason"]


def test_saved_checkpoint_round_trips(af3, tmp_path):
    af3.model.save_pretrained(tmp_path)
    af3.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), CPU)
    assert again.family == "audioflamingo3" and again.max_audio_seconds == af3.max_audio_seconds
    prompt = Prompt(audio=clip(1.2, 9), text="Which choice?")
    with torch.no_grad():
        assert again.generate([prompt], GREEDY)[0].text == af3.generate([prompt], GREEDY)[0].text


@pytest.mark.slow
def test_gap_three_arms_and_diagnostics(af3_pair, tmp_path):
    text_dir, speech_dir = af3_pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "audioflamingo3")
    assert results["manifest"]["text_llm_reference"]["label"] == "backbone"
    assert results["manifest"]["system_prompt"]["text"] == "You are a helpful assistant."


def test_the_audio_cache_changes_no_answer(af3):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(af3, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])


def test_the_prompt_cache_is_reused_as_a_fresh_forward_would_answer(af3):
    assert_prompt_cache_matches(af3, [clip(0.5 + 0.5 * k, seed=k) for k in range(4)])


@pytest.mark.slow
def test_distill_with_lora_runs_to_a_before_after_report(af3_pair, tmp_path):
    text_dir, speech_dir = af3_pair
    manifest = assert_distill_runs_to_a_report(speech_dir, text_dir, tmp_path / "run", lora=True)
    assert manifest["student"]["family"] == "audioflamingo3"
