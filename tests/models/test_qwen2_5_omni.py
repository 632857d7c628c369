"""The Qwen2.5-Omni (thinker, text output) adapter on tiny offline checkpoints: detection, prompt format, batching,
log-probs, bad input, the hub layout's weights, and save/load round trips."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from speechlm_eval.models import qwen2_5_omni  # noqa: F401 - registers the family
from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import TinySpec
from tests.fixtures.tiny_omni import build_tiny_omni_pair
from tests.fixtures.tiny_models import CORPUS
from tests.models.test_adapters import naive_logprobs

# The prompt strings of VoiceBench's qwen_omni wrapper (explicit system turn "You are a helpful assistant.") through
# Qwen2.5-Omni's chat template: no "Audio 1: " prefix and no newline after the audio, unlike Qwen2-Audio's template.
OMNI_AUDIO_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n"
)
OMNI_TEXT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
OMNI_AUDIO_TEXT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|audio_bos|><|AUDIO|><|audio_eos|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
GREEDY = GenerationConfig(max_new_tokens=8)
SPEC = TinySpec(vocab_size=400)


@pytest.fixture(scope="module")
def omni_pair(tmp_path_factory):
    """(text_dir, speech_dir): a full Qwen2.5-Omni checkpoint (thinker + talker + token2wav) and its text model."""
    return build_tiny_omni_pair(CORPUS, tmp_path_factory.mktemp("omni"), SPEC)


@pytest.fixture(scope="module")
def omni(omni_pair):
    return load_model(str(omni_pair[1]), LoadOptions(device="cpu"))


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_family_is_detected_from_config(omni_pair, tmp_path):
    text_dir, speech_dir = omni_pair
    assert detect_family(str(speech_dir), LoadOptions()).name == "qwen2.5-omni"
    assert detect_family(str(text_dir), LoadOptions()).name == "hf-causal"
    _, thinker_dir = build_tiny_omni_pair(CORPUS, tmp_path, SPEC, thinker_only=True)
    assert '"model_type": "qwen2_5_omni_thinker"' in (thinker_dir / "config.json").read_text()
    assert detect_family(str(thinker_dir), LoadOptions()).name == "qwen2.5-omni"


def test_prompt_format_is_exact(omni):
    assert omni.chat_text(Prompt(audio=clip(1))) == OMNI_AUDIO_PROMPT
    assert omni.chat_text(Prompt(text="Who are you?")) == OMNI_TEXT_PROMPT.format(prompt="Who are you?")
    assert omni.chat_text(Prompt(audio=clip(1), text="Which choice?")) == OMNI_AUDIO_TEXT_PROMPT.format(
        prompt="Which choice?"
    )
    assert omni.chat_text(Prompt(text="hi", system="Be brief.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_system_turn_is_sent_explicitly():
    # Not left to the template's default, which a fine-tuned checkpoint may change (VoiceBench's qwen_omni sends it).
    assert qwen2_5_omni.conversation(Prompt(text="hi")) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]


def test_audio_placeholder_expands_to_one_token_per_audio_token(omni):
    audio_id = omni.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which choice?")]
    inputs = omni.encode(prompts)
    # 16 000 samples -> 100 mel frames -> 50 after the stride-2 conv -> 25 after pooling; 2.5 s: 250 -> 125 -> 62.
    assert (inputs["input_ids"] == audio_id).sum(-1).tolist() == [25, 62]
    assert inputs["input_features"].shape == (2, 128, 1000)  # padded to the tiny 10 s window, masked
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [100, 250]
    assert inputs["attention_mask"].sum(-1).tolist() == [omni.prompt_length(p) for p in prompts]


def test_batched_generation_equals_one_at_a_time(omni):
    prompts = [Prompt(text="Which animal is a mammal? " * n) for n in (1, 3, 6)] + [Prompt(text="the sea")]
    single = [omni.generate([p], GREEDY)[0] for p in prompts]
    batched = omni.generate(prompts, GREEDY)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_new_tokens for g in batched] == [g.n_new_tokens for g in single]
    audio_prompts = [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2)), Prompt(audio=clip(0.4, 3), text="ok?")]
    assert [g.text for g in omni.generate(audio_prompts, GREEDY)] == [
        omni.generate([p], GREEDY)[0].text for p in audio_prompts
    ]


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logprobs_match_a_naive_forward(omni, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 5)]
    if with_audio:
        prompts = [Prompt(audio=clip(seconds, 3), text=p.text) for p, seconds in zip(prompts, (1.0, 2.2))]
    continuations = ["B. whale", "a short poem about the sea"]
    batched = omni.continuation_logprobs(prompts, continuations)
    for prompt, continuation, got in zip(prompts, continuations, batched):
        expected = naive_logprobs(omni, prompt, continuation)
        assert got.shape == expected.shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert np.all(got < 0)


def test_the_audio_reaches_the_model(omni):
    quiet, loud = Prompt(audio=clip(1.0, 5) * 0.1), Prompt(audio=clip(1.0, 6) * 3)
    a, b = omni.continuation_logprobs([quiet, loud], ["hello there", "hello there"])
    assert np.abs(a - b).max() > 1e-3


def test_continuation_logits_are_differentiable_through_audio(omni):
    logits, targets, mask = omni.continuation_logits([Prompt(audio=clip(1.0, 4))], ["B. whale and more"])
    assert logits.shape[:2] == targets.shape == mask.shape and mask.all()
    logits[mask].float().logsumexp(-1).sum().backward()
    assert omni.model.lm_head.weight.grad is not None
    assert omni.model.model.audio_tower.proj.weight.grad is not None
    omni.model.zero_grad(set_to_none=True)


def test_audio_longer_than_the_window_or_too_short_is_refused(omni):
    assert omni.max_audio_seconds == 10.0
    with pytest.raises(ModelInputError, match="encoder window"):
        omni.generate([Prompt(audio=clip(10.5))], GREEDY)
    with pytest.raises(ModelInputError, match="too short"):
        omni.generate([Prompt(audio=clip(0.02))], GREEDY)  # 320 samples: 2 mel frames, no audio token
    assert omni.generate([Prompt(audio=clip(0.03))], GREEDY)[0].n_new_tokens > 0  # 480 samples: one audio token


def test_a_batch_mixing_audio_and_text_is_refused(omni):
    with pytest.raises(ValueError, match="all-audio or all-text"):
        omni.encode([Prompt(text="hi"), Prompt(audio=clip(1.0))])


def test_inputs_equal_the_official_processor(omni):
    """Where torchvision works, ``Qwen2_5OmniProcessor`` itself is built and must give identical tensors."""
    try:
        from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor, video_processor = Qwen2VLImageProcessor(), Qwen2VLVideoProcessor()
    except Exception as error:  # ImportError without torchvision, RuntimeError with one built for another torch
        pytest.skip(f"Qwen2_5OmniProcessor needs a working torchvision: {error}")
    processor = Qwen2_5OmniProcessor(
        image_processor=image_processor, video_processor=video_processor, feature_extractor=omni.feature_extractor,
        tokenizer=omni.tokenizer, chat_template=omni.chat_template,
    )
    batches = [
        [Prompt(text="Who are you?"), Prompt(text="the sea " * 7)],
        [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2)), Prompt(audio=clip(0.03, 3))],
        [Prompt(audio=clip(3.3, 4), text="Which choice?"), Prompt(audio=clip(9.99, 5), text="A or B?")],
    ]
    for prompts in batches:
        texts = processor.apply_chat_template(
            [qwen2_5_omni.conversation(p) for p in prompts], add_generation_prompt=True, tokenize=False
        )
        audios = [p.audio for p in prompts if p.audio is not None] or None
        expected = processor(text=texts, audio=audios, return_tensors="pt", padding=True)
        got = omni.encode(prompts)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_bfloat16_weights_take_float32_audio_features(omni_pair):
    model = load_model(str(omni_pair[1]), LoadOptions(device="cpu", dtype="bfloat16"))
    assert model.describe()["dtype"] == "bfloat16"
    assert model.generate([Prompt(audio=clip(1.0, 9), text="ok?")], GenerationConfig(max_new_tokens=3))[0].n_new_tokens


def hub_name(name: str) -> str:
    """The tensor name in a full hub checkpoint for a parameter of the loaded thinker."""
    name = re.sub(r"^model\.language_model\.", "model.", name)
    return "thinker." + re.sub(r"^model\.(audio_tower|visual)\.", r"\1.", name)


def test_a_full_checkpoint_loads_every_thinker_weight_and_nothing_else(omni, omni_pair):
    from safetensors import safe_open

    with safe_open(str(omni_pair[1] / "model.safetensors"), "pt") as file:
        stored = {key: file.get_tensor(key) for key in file.keys()}
    assert any(k.startswith("talker.") for k in stored) and any(k.startswith("token2wav.") for k in stored)
    loaded = omni.model.state_dict()
    assert sorted(hub_name(k) for k in loaded) == sorted(k for k in stored if k.startswith("thinker."))
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, stored[hub_name(name)], rtol=0, atol=0)
    assert not hasattr(omni.model, "talker")


def test_student_without_noise_answers_text_like_its_text_backbone(tmp_path):
    text_dir, speech_dir = build_tiny_omni_pair(
        CORPUS, tmp_path, TinySpec(vocab_size=400, student_noise=0.0), thinker_only=True
    )
    student = load_model(str(speech_dir), LoadOptions(device="cpu"))
    teacher = load_model(str(text_dir), LoadOptions(device="cpu"))
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="Write a poem about the sea.")]
    assert [student.chat_text(p) for p in prompts] == [teacher.chat_text(p) for p in prompts]
    assert [g.text for g in student.generate(prompts, GREEDY)] == [g.text for g in teacher.generate(prompts, GREEDY)]
    for got, expected in zip(student.continuation_logprobs(prompts, ["B. whale", "the sea"]),
                             teacher.continuation_logprobs(prompts, ["B. whale", "the sea"])):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_saved_checkpoint_round_trips_offline(omni, tmp_path):
    # What distillation does with a student: model.save_pretrained + processor.save_pretrained into one directory.
    omni.model.save_pretrained(tmp_path)
    omni.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), LoadOptions(device="cpu"))
    assert again.describe()["family"] == "qwen2.5-omni" and again.max_audio_seconds == omni.max_audio_seconds
    prompts = [Prompt(audio=clip(1.0, 7), text="Which choice?"), Prompt(audio=clip(1.7, 8))]
    assert [again.chat_text(p) for p in prompts] == [omni.chat_text(p) for p in prompts]
    for got, expected in zip(again.continuation_logprobs(prompts, ["B. whale", "ok"]),
                             omni.continuation_logprobs(prompts, ["B. whale", "ok"])):
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_describe_records_identity(omni):
    described = omni.describe()
    assert described["family"] == "qwen2.5-omni" and described["parameters"] > 0
    assert described["default_system_prompt"] == "You are a helpful assistant."
    assert len(described["fingerprint"]) == 16


def test_the_audio_cache_changes_no_answer(omni):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(omni, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])


@pytest.mark.slow
def test_gap_three_arms_and_diagnostics(omni_pair, tmp_path):
    from tests.models.family_contract import assert_gap_run_is_complete, run_gap

    text_dir, speech_dir = omni_pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "qwen2.5-omni")
    assert results["manifest"]["system_prompt"]["text"] == "You are a helpful assistant."


def test_the_prompt_cache_is_reused_as_a_fresh_forward_would_answer(omni):
    """Multimodal rotary positions: explicit positions for the teacher-forced tokens, the prefill's per-row offsets
    following a row selection."""
    from tests.models.family_contract import assert_prompt_cache_matches, clip as contract_clip

    assert_prompt_cache_matches(omni, [contract_clip(0.5 + 0.5 * k, seed=k) for k in range(4)])
