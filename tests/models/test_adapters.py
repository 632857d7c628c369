"""The Qwen2-Audio and causal-LM adapters on real tiny checkpoints: prompt format, batching, log-probs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, ModelLoadError, detect_family, load_model

# The exact prompt strings VoiceBench's Qwen2-Audio wrapper produces (shared/benchmarks.md §1.3).
VOICEBENCH_AUDIO_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n<|im_start|>assistant\n"
)
VOICEBENCH_TEXT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def speech(tiny_pair):
    return load_model(str(tiny_pair[0]), LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def text(tiny_pair):
    return load_model(str(tiny_pair[1]), LoadOptions(device="cpu"))


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_families_are_detected_from_config(tiny_pair):
    assert detect_family(str(tiny_pair[0]), LoadOptions()).name == "qwen2-audio"
    assert detect_family(str(tiny_pair[1]), LoadOptions()).name == "hf-causal"


def test_prompt_format_is_voicebench_exactly(speech, text):
    assert speech.chat_text(Prompt(audio=clip(1))) == VOICEBENCH_AUDIO_PROMPT
    assert speech.chat_text(Prompt(text="Who are you?")) == VOICEBENCH_TEXT_PROMPT.format(prompt="Who are you?")
    assert text.chat_text(Prompt(text="Who are you?")) == VOICEBENCH_TEXT_PROMPT.format(prompt="Who are you?")
    with_instruction = speech.chat_text(Prompt(audio=clip(1), text="Which choice?"))
    assert with_instruction.endswith("<|audio_eos|>\nWhich choice?<|im_end|>\n<|im_start|>assistant\n")


def test_batched_generation_equals_one_at_a_time(speech):
    prompts = [Prompt(text="Which animal is a mammal? " * n) for n in (1, 3, 6)] + [Prompt(text="the sea")]
    single = [speech.generate([p], GREEDY)[0] for p in prompts]
    batched = speech.generate(prompts, GREEDY)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_new_tokens for g in batched] == [g.n_new_tokens for g in single]
    audio_prompts = [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2))]
    assert [g.text for g in speech.generate(audio_prompts, GREEDY)] == [
        speech.generate([p], GREEDY)[0].text for p in audio_prompts
    ]


def test_generate_projects_only_the_last_prompt_position_and_answers_as_plain_generate(speech):
    """Qwen2-Audio's forward ignores ``logits_to_keep``: left alone, its prefill projects every prompt position onto
    the vocabulary. Inside generate the head sees one position per row, and the tokens equal a plain HF generate."""
    prompts = [Prompt(audio=clip(1.0, 1), text="Which choice?"), Prompt(audio=clip(2.5, 2))]
    head = speech.model.get_output_embeddings()
    widths: list[int] = []
    handle = head.register_forward_hook(lambda _m, _args, out: widths.append(out.shape[1]))
    try:
        ours = speech.generate(prompts, GREEDY)
    finally:
        handle.remove()
    assert widths and set(widths) == {1}
    inputs = speech.encode(prompts)
    with torch.no_grad():
        plain = speech.model.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    width = inputs["input_ids"].shape[1]
    expected = [speech.tokenizer.decode(row[: g.n_new_tokens], skip_special_tokens=True) for row, g in
                zip(plain[:, width:].tolist(), ours)]
    assert [g.text for g in ours] == expected


def test_student_without_noise_answers_text_like_its_text_backbone(tiny_identical_pair):
    student = load_model(str(tiny_identical_pair[0]), LoadOptions(device="cpu"))
    teacher = load_model(str(tiny_identical_pair[1]), LoadOptions(device="cpu"))
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="Write a poem about the sea.")]
    assert [g.text for g in student.generate(prompts, GREEDY)] == [g.text for g in teacher.generate(prompts, GREEDY)]


def naive_logprobs(model, prompt: Prompt, continuation: str) -> np.ndarray:
    """Unbatched reference: one forward pass over prompt + continuation, log-softmax, pick the continuation tokens."""
    inputs = model.encode([prompt])
    cont = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    n = len(cont)
    positions = range(ids.shape[1] - n, ids.shape[1])
    return np.array([logprobs[p - 1, ids[0, p]].item() for p in positions], dtype=np.float32)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logprobs_match_a_naive_forward(speech, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 5)]
    if with_audio:
        prompts = [Prompt(audio=clip(1.0, 3), text=p.text) for p in prompts]
    continuations = ["B. whale", "a short poem about the sea"]
    batched = speech.continuation_logprobs(prompts, continuations)
    for prompt, continuation, got in zip(prompts, continuations, batched):
        expected = naive_logprobs(speech, prompt, continuation)
        assert got.shape == expected.shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert np.all(got < 0)


def test_text_model_logprobs_match_naive(text):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="hi")]
    got = text.continuation_logprobs(prompts, ["whale", "hello there friend"])
    for p, c, g in zip(prompts, ["whale", "hello there friend"], got):
        np.testing.assert_allclose(g, naive_logprobs(text, p, c), atol=1e-4)


def test_audio_longer_than_the_encoder_window_is_refused(speech):
    assert speech.max_audio_seconds == 10.0
    with pytest.raises(ModelInputError, match="encoder window"):
        speech.generate([Prompt(audio=clip(10.5))], GREEDY)


def test_text_model_refuses_audio(text):
    with pytest.raises(ModelInputError, match="text-only"):
        text.generate([Prompt(audio=clip(1.0))], GREEDY)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot read the config"):
        load_model(str(tmp_path / "empty"))


def test_describe_records_identity(speech):
    described = speech.describe()
    assert described["family"] == "qwen2-audio" and described["parameters"] > 0
    assert len(described["fingerprint"]) == 16


def test_audio_too_short_to_encode_is_refused(speech):
    with pytest.raises(ModelInputError, match="too short"):
        speech.generate([Prompt(audio=clip(0.05))], GREEDY)
    assert speech.generate([Prompt(audio=clip(0.1))], GREEDY)[0].n_new_tokens > 0


def test_continuation_logits_are_right_aligned_and_differentiable(speech):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(audio=clip(1.0, 4))]
    prompts = prompts[:1] + [Prompt(text="the sea")]
    logits, targets, mask = speech.continuation_logits(prompts, ["B. whale and more", "ok"])
    n_long = len(speech.tokenizer("B. whale and more", add_special_tokens=False)["input_ids"])
    n_short = len(speech.tokenizer("ok", add_special_tokens=False)["input_ids"])
    assert logits.shape[:2] == targets.shape == mask.shape == (2, n_long)
    assert mask[0].all() and mask[1].sum() == n_short and mask[1, -n_short:].all()
    logits[mask].float().logsumexp(-1).sum().backward()
    assert speech.model.lm_head.weight.grad is not None
    speech.model.zero_grad(set_to_none=True)


def test_the_audio_cache_changes_no_answer(speech):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(speech, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])
