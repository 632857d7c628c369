"""The Qwen3-Omni (thinker, text output) family on tiny offline checkpoints (tests/fixtures/tiny_qwen3_omni.py):
detection of a full checkpoint and of a bare thinker, the prompt format, the audio placeholder expansion, batching,
teacher-forced logits, bad input, distillation's modules, and ``gap`` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm_eval.backbone import backbone_identity
from speechlm_eval.models import qwen3_omni
from speechlm_eval.models.base import ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import TinySpec
from tests.fixtures.tiny_models import CORPUS
from tests.fixtures.tiny_qwen3_omni import build_tiny_qwen3_omni_pair
from tests.models.family_contract import (
    GREEDY,
    assert_batched_equals_single,
    assert_continuation_logits_contract,
    assert_distill_modules,
    assert_distill_runs_to_a_report,
    assert_gap_run_is_complete,
    clip,
    run_gap,
)

CPU = LoadOptions(device="cpu")
SPEC = TinySpec(vocab_size=400)
QWEN3_OMNI_PROMPT = "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"


@pytest.fixture(scope="module")
def q3_pair(tmp_path_factory):
    """(text_dir, speech_dir): a bare thinker and its Qwen3-MoE text LLM."""
    return build_tiny_qwen3_omni_pair(CORPUS, tmp_path_factory.mktemp("q3omni"), SPEC)


@pytest.fixture(scope="module")
def q3(q3_pair):
    return load_model(str(q3_pair[1]), CPU)


def test_family_is_detected_and_loaded(q3_pair, q3):
    text_dir, speech_dir = q3_pair
    assert '"model_type": "qwen3_omni_moe_thinker"' in (speech_dir / "config.json").read_text()
    assert detect_family(str(speech_dir), CPU).name == "qwen3-omni"
    assert detect_family(str(text_dir), CPU).name == "hf-causal"
    assert type(q3.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert q3.describe()["family"] == "qwen3-omni"


def test_a_full_checkpoint_loads_the_same_thinker(q3, tmp_path):
    # The hub layout: thinker + talker + code2wav in one checkpoint; only the thinker is built, from "thinker.*".
    _, full_dir = build_tiny_qwen3_omni_pair(CORPUS, tmp_path, SPEC, thinker_only=False)
    config = (full_dir / "config.json").read_text()
    assert '"model_type": "qwen3_omni_moe"' in config and '"talker_config"' in config
    assert detect_family(str(full_dir), CPU).name == "qwen3-omni"
    full = load_model(str(full_dir), CPU)
    assert type(full.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert not hasattr(full.model, "talker")
    prompts = [Prompt(audio=clip(1.3, 1), text="Which choice?"), Prompt(text="the sea")]
    for got, expected in zip(full.continuation_logprobs(prompts[:1], ["B. whale"]),
                             q3.continuation_logprobs(prompts[:1], ["B. whale"])):
        np.testing.assert_allclose(got, expected, atol=1e-6)  # every thinker weight came from the checkpoint


def test_prompt_format_is_the_checkpoints(q3):
    assert q3.chat_text(Prompt(audio=clip(1))) == QWEN3_OMNI_PROMPT.format(body=AUDIO)
    assert q3.chat_text(Prompt(text="Who are you?")) == QWEN3_OMNI_PROMPT.format(body="Who are you?")
    assert q3.chat_text(Prompt(audio=clip(1), text="Which choice?")) == QWEN3_OMNI_PROMPT.format(
        body=AUDIO + "Which choice?")
    assert q3.chat_text(Prompt(text="hi", system="Be brief.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + QWEN3_OMNI_PROMPT.format(body="hi"))
    assert q3.default_system_prompt() is None  # no default system turn: gap sends none to either model


def test_audio_placeholder_expands_to_one_token_per_audio_token(q3):
    audio_id = q3.tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which?"), Prompt(audio=clip(0.19, 2))]
    inputs = q3.encode(prompts)
    # 1 s = one full 100-frame chunk: 13 tokens; 2.5 s: 2 chunks + 50 frames -> 26 + 7; 0.19 s: 19 frames -> 3.
    assert (inputs["input_ids"] == audio_id).sum(-1).tolist() == [13, 33, 3]
    assert [q3.audio_token_count(len(p.audio)) for p in prompts] == [13, 33, 3]
    assert inputs["input_features"].shape == (3, 128, 250)  # padded to the longest clip, not to a window
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [100, 250, 19]
    assert inputs["attention_mask"].sum(-1).tolist() == [q3.prompt_length(p) for p in prompts]


def test_clips_longer_than_the_feature_window_are_not_truncated(q3):
    assert q3.max_audio_seconds is None  # the encoder has no window; the feature extractor's 10 s cuts nothing
    inputs = q3.encode([Prompt(audio=clip(12.5, 3))])
    assert inputs["feature_attention_mask"].sum().item() == 1250
    assert q3.generate([Prompt(audio=clip(12.5, 3))], GREEDY)[0].n_new_tokens > 0


def test_text_and_audio_prompts_generate(q3):
    for prompt in (Prompt(text="Which animal is a mammal?"), Prompt(audio=clip(1.5, 3)),
                   Prompt(audio=clip(3.0, 4), text="Which choice?")):
        generation = q3.generate([prompt], GREEDY)[0]
        assert generation.n_new_tokens > 0 and generation.n_prompt_tokens == q3.prompt_length(prompt)


def test_batched_generation_equals_one_at_a_time(q3):
    assert_batched_equals_single(q3, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 3, 6)])
    assert_batched_equals_single(q3, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2)),
                                      Prompt(audio=clip(0.4, 3), text="ok?")])


def test_the_audio_reaches_the_model(q3):
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    noise, sine = Prompt(audio=clip(1.0, 5)), Prompt(audio=tone)
    a, b = q3.continuation_logprobs([noise, sine], ["hello there", "hello there"])
    assert np.abs(a - b).max() > 1e-6  # the tiny random LM is nearly flat, but the clips do move it
    inputs = q3.encode([noise, sine])
    with torch.no_grad():
        features = q3.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"]
                                               ).last_hidden_state
    assert features.shape == (26, 64) and (features[:13] - features[13:]).abs().max() > 1e-2


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_shapes_and_masks(q3, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea")]
    if with_audio:
        prompts = [Prompt(audio=clip(s, 7), text=p.text) for p, s in zip(prompts, (1.0, 2.2))]
    assert_continuation_logits_contract(q3, prompts)


def test_gradients_reach_the_audio_encoder(q3):
    logits, _, mask = q3.continuation_logits([Prompt(audio=clip(1.0, 8))], ["B. whale"])
    logits[mask].float().logsumexp(-1).sum().backward()
    assert q3.audio_encoder().proj2.weight.grad is not None
    q3.model.zero_grad(set_to_none=True)


def test_too_long_or_too_short_audio_is_refused(q3):
    assert q3.max_context == 2048
    # 158 s: 158 full chunks -> 2054 audio tokens, more than the thinker's 2048 positions.
    with pytest.raises(ModelInputError, match="exceed the thinker's context"):
        q3.generate([Prompt(audio=clip(158.0))], GREEDY)
    with pytest.raises(ModelInputError, match="too short"):
        q3.generate([Prompt(audio=np.zeros(0, np.float32))], GREEDY)
    with pytest.raises(ModelInputError, match="too short"):
        q3.generate([Prompt(audio=clip(200 / 16000))], GREEDY)  # alone, the feature extractor's padding fails
    assert q3.generate([Prompt(audio=clip(201 / 16000))], GREEDY)[0].n_new_tokens > 0  # 2 frames: 1 audio token


def test_distillation_finds_the_modules_and_lora_targets(q3):
    assert_distill_modules(q3, "Qwen3OmniMoeAudioEncoder", None, "Qwen3OmniMoeThinkerTextModel", lm_only=False)
    assert q3.language_model() is q3.model.model.language_model


def test_lora_with_the_family_regex_adapts_only_the_language_model(q3):
    # peft 0.21 rewrites a *regex* target_modules of an MoE model into bare leaf names (q_proj, ...), which then also
    # match the audio encoder's attention; the adapter hands peft the regex's matches inside the LM by full name.
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(q3.model, LoraConfig(r=2, lora_alpha=4, target_modules=q3.lora_targets))
    try:
        encoder = {id(m) for m in q3.audio_encoder().modules()}
        assert any(id(wrapped.get_submodule(n)) in encoder for n, m in wrapped.named_modules() if hasattr(m, "lora_A"))
    finally:
        wrapped.unload()
    assert_distill_modules(q3, "Qwen3OmniMoeAudioEncoder", None, "Qwen3OmniMoeThinkerTextModel", lm_only=True)
    assert_distill_modules(q3, "Qwen3OmniMoeAudioEncoder", None, "Qwen3OmniMoeThinkerTextModel", lm_only=True)


def test_the_tiny_text_llm_is_recognised_as_the_backbone(q3, q3_pair):
    identity = backbone_identity(q3, load_model(str(q3_pair[0]), CPU))
    assert identity["label"] == "backbone", identity["reason"]


def test_saved_checkpoint_round_trips(q3, tmp_path):
    q3.model.save_pretrained(tmp_path)
    q3.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), CPU)
    assert again.family == "qwen3-omni"
    prompts = [Prompt(audio=clip(1.0, 7), text="Which choice?"), Prompt(audio=clip(1.7, 8))]
    assert [again.chat_text(p) for p in prompts] == [q3.chat_text(p) for p in prompts]
    for got, expected in zip(again.continuation_logprobs(prompts, ["B. whale", "ok"]),
                             q3.continuation_logprobs(prompts, ["B. whale", "ok"])):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_audio_token_count_matches_the_processor_formula():
    # The processor's own helper, for lengths around chunk boundaries.
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    frames = torch.tensor([1, 2, 99, 100, 101, 199, 200, 201, 1000])
    assert qwen3_omni.audio_tokens_from_frames(frames).tolist() == _get_feat_extract_output_lengths(frames, 50).tolist()


@pytest.mark.slow
def test_gap_three_arms_and_diagnostics(q3_pair, tmp_path):
    text_dir, speech_dir = q3_pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "qwen3-omni")
    assert results["manifest"]["text_llm_reference"]["label"] == "backbone"
    assert results["manifest"]["system_prompt"]["text"] is None


def test_the_audio_cache_changes_no_answer(q3):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(q3, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])


def test_the_prompt_cache_is_reused_as_a_fresh_forward_would_answer(q3):
    """Multimodal rotary positions: explicit positions for the teacher-forced tokens, the prefill's per-row offsets
    following a row selection."""
    from tests.models.family_contract import assert_prompt_cache_matches, clip as contract_clip

    assert_prompt_cache_matches(q3, [contract_clip(0.5 + 0.5 * k, seed=k) for k in range(4)])


@pytest.mark.slow
def test_distill_with_lora_runs_to_a_before_after_report(q3_pair, tmp_path):
    text_dir, speech_dir = q3_pair
    manifest = assert_distill_runs_to_a_report(speech_dir, text_dir, tmp_path / "run", lora=True)
    assert manifest["student"]["family"] == "qwen3-omni"
